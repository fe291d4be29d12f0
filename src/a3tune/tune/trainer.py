"""The A³Tune training loop: language-modelling loss + λ·alignment loss + β·load balance, resumable.

One micro-batch is one forward pass of the model with its adapters (``apply_adapters``), inside
two contexts: the MoE routing inputs (question span and image tokens of each sample) and, when the
alignment loss is on, the attention capture of the supervised heads (static: the probe's selected
heads; all; or every head, from which ``select_dynamic`` picks the top K per sample). The loss of
each sample's weak label comes from the capture (``alignment_loss``), never from N×N maps.

Resumption is exact: the sample stream is a fixed function of the seed (one permutation of the
training samples per epoch, concatenated), a checkpoint stores the engine's state (adapter
weights, optimizer, schedule, RNG) with the stream position and the log so far, and a resumed run
continues the same stream. Checkpoints live under a folder keyed by a fingerprint of the run's
settings and inputs, so a changed run never resumes from a stale one. A non-finite loss stops the
run with the step in the message; the last good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from a3tune.data.images import load_rgb, resolve_under
from a3tune.labels.model_inputs import label_maps
from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.layout import encode_batch, first_post_image_row
from a3tune.probe.head_scores import n_selected
from a3tune.tune.adapter_config import AdapterConfig, LoraSpec, MoeSpec
from a3tune.tune.adapters import apply_adapters, save_adapter
from a3tune.tune.alignment import alignment_loss, select_dynamic
from a3tune.tune.engine import Engine, check_finite, latest_checkpoint, prune_checkpoints
from a3tune.tune.moe import routing
from a3tune.tune.settings import TuneSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainData:
    """The training samples (sample_id, question, answer, path, label_row) and their label grids."""

    samples: pl.DataFrame
    root: Path
    grids: Any  # the labels store's ``grid`` array (n_labels, k, G, G)

    def __post_init__(self) -> None:
        if self.samples.is_empty():
            raise ValueError("tune: no training samples with a usable image")
        self._images: dict[str, np.ndarray] = {}

    def image(self, path: str) -> np.ndarray:
        if path not in self._images:
            self._images[path] = load_rgb(resolve_under(self.root, path))
        return self._images[path]


def sample_stream(n: int, seed: int, micro_batch: int, index: int) -> np.ndarray:
    """Sample indices of micro-batch ``index``: the epochs' seeded permutations, concatenated."""
    start, stop = index * micro_batch, (index + 1) * micro_batch
    out, epoch = [], start // n
    while epoch * n < stop:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
        out.append(order[lo:hi])
        epoch += 1
    return np.concatenate(out)


def adapter_config_for(
    settings: TuneSettings, base_model: str, heads: dict[int, list[int]] | None, record: dict[str, Any] | None = None
) -> AdapterConfig:
    """The adapter layout of a run: q/k deltas restricted to the static heads' rows in static mode;
    the settings (and ``record``, e.g. the run's provenance) go into the JSON config as they are."""
    static = settings.heads == "static"
    if static and not heads:
        raise ValueError("tune: heads static needs the probe's selected heads (heads.parquet)")
    return AdapterConfig(
        base_model=base_model,
        qk=settings.qk,
        lora=LoraSpec(**settings.lora),
        moe=MoeSpec(**settings.moe),
        heads={int(k): tuple(v) for k, v in heads.items()} if static else None,
        extra={"settings": settings.to_dict(), **(record or {})},
    )


def train(
    lvlm,
    settings: TuneSettings,
    data: TrainData,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    *,
    heads: dict[int, list[int]] | None = None,
    record: dict[str, Any] | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Train adapters on ``lvlm`` and write ``out_dir/adapter``; returns the per-micro-batch log (this rank's).

    Under a launcher (``WORLD_SIZE`` > 1: torchrun, DeepSpeed, SLURM via the CLI's ``--ranks``) every
    rank runs this with the DeepSpeed engine; rank 0 writes the adapter.
    """
    torch.manual_seed(settings.seed)
    model = lvlm.model
    config = adapter_config_for(settings, lvlm.source, heads, record)
    layout = apply_adapters(model, config)
    config = dataclasses.replace(config, extra={**config.extra, "adapters": layout})  # the run record
    if settings.align:
        enable_capture(model)
    text = model.config.text_config
    n_heads_total = text.num_hidden_layers * text.num_attention_heads
    dynamic_k = n_selected(settings.heads_top_k, n_heads_total) if settings.heads == "dynamic" else None
    capture_heads = heads if settings.heads == "static" else "all"

    # Ranks (a launcher's WORLD_SIZE/RANK): rank r takes every world-th micro-batch of the stream
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    grad_accum = settings.grad_accum(world)
    total_steps = settings.total_steps(data.samples.height)
    cuda = torch.cuda.is_available()
    backend = _pick(settings.backend, "deepspeed" if cuda or world > 1 else "torch")
    if world > 1 and backend != "deepspeed":
        raise ValueError(f"tune: {world} ranks need backend deepspeed (data parallel), got {backend!r}")
    engine = Engine(
        model, lr=settings.lr, weight_decay=settings.weight_decay, warmup=settings.warmup, total_steps=total_steps,
        grad_accum=grad_accum, precision=_pick(settings.precision, "bf16" if cuda else "fp32"), backend=backend,
        zero_stage=settings.zero_stage, micro_batch=settings.micro_batch, seed=settings.seed,
    )  # fmt: skip
    checkpoint_dir = Path(checkpoint_dir)
    cursor, rows = 0, []
    if (last := latest_checkpoint(checkpoint_dir)) is not None:
        state = engine.load_checkpoint(last)
        cursor, rows = state["cursor"], state["log"]
        log.info("tune: resumed from %s (optimizer step %d)", last, engine.step_count)

    device = next(p for p in model.parameters()).device
    total_micro = total_steps * grad_accum
    samples = data.samples
    bar = tqdm(total=total_steps, initial=engine.step_count, desc="tune", unit="step", disable=not progress or rank > 0,
               mininterval=1.0)  # fmt: skip
    for micro in range(cursor, total_micro):
        part = samples[sample_stream(samples.height, settings.seed, settings.micro_batch, micro * world + rank)]
        batch = encode_batch(lvlm, [data.image(p) for p in part["path"]], part["question"].to_list(),
                             part["answer"].to_list())  # fmt: skip
        maps, real = label_maps(data.grids, part["label_row"].to_list(), lvlm.n_image_tokens)
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        with contextlib.ExitStack() as stack:
            routed = stack.enter_context(routing(batch.question_span.to(device), batch.image_index.to(device)))
            captured = None
            if settings.align:
                captured = stack.enter_context(capture_attention(
                    heads=capture_heads, image_index=batch.image_index.to(device), labels=maps.to(device),
                    probabilities=settings.loss == "kl", row_start=first_post_image_row(batch.post_image),
                ))  # fmt: skip
            out = engine.model(**inputs, labels=batch.labels.to(device))
            parts = {"ce": out.loss}
            if captured is not None:
                selection = select_dynamic(captured, batch.post_image.to(device), dynamic_k) if dynamic_k else None
                parts["align"] = alignment_loss(captured, batch.post_image.to(device), real.to(device),
                                                variant=settings.loss, selection=selection,
                                                labels=maps.to(device)).mean()  # fmt: skip
            entropy = float("nan")  # no router without A³MoE
            if settings.qk == "moe":  # every adapted layer has key experts: their absence raises here
                entropy = float(routed.entropy().detach())
                if settings.beta > 0:
                    parts["balance"] = routed.balance_loss().mean()
        total = parts["ce"] + settings.lam * parts.get("align", 0.0) + settings.beta * parts.get("balance", 0.0)
        check_finite(total, engine.step_count)
        engine.backward(total)
        stepped = engine.step()
        values = {name: float(value.detach()) for name, value in parts.items()}
        rows.append({"micro_step": micro, "step": micro // grad_accum + 1, "loss": float(total.detach()), "ce": values["ce"],
                     "align": values.get("align", float("nan")), "balance": values.get("balance", float("nan")),
                     "routing_entropy": entropy, "lr": engine.lr, "labelled": int(real.any(dim=1).sum())})  # fmt: skip
        if stepped:
            bar.update(1)
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", refresh=False)
            if engine.step_count % settings.checkpoint_every == 0 and engine.step_count < total_steps:
                engine.save_checkpoint(checkpoint_dir / f"step-{engine.step_count:08d}", {"cursor": micro + 1, "log": rows})
                prune_checkpoints(checkpoint_dir, settings.keep_checkpoints)
    bar.close()
    gathered = engine.trainable_state_dict() if engine.backend == "deepspeed" else None  # collective: every rank
    if rank == 0:
        save_adapter(model, config, Path(out_dir) / "adapter", state=gathered)
    return pl.DataFrame(rows, schema=LOG_SCHEMA)


LOG_SCHEMA = {
    "micro_step": pl.Int64, "step": pl.Int64, "loss": pl.Float64, "ce": pl.Float64, "align": pl.Float64,
    "balance": pl.Float64, "routing_entropy": pl.Float64, "lr": pl.Float64, "labelled": pl.Int64,
}  # fmt: skip


def _pick(value: str, auto: str) -> str:
    return auto if value == "auto" else value

