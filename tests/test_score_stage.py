"""The score stage on a tiny LLaVA: shards cover the test split once, gather writes predictions,
attention and metrics.json with VQA, report and grounding numbers."""

from __future__ import annotations

import json

import polars as pl
import pytest
from fixtures_lvlm import write_lvlm_inputs

from a3tune.io.parquet import read_parquet
from a3tune.io.provenance import read_provenance
from a3tune.score.score_stage import gather, score_shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    write_lvlm_inputs(tmp)
    return tmp


def _shard(inputs, out, shard, shards, **kwargs):
    return score_shard({"path": str(inputs / "model")}, inputs / "samples.parquet", inputs / "images.parquet", inputs,
                       inputs / "raw", out, split="test", shard=shard, shards=shards, batch_size=2,
                       decode={"num_beams": 2, "max_new_tokens": 3}, progress=False, **kwargs)  # fmt: skip


def test_shards_gather_into_predictions_attention_and_metrics(inputs, tmp_path):
    tables = [tmp_path / f"shard-{k}.parquet" for k in range(2)]
    parts = [_shard(inputs, path, k, 2) for k, path in enumerate(tables)]
    test = read_parquet(inputs / "samples.parquet").filter(pl.col("split") == "test")
    assert sorted(parts[0]["sample_id"].to_list() + parts[1]["sample_id"].to_list()) == sorted(test["sample_id"])
    metrics = gather(tables, tmp_path / "out")
    predictions = read_parquet(tmp_path / "out" / "predictions.parquet")
    assert predictions.columns[:5] == ["sample_id", "prompt", "prediction", "answer", "answer_type"]
    assert json.loads(predictions["decoding"][0])["num_beams"] == 2
    attention = read_parquet(tmp_path / "out" / "attention.parquet")
    assert attention["image_share"].is_between(0, 1).all() and attention["attention_map"].list.len().unique().to_list() == [64]
    # The phantom test samples all have a ground-truth mask; none of them has a weak label in this fixture
    assert attention["inside_gt"].is_not_null().all() and attention["inside_label"].is_null().all()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"]["n"] == test.height == metrics["n"]
    assert {"closed", "open"} <= set(saved["metrics"]["vqa"]) and "bleu_4" in saved["metrics"]["report"]
    assert 0 <= saved["metrics"]["grounding"]["pointing_hit"] <= 1
    assert read_provenance(tmp_path / "out" / "predictions.parquet").stage == "score_gather"
    # score.meteor: false leaves METEOR out whether or not Java is on PATH (the CLI's --meteor no)
    from a3tune.cli import main

    main(["score_gather", "--out", str(tmp_path / "no-meteor"), "--meteor", "no", *map(str, tables)])
    assert "meteor" not in json.loads((tmp_path / "no-meteor" / "metrics.json").read_text())["metrics"]["report"]


@pytest.mark.parametrize("baseline", ["pai", "vcd"])
def test_baselines_decode_greedily(inputs, tmp_path, baseline):
    table = _shard(inputs, tmp_path / "shard.parquet", 0, 1, baseline=baseline, limit=2)
    assert table.height == 2
    assert read_provenance(tmp_path / "shard.parquet").params["dtype"] == "torch.float32"
    assert read_provenance(tmp_path / "shard.parquet").params["decoding"] == {
        "num_beams": 1, "max_new_tokens": 3, "stop": [], "do_sample": False, "baseline": baseline}  # fmt: skip


def test_unknown_baseline_is_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match="unknown baseline 'dola'"):
        _shard(inputs, tmp_path / "x.parquet", 0, 1, baseline="dola")
