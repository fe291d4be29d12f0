"""The training engine under the A³Tune trainer: one interface over plain PyTorch and DeepSpeed ZeRO.

The trainer must not care whether it runs on a laptop CPU (tests, the demo) or on GPUs under
DeepSpeed (the real runs of the reference: AdamW, cosine schedule with 3 % linear warm-up, weight
decay 0, bf16, gradient accumulation), so :class:`Engine` hides the difference behind
``backward``/``step``/``save_checkpoint``/``load_checkpoint``.

Resumption must be exact: a run killed after a checkpoint and resumed ends with the same weights as
an uninterrupted run. A checkpoint therefore holds the trainable weights, the optimizer and scheduler
states, the step, every RNG state (python, numpy, torch, CUDA; dropout draws from them) and the
caller's ``client_state`` (its data-order position). It is written under a temporary sibling and
renamed into place (:func:`a3tune.io.atomic.atomic_dir`); ``engine_state.pt`` is written last inside
it, so a directory without it is incomplete and :func:`latest_checkpoint` skips it.

Choices:

- ``precision="bf16"`` needs CUDA: on CPU the Engine raises instead of silently training in another
  precision than asked (pick ``"fp32"`` there).
- The DeepSpeed backend also runs on CPU (DeepSpeed's CPU accelerator, gloo, one rank); that is how
  the tests check its ZeRO round trip. A single process that was not started by a launcher gets the
  one-rank environment (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).
- Both backends follow :func:`cosine_with_warmup` (the HF Trainer ``cosine`` schedule the reference
  used); DeepSpeed gets it as a client scheduler and checkpoints its state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from a3tune.io.atomic import atomic_dir, is_temporary
from a3tune.tune.deepspeed_config import deepspeed_config

BACKENDS = ("torch", "deepspeed")
PRECISIONS = ("fp32", "bf16")
STATE_FILE = "engine_state.pt"
DS_TAG = "deepspeed"
_STEP_DIR = re.compile(r"step-(\d{8})")


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Warm-up length in optimizer steps: ``ceil(warmup * total_steps)``, as the HF Trainer computes it."""
    return math.ceil(warmup * total_steps)


def cosine_factor(step: int, warm: int, total: int) -> float:
    """Learning-rate multiplier before optimizer step ``step``: linear 0 -> 1 over ``warm`` steps, then cosine to 0.

    The formula of ``transformers.get_cosine_schedule_with_warmup`` (the reference's ``cosine``).
    """
    if step < warm:
        return step / warm
    progress = (step - warm) / max(1, total - warm)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` (a fraction) of the ``steps``, then a cosine decay to zero."""
    warm = warmup_steps(steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, warm, steps))


def check_finite(loss: Tensor, step: int) -> None:
    """Raise ``FloatingPointError`` if ``loss`` is NaN or infinite, before it can poison the weights."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(
            f"loss is {loss.detach().float().flatten()[:4].tolist()} at optimizer step {step}; the last good checkpoint "
            "is kept: lower the learning rate or check the batch, then resume"
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints ``step-XXXXXXXX`` directly under ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and not is_temporary(path) and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (temporary siblings and incomplete dirs skipped)."""
    found = checkpoint_dirs(checkpoint_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (the reference keeps 3)."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep={keep} would delete the checkpoint a resume needs; keep at least 1")
    for _, path in checkpoint_dirs(checkpoint_dir)[:-keep]:
        shutil.rmtree(path)


class _Autocast(nn.Module):
    """Runs the wrapped model's forward under CUDA bf16 autocast (fp32 master weights, as the HF Trainer's bf16)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


class Engine:
    """AdamW over the ``requires_grad`` parameters with cosine warm-up, gradient accumulation, clipping and exact resume.

    Call ``engine.model(...)`` for the forward, then ``backward(loss)`` and ``step()`` after every
    micro-batch; ``step()`` returns True when an optimizer step happened (every ``grad_accum``
    micro-batches). ``seed`` seeds python, numpy and torch here; a resume overrides them with the
    checkpoint's RNG states.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        warmup: float = 0.03,
        total_steps: int,
        grad_accum: int = 1,
        clip: float = 1.0,
        precision: str = "fp32",
        backend: str = "torch",
        zero_stage: int = 2,
        micro_batch: int = 1,
        seed: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Engine: backend {backend!r} is not one of {BACKENDS}")
        if precision not in PRECISIONS:
            raise ValueError(f"Engine: precision {precision!r} is not one of {PRECISIONS}")
        if precision == "bf16" and not torch.cuda.is_available():
            raise ValueError("Engine: precision 'bf16' needs CUDA and none is available; use precision='fp32' on CPU")
        if total_steps < 1 or grad_accum < 1:
            raise ValueError(f"Engine: total_steps={total_steps} and grad_accum={grad_accum} must both be >= 1")
        self._named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("Engine: the model has no parameter with requires_grad=True; nothing to train")
        self.backend, self.grad_accum, self.clip = backend, grad_accum, clip
        self._micro = 0
        seed_everything(seed)
        schedule = functools.partial(cosine_with_warmup, steps=total_steps, warmup=warmup)
        if backend == "torch":
            self._module = _Autocast(model) if precision == "bf16" else model
            self._optimizer = torch.optim.AdamW([p for _, p in self._named], lr=lr, weight_decay=weight_decay)
            self._scheduler = schedule(self._optimizer)
            self._steps = 0
        else:
            config = deepspeed_config(
                stage=zero_stage, micro_batch=micro_batch, grad_accum=grad_accum, bf16=precision == "bf16", lr=lr,
                weight_decay=weight_decay, warmup_steps=warmup_steps(total_steps, warmup), total_steps=total_steps, clip=clip,
            )  # fmt: skip
            self._ds = _deepspeed_engine(model, [p for _, p in self._named], config, schedule)

    @property
    def model(self) -> nn.Module:
        """The module to call forward on: the model (under bf16 autocast if asked) or the DeepSpeed engine."""
        return self._module if self.backend == "torch" else self._ds

    @property
    def step_count(self) -> int:
        """Optimizer steps done."""
        return self._steps if self.backend == "torch" else self._ds.global_steps

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        scheduler = self._scheduler if self.backend == "torch" else self._ds.lr_scheduler
        return float(scheduler.get_last_lr()[0])

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled by 1/grad_accum: the mean over the effective batch)."""
        if self.backend == "torch":
            (loss / self.grad_accum).backward()
        else:
            self._ds.backward(loss)

    def step(self) -> bool:
        """End a micro-batch; at an accumulation boundary clip, step the optimizer and the schedule and return True."""
        self._micro += 1
        boundary = self._micro % self.grad_accum == 0
        if self.backend == "deepspeed":
            self._ds.step()
            return boundary
        if boundary:
            if self.clip > 0:
                nn.utils.clip_grad_norm_([p for _, p in self._named], self.clip)
            self._optimizer.step()
            self._scheduler.step()
            self._optimizer.zero_grad(set_to_none=True)
            self._steps += 1
        return boundary

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The full fp32 trainable weights on CPU (the fp32 master copies under DeepSpeed, gathered under ZeRO-3)."""
        if self.backend == "torch":
            return {name: p.detach().float().cpu().clone() for name, p in self._named}
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone() for name, p in self._named}

    def save_checkpoint(self, path: str | os.PathLike, client_state: dict[str, Any]) -> None:
        """Write the whole training state and ``client_state`` to the directory ``path``, atomically.

        ``client_state`` must hold what ``torch.load(weights_only=True)`` reads back (tensors,
        numbers, strings, lists, dicts). Only at an accumulation boundary (right after ``step()``
        returned True): gradients accumulated mid-window are not saved.
        """
        if self._micro % self.grad_accum:
            raise RuntimeError(
                f"save_checkpoint({path}): micro-batch {self._micro} is inside a gradient-accumulation window of "
                f"{self.grad_accum}; save right after step() returns True"
            )
        with _shared_atomic_dir(Path(path)) as tmp:
            state: dict[str, Any] = {"backend": self.backend, "step": self.step_count, "client_state": client_state}
            if self.backend == "torch":
                state |= {
                    "weights": self.trainable_state_dict(),
                    "optimizer": self._optimizer.state_dict(),
                    "scheduler": self._scheduler.state_dict(),
                }
            else:
                self._ds.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
            torch.save(rng_state(), tmp / f"rng-{_rank():05d}.pt")
            _barrier()
            if _rank() == 0:
                torch.save(state, tmp / STATE_FILE)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore everything :meth:`save_checkpoint` wrote to ``path``; returns its ``client_state``."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"load_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
        state = torch.load(path / STATE_FILE, weights_only=True)
        if state["backend"] != self.backend:
            raise ValueError(f"load_checkpoint: {path} was written by the {state['backend']!r} backend; "
                             f"this Engine runs {self.backend!r}")  # fmt: skip
        if self.backend == "torch":
            self._load_weights(state["weights"], path)
            self._optimizer.load_state_dict(state["optimizer"])
            self._scheduler.load_state_dict(state["scheduler"])
            self._steps = state["step"]
        else:
            self._ds.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False)
        rng = path / f"rng-{_rank():05d}.pt"
        if not rng.is_file():
            raise FileNotFoundError(f"load_checkpoint: {rng} is missing (was the checkpoint written with fewer ranks?)")
        set_rng_state(torch.load(rng, weights_only=True))
        self._micro = state["step"] * self.grad_accum
        return state["client_state"]

    def _load_weights(self, weights: dict[str, Tensor], path: Path) -> None:
        names = {name for name, _ in self._named}
        if set(weights) != names:
            raise ValueError(f"load_checkpoint: {path} holds other trainable weights than this model: missing "
                             f"{sorted(names - set(weights))[:5]}, unexpected {sorted(set(weights) - names)[:5]}")  # fmt: skip
        with torch.no_grad():
            for name, p in self._named:
                p.copy_(weights[name])


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def _shared_atomic_dir(path: Path) -> Iterator[Path]:
    """:func:`atomic_dir` for all ranks at once: rank 0 owns the temporary sibling, the others write into it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        with atomic_dir(path) as tmp:
            yield tmp
        return
    with atomic_dir(path) if dist.get_rank() == 0 else contextlib.nullcontext() as tmp:
        shared = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(shared, src=0)
        yield Path(shared[0])
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_engine(model: nn.Module, params: list[nn.Parameter], config: dict[str, Any], schedule: Any) -> Any:
    """``deepspeed.initialize`` on this process's rank (one rank on CPU/gloo when no launcher set one up)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # Plain gloo collectives on CPU: DeepSpeed's shared-memory op would be compiled with g++ on
        # first use (~80 s), and a rank killed during that build leaves a lock every later run waits on
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config, lr_scheduler=schedule)
    return engine
