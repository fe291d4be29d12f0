"""Closed accuracy per cue/confuser group and paired differences to LoRA, in the summary."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from a3tune.io.parquet import write_parquet
from a3tune.io.provenance import Provenance
from a3tune.score.paired import mean_interval
from a3tune.score.report_stage import summary_markdown, summary_table

# Four closed test items: (sample_id, cue_agrees, confuser)
ITEMS = [("s0", "yes", "none"), ("s1", "yes", "cyst"), ("s2", "no", "decoy_lesion"), ("s3", "no", "none")]


def test_interval_is_students_t_over_seeds():
    # Student's t table: t(0.975, 2 df) = 4.303; sample sd of (0.1, 0.2, 0.3) is 0.1.
    mean, half = mean_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-3)
    assert mean_interval([0.25]) == (0.25, None)
    with pytest.raises(ValueError):
        mean_interval([])


def _samples(tmp_path):
    rows = [{"sample_id": sid, "dataset": "phantom", "split": "test", "image_id": sid, "question": "q?",
             "answer": "yes", "answer_type": "closed", "task": "vqa", "organ": None, "location": None,
             "modality": None, "gt_mask_ref": None, "cue_agrees": cue, "confuser": confuser}
            for sid, cue, confuser in ITEMS]  # fmt: skip
    rows.append({**rows[0], "sample_id": "o0", "answer_type": "open", "cue_agrees": "yes", "confuser": "none"})
    path = tmp_path / "data" / "phantom" / "samples.parquet"
    path.parent.mkdir(parents=True)
    write_parquet(pl.DataFrame(rows), path, Provenance("import", {}), contract="samples")
    return path


def _run(tmp_path, run, hits):
    """metrics.json and predictions.parquet of a run whose closed items s0..s3 hit as given."""
    folder = tmp_path / "results" / run / "phantom"
    folder.mkdir(parents=True)
    accuracy = sum(hits) / len(hits)
    metrics = {"n": 5, "vqa": {"closed": {"n": 4, "accuracy": accuracy}, "open": {"n": 1, "recall": 1.0}}}
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    rows = [{"sample_id": sid, "answer_type": "closed", "hit": float(h)} for (sid, _, _), h in zip(ITEMS, hits)]
    rows.append({"sample_id": "o0", "answer_type": "open", "hit": None})
    write_parquet(pl.DataFrame(rows, schema={"sample_id": pl.String, "answer_type": pl.String, "hit": pl.Float64}),
                  folder / "predictions.parquet", Provenance("score_gather", {}))  # fmt: skip
    return folder / "metrics.json"


def test_groups_and_paired_differences_by_hand(tmp_path):
    samples = _samples(tmp_path)
    files = [
        _run(tmp_path, "base", [0, 0, 0, 0]),
        _run(tmp_path, "lora-seed0", [1, 1, 0, 0]),  # follows the cue: right where it agrees
        _run(tmp_path, "lora-seed1", [1, 0, 0, 1]),
        _run(tmp_path, "a3tune-seed0", [1, 1, 1, 0]),  # +0.25 over lora-seed0
        _run(tmp_path, "a3tune-seed1", [1, 1, 1, 1]),  # +0.50 over lora-seed1
    ]
    table = summary_table(files, [samples])
    row = table.filter(pl.col("run") == "lora-seed0").row(0, named=True)
    assert (row["closed_acc_cue_agrees"], row["closed_acc_cue_disagrees"]) == (1.0, 0.0)
    assert (row["closed_acc_confuser"], row["closed_acc_no_confuser"]) == (0.5, 0.5)
    assert row["closed_acc_minus_lora"] is None  # the reference itself
    differences = table.filter(pl.col("method") == "a3tune").sort("seed")["closed_acc_minus_lora"].to_list()
    assert differences == [0.25, 0.5]
    assert table.filter(pl.col("method") == "base")["closed_acc_minus_lora"].to_list() == [None]

    markdown = summary_markdown(table)
    # mean 0.375, sd 0.1768, t(0.975, 1 df) = 12.706: half-width 12.706 * 0.1768 / sqrt(2) = 1.588
    assert "| a3tune | 2 | 0.875 ± 0.177 | 1.000 ± 0.000 | 0.750 ± 0.354 | 1.000 ± 0.000 | 0.750 ± 0.354 | " \
           "+0.375 [-1.213, +1.963] |" in markdown  # fmt: skip


def test_without_samples_the_group_columns_are_null(tmp_path):
    table = summary_table([_run(tmp_path, "lora-seed0", [1, 0, 1, 0])])
    assert table["closed_acc_cue_agrees"].to_list() == [None]
    assert "cue disagrees" not in summary_markdown(table)


def test_missing_hits_are_refused(tmp_path):
    samples = _samples(tmp_path)
    path = _run(tmp_path, "lora-seed0", [1, 0, 1, 0])
    write_parquet(pl.DataFrame({"sample_id": ["s0"], "answer_type": ["closed"]}), path.parent / "predictions.parquet",
                  Provenance("score_gather", {}))  # fmt: skip
    with pytest.raises(ValueError, match="no per-item 'hit'"):
        summary_table([path], [samples])
