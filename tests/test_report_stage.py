"""The report: run ids, the summary table and its Markdown (mean ± std over seeds), the metric bars."""

from __future__ import annotations

import json

import polars as pl
import pytest

from a3tune.io.provenance import read_provenance
from a3tune.score.report_stage import parse_run, summary_markdown, summary_table, write_report


@pytest.mark.parametrize(("run", "parsed"), [
    ("base", ("base", None)), ("a3tune-seed1", ("a3tune", 1)), ("lora-seed0+pai", ("lora+pai", 0)),
    ("dynamic_heads-seed12", ("dynamic_heads", 12)),
])  # fmt: skip
def test_run_ids(run, parsed):
    assert parse_run(run) == parsed


def test_bad_run_id_is_refused():
    with pytest.raises(ValueError, match="not a run id"):
        parse_run("a3tune seed 1")


def _metrics(tmp_path, run, closed, inside_gt, report=None):
    path = tmp_path / "results" / run / "phantom" / "metrics.json"
    path.parent.mkdir(parents=True)
    metrics = {"n": 10, "vqa": {"closed": {"n": 5, "accuracy": closed}, "open": {"n": 5, "recall": 0.5}},
               "grounding": {"image_share": 0.8, "inside_label": 0.3, "inside_gt": inside_gt, "pointing_hit": 0.5}}  # fmt: skip
    if report:
        metrics["report"] = report
    path.write_text(json.dumps({"metrics": metrics}))
    return path


def test_summary_means_and_stds_over_seeds(tmp_path):
    files = [_metrics(tmp_path, "base", 0.5, 0.1), _metrics(tmp_path, "a3tune-seed0", 0.7, 0.4),
             _metrics(tmp_path, "a3tune-seed1", 0.9, 0.6, report={"bleu_4": 0.2, "rouge_l": 0.4, "cider": 1.0})]  # fmt: skip
    table = summary_table(files)
    assert table.filter(pl.col("method") == "a3tune")["seed"].to_list() == [0, 1]
    markdown = summary_markdown(table)
    assert "| a3tune | 2 | 10 | 0.800 ± 0.141 |" in markdown  # closed: mean 0.8, sample std 0.1414
    assert "| base | - | 10 | 0.500 |" in markdown and "BLEU-4" in markdown
    assert "Samples not scored" not in markdown


def test_summary_counts_the_samples_a_run_lost(tmp_path):
    files = [_metrics(tmp_path, "base", 0.5, 0.1), _metrics(tmp_path, "a3tune-seed0", 0.7, 0.4)]
    metrics = json.loads(files[1].read_text())
    metrics["metrics"] |= {"n": 8, "samples": {"used": 8, "skipped": {"image_missing": 1, "image_unreadable": 1}}}
    files[1].write_text(json.dumps(metrics))
    table = summary_table(files)
    assert table.select("run", "n", "n_skipped").rows() == [("a3tune-seed0", 8, 2), ("base", 10, 0)]
    markdown = summary_markdown(table)
    assert "| a3tune | 1 | 8 |" in markdown
    assert "Samples not scored: a3tune-seed0 2 (image_missing 1, image_unreadable 1)." in markdown
    out = tmp_path / "out"
    write_report(files, out / "summary.parquet", out / "summary.md", out / "figures")
    assert read_provenance(out / "summary.parquet").stage == "report"
    assert (out / "summary.md").read_text() == markdown
    assert (out / "figures" / "metrics-phantom.png").read_bytes()[:4] == b"\x89PNG"
