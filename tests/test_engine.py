"""The training engine: what it optimises, accumulation, the schedule, exact resume, checkpoint discovery,
the NaN guard and the DeepSpeed config (and, where DeepSpeed runs on this machine, a real ZeRO-2 round trip)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from a3tune.tune.deepspeed_config import deepspeed_config
from a3tune.tune.engine import (
    Engine,
    check_finite,
    cosine_factor,
    latest_checkpoint,
    prune_checkpoints,
    warmup_steps,
)


def toy(dropout: float = 0.2) -> nn.Sequential:
    """A small MLP with dropout (so resumption needs the RNG state) and a frozen middle layer."""
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model[3].requires_grad_(False)
    return model


def batch(micro: int, size: int = 1, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of a fixed synthetic regression stream."""
    gen = torch.Generator().manual_seed(1000 + micro)
    x = torch.randn(size, 4, generator=gen)
    return x.to(device), x.sum(dim=1, keepdim=True).sin().to(device)


def run(engine: Engine, start: int, stop: int, save_at: int | None = None, path=None) -> None:
    """Micro-batches ``start..stop``; checkpoint (with the next micro-batch as cursor) after optimizer step ``save_at``."""
    device = next(engine.model.parameters()).device
    for micro in range(start, stop):
        x, y = batch(micro, device=device)
        loss = ((engine.model(x) - y) ** 2).mean()
        check_finite(loss, engine.step_count)
        engine.backward(loss)
        if engine.step() and engine.step_count == save_at:
            engine.save_checkpoint(path, {"cursor": micro + 1})


def test_only_trainable_params_are_optimised(one_thread):
    model = toy()
    engine = Engine(model, lr=1e-2, total_steps=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("3.")}
    optimised = {id(p) for group in engine._optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(engine.trainable_state_dict()) == {"0.weight", "0.bias", "5.weight", "5.bias"}
    run(engine, 0, 4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_accumulation_equals_the_larger_batch(one_thread):
    accumulated = Engine(toy(dropout=0.0), lr=1e-2, warmup=0.0, total_steps=2, grad_accum=2)
    whole = Engine(toy(dropout=0.0), lr=1e-2, warmup=0.0, total_steps=2, grad_accum=1)
    for step in range(2):
        pair = [batch(2 * step + i) for i in range(2)]
        for x, y in pair:
            accumulated.backward(((accumulated.model(x) - y) ** 2).mean())
            stepped = accumulated.step()
        assert stepped and accumulated.step_count == step + 1
        x, y = (torch.cat(t) for t in zip(*pair))
        whole.backward(((whole.model(x) - y) ** 2).mean())
        assert whole.step()
    a, b = accumulated.trainable_state_dict(), whole.trainable_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not torch.equal(a["0.weight"], toy()[0].weight)


def test_cosine_schedule():
    assert warmup_steps(922, 0.03) == 28  # the reference's SLAKE run: ceil(0.03 * 922)
    warm, total = warmup_steps(100, 0.1), 100
    assert [cosine_factor(s, warm, total) for s in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    engine = Engine(toy(), lr=2e-4, warmup=0.1, total_steps=total)
    assert engine.lr == 0.0
    lrs = []
    for _ in range(total):
        engine.step()
        lrs.append(engine.lr)
    assert lrs[warm - 1] == pytest.approx(2e-4)  # the lr of step ``warm``: warm-up done
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[54] == pytest.approx(1e-4)
    assert all(math.isfinite(v) for v in lrs)


def test_torch_resume_is_bitwise_exact(tmp_path, one_thread):
    accum, path = 2, tmp_path / "checkpoints" / "step-00000003"
    whole = Engine(toy(), lr=1e-2, total_steps=6, grad_accum=accum, seed=7)
    run(whole, 0, 6 * accum, save_at=3, path=path)
    assert whole.step_count == 6 and latest_checkpoint(tmp_path / "checkpoints") == path

    resumed = Engine(toy(), lr=1e-2, total_steps=6, grad_accum=accum, seed=7)  # the "killed" run, restarted
    torch.manual_seed(99)  # the restarted process's RNG is elsewhere; the checkpoint must put it back
    state = resumed.load_checkpoint(path)
    assert state == {"cursor": 3 * accum} and resumed.step_count == 3
    assert resumed.lr == pytest.approx(1e-2 * cosine_factor(3, warmup_steps(6, 0.03), 6))
    run(resumed, state["cursor"], 6 * accum)
    a, b = whole.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_inside_an_accumulation_window_is_refused(tmp_path, one_thread):
    engine = Engine(toy(), lr=1e-2, total_steps=2, grad_accum=2)
    run(engine, 0, 1)
    with pytest.raises(RuntimeError, match="inside a gradient-accumulation window"):
        engine.save_checkpoint(tmp_path / "step-00000000", {})
    assert not any(tmp_path.iterdir())


def test_latest_checkpoint_skips_temporary_and_incomplete(tmp_path, one_thread):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    engine = Engine(toy(), lr=1e-2, total_steps=4)
    for step in (1, 2):
        run(engine, step - 1, step)
        engine.save_checkpoint(root / f"step-{step:08d}", {"cursor": step})
    (root / ".step-00000003.tmp-abcd1234").mkdir()  # a writer killed mid-save
    (root / "step-00000004").mkdir()  # a directory without its engine state
    (root / "notes").mkdir()
    assert latest_checkpoint(root) == root / "step-00000002"
    prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == [".step-00000003.tmp-abcd1234", "notes", "step-00000002", "step-00000004"]


def test_check_finite_names_the_step_and_the_kept_checkpoint():
    check_finite(torch.tensor(1.5), 3)
    with pytest.raises(FloatingPointError, match=r"nan.*step 17.*last good checkpoint is kept"):
        check_finite(torch.tensor(float("nan")), 17)
    with pytest.raises(FloatingPointError, match="inf"):
        check_finite(torch.tensor([1.0, float("inf")]), 0)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="backend 'jax'"):
        Engine(toy(), lr=1e-2, total_steps=1, backend="jax")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'bf16' needs CUDA"):
            Engine(toy(), lr=1e-2, total_steps=1, precision="bf16")
    with pytest.raises(ValueError, match="ZeRO stage 1"):
        deepspeed_config(stage=1, micro_batch=1, grad_accum=1, bf16=False, lr=1e-3, weight_decay=0.0, warmup_steps=1,
                         total_steps=10)  # fmt: skip


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_validates(stage):
    config_module = pytest.importorskip("deepspeed.runtime.config")
    config = deepspeed_config(stage=stage, micro_batch=1, grad_accum=8, bf16=True, lr=2e-4, weight_decay=0.0,
                              warmup_steps=28, total_steps=922)  # fmt: skip
    parsed = config_module.DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (1, 8)
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == 2e-4
    assert parsed.scheduler_name == "WarmupCosineLR" and parsed.scheduler_params["warmup_num_steps"] == 28
    assert parsed.zero_config.gather_16bit_weights_on_model_save == (stage == 3)


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank process-group environment for DeepSpeed, torn down afterwards so other tests see none.

    DeepSpeed's own ``destroy_process_group`` also drops the process groups it caches; after
    torch's alone, the next ``deepspeed.initialize`` in this process fails on a stale group."""
    ds_comm = pytest.importorskip("deepspeed.comm")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield
    if torch.distributed.is_initialized():
        ds_comm.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


@pytest.mark.timeout(240)  # the first use JIT-builds DeepSpeed's shm comm op (~50 s, cached in ~/.cache/torch_extensions)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_resume(tmp_path, one_thread, one_rank, stage):
    """A real ZeRO run (on CPU: DeepSpeed's CPU accelerator, gloo, one rank) resumes exactly and matches plain PyTorch."""
    accum, path = 2, tmp_path / "checkpoints" / "step-00000002"
    settings = {"lr": 1e-2, "total_steps": 4, "grad_accum": accum, "backend": "deepspeed", "zero_stage": stage, "seed": 7}
    whole = Engine(toy(), **settings)
    run(whole, 0, 4 * accum, save_at=2, path=path)
    assert whole.step_count == 4 and latest_checkpoint(path.parent) == path
    expected = whole.trainable_state_dict()

    resumed = Engine(toy(), **settings)
    torch.manual_seed(99)
    state = resumed.load_checkpoint(path)
    assert state == {"cursor": 2 * accum} and resumed.step_count == 2
    run(resumed, state["cursor"], 4 * accum)
    got = resumed.trainable_state_dict()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6, rtol=0) for k in expected)

    plain = Engine(toy(), **(settings | {"backend": "torch"}))  # the same run without DeepSpeed
    run(plain, 0, 4 * accum)
    reference = plain.trainable_state_dict()
    assert all(torch.allclose(expected[k], reference[k], atol=1e-6, rtol=0) for k in expected)
