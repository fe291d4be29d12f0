"""The tune stage end to end on a tiny LLaVA: every method runs, a killed run resumes to the same adapter,
a non-finite loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import polars as pl
import pytest
from fixtures_lvlm import write_lvlm_inputs
from safetensors.torch import load_file

from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, read_provenance
from a3tune.tune import trainer
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.tune_stage import run_tune, selected_heads

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
