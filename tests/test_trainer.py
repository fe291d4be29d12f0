"""The tune stage end to end on a tiny LLaVA: every method runs, a killed run resumes to the same adapter,
a non-finite loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from fixtures_lvlm import write_lvlm_inputs
from safetensors.torch import load_file

from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, read_provenance
from a3tune.tune import trainer
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.tune_stage import on_rank_gpu, run_tune, selected_heads

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"epochs": 2, "global_batch": 4, "micro_batch": 2, "checkpoint_every": 1, "lr": 5e-3}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    write_lvlm_inputs(tmp)
    # The probe's output, by hand: heads 0-1 of layer 0 and 2-3 of layer 1 (whole KV groups: k deltas too)
    heads = pl.DataFrame({"layer": [0, 0, 0, 0, 1, 1, 1, 1], "head": [0, 1, 2, 3] * 2,
                          "score": [0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.7, 0.6], "inside_score": [0.5] * 8,
                          "rank": [1, 2, 5, 6, 7, 8, 3, 4], "selected": [True, True, False, False, False, False, True, True]},
                         schema_overrides={"layer": pl.Int32, "head": pl.Int32, "rank": pl.Int32})  # fmt: skip
    write_parquet(heads, tmp / "heads.parquet", Provenance(stage="probe_heads"), contract="heads")
    return tmp


def _tune(tmp, out, method="a3tune", overrides=None, checkpoints=None):
    return run_tune({"path": str(tmp / "model")}, tmp / "samples.parquet", tmp / "images.parquet", tmp, tmp / "raw",
                    out, checkpoints or out.parent / f"{out.name}-checkpoints", preset="phantom", method=method,
                    heads_path=tmp / "heads.parquet", overrides={**SMALL, **(overrides or {})}, progress=False)  # fmt: skip


def test_each_rank_loads_the_base_model_onto_its_own_gpu(monkeypatch):
    spec = {"path": "m", "dtype": "auto", "device": "cuda"}
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert on_rank_gpu(spec) == spec
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert on_rank_gpu(spec) == {**spec, "device": "cuda:3"} and spec["device"] == "cuda"
    assert on_rank_gpu({"path": "m", "device": "cpu"})["device"] == "cpu"
    assert on_rank_gpu({"path": "m", "device": "cuda:1"})["device"] == "cuda:1"


def test_selected_heads_from_the_probe(inputs):
    assert selected_heads(inputs / "heads.parquet") == {0: [0, 1], 1: [2, 3]}


@pytest.mark.parametrize(("method", "overrides"), [
    ("lora", {}), ("a3tune", {}), ("a3tune", {"loss": "kl"}), ("dynamic_heads", {"heads_top_k": 3}), ("no_moe", {}),
])  # fmt: skip
def test_methods_train_and_write_adapter_and_log(inputs, tmp_path, method, overrides):
    table = _tune(inputs, tmp_path / "run", method, overrides)
    log = read_parquet(tmp_path / "run" / "train_log.parquet")
    assert log.equals(table) and log["ce"].is_finite().all()
    assert log["step"].max() == 4  # 2 epochs of 8 samples, 4 per step
    aligned = method != "lora"
    assert log["align"].is_finite().all() == aligned and log["align"].is_nan().all() == (not aligned)
    config = AdapterConfig.from_json((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config.qk == {"lora": "lora", "no_moe": "lora"}.get(method, "moe")
    assert config.heads == ({0: (0, 1), 1: (2, 3)} if method in ("a3tune", "no_moe") else None)
    assert config.extra["settings"]["lam"] == 0.5 and config.extra["provenance"]["stage"] == "tune"
    prov = read_provenance(tmp_path / "run" / "train_log.parquet")
    assert prov.params["method"] == method and {"labels.zarr", "model"} <= set(prov.inputs)
    assert prov.params["dtype"] == str(torch.bfloat16 if torch.cuda.is_available() else torch.float32)  # auto


def test_lora_adapter_merges_into_a_standard_checkpoint(inputs, tmp_path):
    from a3tune.cli import main
    from a3tune.models.layout import encode_batch
    from a3tune.models.lvlm import load_lvlm
    from a3tune.tune.adapters import load_adapter

    _tune(inputs, tmp_path / "run", "lora")
    model = json.dumps({"path": str(inputs / "model")})
    assert main(["merge_adapter", "--model", model, "--adapter", str(tmp_path / "run" / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0  # fmt: skip
    merged, adapted = load_lvlm(tmp_path / "merged"), load_lvlm(inputs / "model")
    load_adapter(adapted.model, tmp_path / "run" / "adapter")
    batch = encode_batch(merged, [np.zeros((40, 40, 3), np.uint8)], ["is there a lesion"], ["no"])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(**batch.inputs).logits, adapted.model.eval()(**batch.inputs).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    # An A3MoE adapter cannot be merged (its routing depends on the input): a clear error, exit 2
    _tune(inputs, tmp_path / "moe")
    assert main(["merge_adapter", "--model", model, "--adapter", str(tmp_path / "moe" / "adapter"),
                 "--out", str(tmp_path / "nope")]) == 2  # fmt: skip


def test_killed_run_resumes_to_the_uninterrupted_adapter(inputs, tmp_path, monkeypatch):
    _tune(inputs, tmp_path / "full")
    prune = trainer.prune_checkpoints

    def killed_after_step_2(directory, keep):
        prune(directory, keep)
        if (directory / "step-00000002").exists():
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "prune_checkpoints", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        _tune(inputs, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(trainer, "prune_checkpoints", prune)
    _tune(inputs, tmp_path / "resumed")
    full = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all((full[k] == resumed[k]).all() for k in full)
    assert read_parquet(tmp_path / "full" / "train_log.parquet").equals(read_parquet(tmp_path / "resumed" / "train_log.parquet"))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    real, calls = trainer.alignment_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(trainer, "alignment_loss", poisoned)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(FloatingPointError, match="optimizer step 2.*last good checkpoint is kept"):
        _tune(inputs, tmp_path / "run", checkpoints=checkpoints)
    assert not (tmp_path / "run" / "adapter").exists()
    assert sorted(p.name for p in next(checkpoints.iterdir()).iterdir()) == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_two_ranks_under_deepspeed_match_one_rank(inputs, tmp_path):
    """``--ranks 2``: torchrun, two processes, DeepSpeed ZeRO-2 on gloo; the same global batch as one rank."""
    import subprocess
    import sys

    def cli(out, ranks):
        command = [sys.executable, "-m", "a3tune.cli", "tune", "--model", json.dumps({"path": str(inputs / "model")}),
                   "--samples", str(inputs / "samples.parquet"), "--images", str(inputs / "images.parquet"),
                   "--labels", str(inputs), "--root", str(inputs / "raw"), "--heads", str(inputs / "heads.parquet"),
                   "--preset", "phantom", "--method", "a3tune", "--overrides", json.dumps(SMALL),
                   "--checkpoints", f"{out}-checkpoints", "--ranks", str(ranks), "--out", str(out),
                   "--no-progress"]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]

    cli(tmp_path / "one", 1)
    cli(tmp_path / "two", 2)
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    assert read_parquet(tmp_path / "two" / "train_log.parquet")["step"].max() == 4
