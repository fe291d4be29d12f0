"""The score stage on a tiny LLaVA: shards cover the test split once, gather writes predictions,
attention and metrics.json with VQA, report and grounding numbers."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from fixtures_lvlm import write_lvlm_inputs

from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, read_provenance
from a3tune.score.score_stage import GROUNDING_COLUMNS, PROBE_GROUNDING_COLUMNS, gather, own_heads, score_shard
from a3tune.tune.adapter_config import AdapterConfig

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
    # No probe heads and no adapter: both head sets are every head, the own_ columns repeat the others
    assert attention.columns == ["sample_id", "answer_type", "organ", *GROUNDING_COLUMNS]
    own = attention.select(pl.col(f"own_{c}").alias(c) for c in PROBE_GROUNDING_COLUMNS)
    assert own.equals(attention.select(PROBE_GROUNDING_COLUMNS))
    grounding = saved["metrics"]["grounding"]
    assert set(grounding) == {c for c in GROUNDING_COLUMNS if not c.endswith("attention_map")}
    assert grounding["own_inside_gt"] == grounding["inside_gt"]
    assert read_provenance(tmp_path / "out" / "predictions.parquet").stage == "score_gather"
    # score.meteor: false leaves METEOR out whether or not Java is on PATH (the CLI's --meteor no)
    from a3tune.cli import main

    main(["score_gather", "--out", str(tmp_path / "no-meteor"), "--meteor", "no", "--tokenizer", "ptb-python",
          "--reference-quirks", "no", *map(str, tables)])  # fmt: skip
    plain = json.loads((tmp_path / "no-meteor" / "metrics.json").read_text())["metrics"]
    assert "meteor" not in plain["report"] and plain["report"]["tokenizer"] == "ptb-python"
    assert plain["vqa"]["reference_quirks"] is False and saved["metrics"]["vqa"]["reference_quirks"] is True
    # every test sample accounted for; open answers carry the reference's NLTK BLEU; the decoding length used
    assert saved["metrics"]["samples"] == {"used": test.height, "skipped": {}}
    assert saved["metrics"]["report"]["tokenizer"] in ("ptb-java", "ptb-python")
    assert {"bleu", "bleu_1", "bleu_2", "bleu_3"} <= set(saved["metrics"]["vqa"]["open"])
    assert saved["metrics"]["decoding"]["max_new_tokens_used"] == {"report": 3, "vqa": 3}


def test_samples_with_unusable_images_are_counted(inputs, tmp_path):
    images = read_parquet(inputs / "images.parquet")
    train = read_parquet(inputs / "samples.parquet").filter(pl.col("split") == "train")  # several images
    lost = train["image_id"][0]
    n_lost = train.filter(pl.col("image_id") == lost).height
    bad = images.with_columns(pl.when(pl.col("image_id") == lost).then(pl.lit("unreadable")).otherwise(pl.col("status"))
                              .alias("status"))  # fmt: skip
    write_parquet(bad, tmp_path / "images.parquet", Provenance("import", {}, {}))
    table = score_shard({"path": str(inputs / "model")}, inputs / "samples.parquet", tmp_path / "images.parquet",
                        inputs, inputs / "raw", tmp_path / "shard.parquet", split="train", batch_size=4,
                        decode={"num_beams": 1, "max_new_tokens": 2}, progress=False, limit=2)  # fmt: skip
    accounting = read_provenance(tmp_path / "shard.parquet").params["samples"]
    assert table.height == accounting["used"] == 2
    assert accounting["skipped"] == {"image_unreadable": n_lost, "limit": train.height - n_lost - 2}


@pytest.mark.parametrize("baseline", ["pai", "vcd"])
def test_baselines_decode_greedily(inputs, tmp_path, baseline):
    table = _shard(inputs, tmp_path / "shard.parquet", 0, 1, baseline=baseline, limit=2)
    assert table.height == 2
    assert read_provenance(tmp_path / "shard.parquet").params["dtype"] == "torch.float32"
    assert read_provenance(tmp_path / "shard.parquet").params["decoding"] == {
        "num_beams": 1, "max_new_tokens": 3, "stop": [], "do_sample": False, "baseline": baseline,
        "max_new_tokens_used": {"vqa": 3}}  # fmt: skip


def test_unknown_baseline_is_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match="unknown baseline 'dola'"):
        _shard(inputs, tmp_path / "x.parquet", 0, 1, baseline="dola")


def _adapter(path, **settings) -> str:
    """An adapter_config.json alone: all that own_heads reads."""
    path.mkdir()
    (path / "adapter_config.json").write_text(AdapterConfig(base_model="m", **settings).to_json())
    return str(path)


def test_own_heads_are_the_heads_whose_qk_the_adapter_changed(tmp_path):
    assert own_heads(_adapter(tmp_path / "static", qk="moe", heads={1: [3, 2], 0: [0]})) == {0: (0,), 1: (2, 3)}
    assert own_heads(_adapter(tmp_path / "all", qk="lora")) is None  # every head's q/k (plain LoRA, all_heads)
    assert own_heads(_adapter(tmp_path / "no-qk", qk="none", heads={0: [1]})) is None  # no q/k adapter
    assert own_heads(None) is None and own_heads("") is None  # the base model


def test_a_static_adapter_is_scored_on_its_own_heads_too(inputs, tmp_path):
    from a3tune.models.registry import lvlm_from_config
    from a3tune.tune.adapters import apply_adapters, save_adapter

    heads = pl.DataFrame({"layer": [0] * 4 + [1] * 4, "head": [0, 1, 2, 3] * 2, "score": [0.5] * 8, "inside_score": [0.5] * 8,
                          "rank": list(range(1, 9)), "selected": [True, True] + [False] * 6},
                         schema_overrides={"layer": pl.Int32, "head": pl.Int32, "rank": pl.Int32})  # fmt: skip
    write_parquet(heads, tmp_path / "heads.parquet", Provenance(stage="probe_heads"), contract="heads")
    lvlm = lvlm_from_config({"path": str(inputs / "model")})
    config = AdapterConfig(base_model="m", qk="lora", heads={1: (2, 3)})  # other heads than the probe's layer 0 pair
    apply_adapters(lvlm.model, config)
    with torch.no_grad():
        for name, parameter in lvlm.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
    save_adapter(lvlm.model, config, tmp_path / "adapter")
    table = _shard(inputs, tmp_path / "shard.parquet", 0, 1, adapter=tmp_path / "adapter",
                   heads_path=tmp_path / "heads.parquet", limit=2)  # fmt: skip
    for column in ("image_share", "inside_gt"):
        assert table[f"own_{column}"].is_not_null().all()
        assert (table[f"own_{column}"] - table[column]).abs().min() > 1e-6  # layer 1's heads 2-3, not layer 0's 0-1
    metrics = gather([tmp_path / "shard.parquet"], tmp_path / "out", meteor=False)
    assert metrics["grounding"]["own_image_share"] == pytest.approx(table["own_image_share"].mean())
