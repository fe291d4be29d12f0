"""The training steps the tuning benchmarks compare, shared by ``tune_bench.py`` and ``gpu_check.py``.

Four variants of one optimizer step on one model and batch, each on its own fresh model:

- ``plain LoRA``: LoRA (r 64) on every linear layer of the language model, q/k included; CE only;
- ``A3Tune static``: A³MoE on the selected heads' queries and (head-scoped) keys, LoRA on V/O/MLP, CE + λ·
  alignment loss from the capture attention function on the selected heads only;
- ``A3Tune dynamic``: the same without row restriction, capture on every head, top-K re-chosen per
  sample per step;
- ``reference eager``: as dynamic, but with eager attention and ``output_attentions=True`` and the
  loss computed from the full L x H x N x N probabilities, as the reference code does.

Timing: one warm-up step, then the timed steps; memory as ``_common.measure_memory`` (CPU: resident
high-water mark; CUDA: ``max_memory_allocated``), both the peak and its part above the level before
the timed steps (weights, optimizer state and warm-up leftovers excluded).
"""

from __future__ import annotations

import dataclasses
import gc
import math

import torch
from _common import captures_from_probabilities, measure_memory

from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.layout import Batch
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.adapters import apply_adapters
from a3tune.tune.alignment import alignment_loss, select_dynamic
from a3tune.tune.moe import routing

LAM = 0.03
EAGER = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}
VARIANTS = ("plain LoRA", "A3Tune static", "A3Tune dynamic", "reference eager")
TARGETS = {"A3Tune static": "target <= 1.2 time, <= 1.15 memory"}  # issue 5, against plain LoRA
STEP_HEADER = ("step, s", "peak MB", "extra MB", "time x", "peak x", "extra x")


@dataclasses.dataclass(frozen=True)
class StepTiming:
    seconds: float  # per timed step
    peak_mb: float  # peak memory during the timed steps
    extra_mb: float  # of which above the level before them


def prepare_variant(model: torch.nn.Module, name: str, heads: dict[int, list[int]]) -> torch.nn.Module:
    """Freeze ``model`` and give it variant ``name``'s adapters and attention function, in place."""
    qk = "lora" if name == "plain LoRA" else "moe"
    static = name == "A3Tune static"
    apply_adapters(model, AdapterConfig(base_model="bench", qk=qk, heads=heads if static else None))
    if name == "reference eager":
        model.set_attn_implementation(EAGER)
    elif name != "plain LoRA":
        enable_capture(model)
    return model.train()


def variant_loss(name: str, heads: dict[int, list[int]], k: int):
    """``loss(forward, encoded, labels)``: variant ``name``'s training loss; ``forward`` is the model or an engine."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; one of {VARIANTS}")
    static = name == "A3Tune static"

    def loss(forward, encoded: Batch, labels: torch.Tensor) -> torch.Tensor:
        real = labels.sum(dim=2) > 0
        with routing(encoded.question_span, encoded.image_index):
            if name == "plain LoRA":
                return forward(**encoded.inputs, labels=encoded.labels).loss
            if name == "reference eager":
                out = forward(**encoded.inputs, labels=encoded.labels, output_attentions=True)
                captured = captures_from_probabilities(out.attentions, encoded.image_index, labels)
                selection = select_dynamic(captured, encoded.post_image, k)
            else:
                with capture_attention(heads=heads if static else "all", image_index=encoded.image_index,
                                       labels=labels) as captured:  # fmt: skip
                    out = forward(**encoded.inputs, labels=encoded.labels)
                selection = None if static else select_dynamic(captured, encoded.post_image, k)
        return out.loss + LAM * alignment_loss(captured, encoded.post_image, real, selection=selection).mean()

    return loss


def make_step(model: torch.nn.Module, name: str, heads: dict[int, list[int]], k: int):
    """Prepare ``model`` (a fresh one: it is changed in place) for ``name``; a closure running one AdamW step."""
    prepare_variant(model, name, heads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_of = variant_loss(name, heads, k)

    def step(encoded: Batch, labels: torch.Tensor) -> None:
        loss_of(model, encoded, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, batches: list, device: torch.device) -> StepTiming:
    """Seconds per step and peak memory of ``step`` over ``batches[1:]``, after a warm-up on ``batches[0]``."""
    step(*batches[0])
    _, seconds, peak, extra = measure_memory(lambda: [step(*b) for b in batches[1:]], device)
    return StepTiming(seconds / (len(batches) - 1), peak, extra)


def spread_heads(layers: int, heads: int, per_layer: int) -> dict[int, list[int]]:
    """``per_layer`` evenly spaced heads of every layer (heads 0, 8, 16, 24 of 32 for 4): a fixed static selection."""
    per_layer = min(per_layer, heads)
    return {layer: [i * heads // per_layer for i in range(per_layer)] for layer in range(layers)}


def to_device(encoded: Batch, labels: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """The batch and its weak labels on ``device``; pixel values in ``dtype`` when given."""
    inputs = {name: t.to(device) for name, t in encoded.inputs.items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    moved = {f.name: getattr(encoded, f.name) for f in dataclasses.fields(encoded) if f.name != "inputs"}
    moved = {name: None if t is None else t.to(device) for name, t in moved.items()}
    return Batch(inputs=inputs, **moved), labels.to(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, hand the allocator's cached blocks back (call after ``del model``)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(value: float, reference: float, floor: float = 0.0) -> str:
    """``value / reference`` formatted, or ``n/a`` when the reference is not above ``floor`` (nothing to compare)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference <= floor:
        return "n/a"
    return f"{value / reference:.2f}"


def step_cells(results: dict[str, StepTiming]) -> dict[str, tuple[str, ...]]:
    """Per variant the cells of :data:`STEP_HEADER`, ratios against plain LoRA (``extra x``: n/a below 1 MB,
    which only a tiny CPU run reaches)."""
    lora = results["plain LoRA"]
    cells = {}
    for name, r in results.items():
        cells[name] = (f"{r.seconds:.3f}", f"{r.peak_mb:.0f}", f"{r.extra_mb:.0f}", ratio(r.seconds, lora.seconds),
                       ratio(r.peak_mb, lora.peak_mb), ratio(r.extra_mb, lora.extra_mb, floor=1.0))  # fmt: skip
    return cells


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A markdown table with columns padded to their widest cell."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
