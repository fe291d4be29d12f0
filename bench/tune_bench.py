"""Benchmark of one training step: plain LoRA against A³Tune (static, dynamic) and the reference's eager path.

    python bench/tune_bench.py [--steps 2] [--batch 4] [--image-size 336] [--heads 0.125]
    python bench/tune_bench.py --sweep 300,600,1200 [--batch 4] [--sweep-heads 4]

Both modes run SmolLM2-135M-Instruct's trained weights as the language model of a LLaVA with a
random tiny vision tower (``a3tune.models.smollm2``; 30 layers x 9 heads, 3 KV heads), on CUDA when
there is one, else on the CPU.

Step mode (default). LLaVA-Med v1.5 geometry: 336 px, patch 14, so 576 image tokens per sample
(~640 tokens with the phantom questions and answers), batch 4. Phantom VQA samples with their
ground-truth masks as the weak labels; the four variants of ``_tune_steps`` (plain LoRA, A³Tune
static, A³Tune dynamic, reference eager), each on a fresh copy of the model. The selected heads
(static) are the top ``--heads`` of a probe on the same batches. Prints step time, peak memory and
its part above the level before the timed steps ("extra": activations, gradients, optimizer
updates), each as a ratio to plain LoRA; memory on CUDA is ``torch.cuda.max_memory_allocated``, on
the CPU the resident set's high-water mark (reset before the timed steps). Targets (issue 5):
A³Tune static <= 1.2x plain LoRA's step time and <= 1.15x its peak memory.

Sweep mode (``--sweep N1,N2,..``). Memory of ONE layer's attention statistics, forward + backward,
against the total sequence length N. What is measured, per N and path: the peak memory above the
level before the call of: one decoder layer's self-attention forward (q/k/v/o projections, RoPE
and the attention function the model dispatches to) on hidden states (B, N, hidden) that require
grad, then the statistics of ``--sweep-heads`` heads, the alignment loss from them, and its
backward to the hidden states. The layer's weights are frozen, its output is dropped (only the
loss from the statistics is differentiated); the hidden states, RoPE tables and masks are made
before the measurement. Inputs are synthetic, since memory depends on shapes, not values: random
hidden states, and at every N the same proportions: N/8 text tokens, then an image block of N/2
tokens, then 3N/8 post-image rows, one weak label on a quarter of the image. So every cost linear
in N grows 4x from N=300 to N=1200, every quadratic one 16x. Paths:

- capture: the model set up with ``enable_capture``, the layer run inside ``capture_attention`` on
  those heads (whatever the capture function computes now);
- eager: eager attention (the probabilities it returns, B x H x N x N), the statistics computed from
  them the reference's way (``_common.captures_from_probabilities``), as ``output_attentions=True``.

Memory here is tensors only, exactly: on CUDA ``max_memory_allocated``, on the CPU the running sum
of the allocations and frees the torch profiler records (``_common.tensor_peak``; the resident set
moves by allocator noise at these sizes). Prints N, each path's peak MB, its ratio to the smallest
N and the growth exponent p (peak ~ N^p). Targets: capture 1200/300 close to 4x (linear, p ~1),
eager close to 16x (quadratic, p ~2). Both paths also hold the layer's linear costs (projections,
gradients of the hidden states), so eager's ratio lies a little below 16x and approaches it as N
grows: its (B, H, N, N) probabilities and their gradient are its only quadratic terms.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from _common import captures_from_probabilities, phantom_batches, tensor_peak
from _tune_steps import (
    EAGER,
    STEP_HEADER,
    TARGETS,
    VARIANTS,
    free_memory,
    make_step,
    markdown_table,
    spread_heads,
    step_cells,
    time_steps,
    to_device,
)
from transformers.masking_utils import create_causal_mask

from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.smollm2 import build_smollm_llava
from a3tune.probe.head_scores import HeadScoreAccumulator, n_selected
from a3tune.tune.alignment import alignment_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (sweep: per forward)")
    parser.add_argument("--image-size", type=int, default=336, help="vision input side P (patch 14): 336 = 576 tokens")
    parser.add_argument("--heads", type=float, default=0.125, help="heads selected: a fraction (or count) of all")
    parser.add_argument("--sweep", type=_lengths, default=None, metavar="N1,N2,..",
                        help="sweep mode: one layer's attention-statistics memory at these total lengths")  # fmt: skip
    parser.add_argument("--sweep-heads", type=int, default=4, help="sweep mode: heads captured in the layer")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sweep:
        sweep(args.sweep, args.batch, args.sweep_heads, device)
    else:
        steps(args, device)


def _lengths(text: str) -> list[int]:
    lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    if not lengths or lengths[0] < 16:
        raise argparse.ArgumentTypeError(f"--sweep wants comma-separated lengths >= 16, got {text!r}")
    return lengths


def steps(args: argparse.Namespace, device: torch.device) -> None:
    base = build_smollm_llava(image_size=args.image_size)
    batches = phantom_batches(base, args.batch * (args.steps + 1), args.batch)
    text = base.model.config.text_config
    k = n_selected(args.heads, text.num_hidden_layers * text.num_attention_heads)
    heads = probe_heads(base, batches, k)
    batches = [to_device(encoded, labels, device) for encoded, labels in batches]

    results = {}
    for name in VARIANTS:
        step = make_step(copy.deepcopy(base.model).to(device), name, heads, k)
        results[name] = time_steps(step, batches, device)
        del step
        free_memory(device)

    n_tokens = batches[0][0].inputs["input_ids"].shape[1]
    print(f"training step on {device.type}, SmolLM2-135M in LLaVA ({text.num_hidden_layers} x "
          f"{text.num_attention_heads} heads), batch {args.batch}, ~{n_tokens} tokens ({base.n_image_tokens} image), "
          f"{k} selected heads, mean of {args.steps} steps")  # fmt: skip
    cells = step_cells(results)
    print(markdown_table(("variant", *STEP_HEADER, "target"), [(n, *cells[n], TARGETS.get(n, "")) for n in VARIANTS]))


def probe_heads(base, batches, k: int) -> dict[int, list[int]]:
    """The top-k heads by image share on these batches (what probe_heads would select)."""
    model = copy.deepcopy(base.model).eval()
    enable_capture(model)
    text = model.config.text_config
    acc = HeadScoreAccumulator(text.num_hidden_layers, text.num_attention_heads)
    for encoded, labels in batches:
        with torch.no_grad(), capture_attention(heads="all", image_index=encoded.image_index) as captured:
            model(**encoded.inputs)
        acc.add(captured, encoded.post_image)
    table = acc.table(top_k=k).filter("selected")
    heads: dict[int, list[int]] = {}
    for layer, head in zip(table["layer"], table["head"]):
        heads.setdefault(int(layer), []).append(int(head))
    return heads


def sweep(lengths: list[int], batch: int, n_heads: int, device: torch.device) -> None:
    """Print the attention-statistics memory of one layer per length and path (module docstring)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_smollm_llava(image_size=112).model.to(device, dtype).eval().requires_grad_(False)
    text = model.config.text_config
    layer = text.num_hidden_layers // 2
    heads = spread_heads(text.num_hidden_layers, text.num_attention_heads, n_heads)[layer]
    paths = ("capture", "eager")
    for path in paths:  # warm-up: one-time allocations (thread pools, kernels) stay out of the numbers
        stats_memory(model, layer, heads, lengths[0], batch, path)
    peaks = {n: {path: stats_memory(model, layer, heads, n, batch, path) for path in paths} for n in lengths}

    print(f"attention statistics of one layer (SmolLM2-135M layer {layer}: {text.num_attention_heads} heads, "
          f"{text.num_key_value_heads} KV heads; {len(heads)} heads {heads} captured), forward + backward, batch "
          f"{batch}, {dtype} on {device.type}; peak tensor MB above the level before, ratio to "
          f"N={lengths[0]} and growth exponent p (peak ~ N^p from N={lengths[0]}); targets at 4x N: capture ~4x "
          f"(linear, p ~1), eager ~16x (quadratic, p ~2)")  # fmt: skip
    rows = []
    for n, peak in peaks.items():
        cells = [str(n)]
        for path in paths:
            growth = peak[path] / peaks[lengths[0]][path]
            exponent = math.log(growth) / math.log(n / lengths[0]) if n != lengths[0] else float("nan")
            cells += [f"{peak[path]:.1f}", f"{growth:.2f}", "-" if n == lengths[0] else f"{exponent:.2f}"]
        rows.append(tuple(cells))
    header = ("N", "capture peak MB", "capture ratio", "capture p", "eager peak MB", "eager ratio", "eager p")
    print(markdown_table(header, rows))


def stats_memory(model, layer: int, heads: list[int], n: int, batch: int, path: str) -> float:
    """Peak MB above the level before of one layer's attention statistics + alignment loss, forward and backward."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    if path == "capture":
        enable_capture(model)
    else:
        model.set_attn_implementation(EAGER)
    language = model.model.language_model
    text = model.config.text_config
    generator = torch.Generator().manual_seed(n)
    hidden = torch.randn(batch, n, text.hidden_size, generator=generator).to(device, dtype).requires_grad_()
    positions = torch.arange(n, device=device)[None].expand(batch, -1)
    rope = language.rotary_emb(hidden, positions)
    ones = torch.ones(batch, n, dtype=torch.long, device=device)
    mask = create_causal_mask(text, hidden, ones, None, position_ids=positions)
    start, n_img = n // 8, n // 2
    image_index = (start + torch.arange(n_img, device=device))[None].expand(batch, -1).contiguous()
    post_image = torch.zeros(batch, n, dtype=torch.bool, device=device)
    post_image[:, start + n_img :] = True
    labels = torch.zeros(batch, 1, n_img, device=device)
    labels[:, :, : n_img // 4] = 1
    real = torch.ones(batch, 1, dtype=torch.bool, device=device)
    attention = language.layers[layer].self_attn

    def run() -> None:
        if path == "capture":
            with capture_attention(heads={layer: heads}, image_index=image_index, labels=labels) as captured:
                output, _ = attention(hidden, position_embeddings=rope, attention_mask=mask)
        else:
            output, probabilities = attention(hidden, position_embeddings=rope, attention_mask=mask)
            captured = captures_from_probabilities([probabilities[:, heads]], image_index, labels)
            del probabilities
        del output  # only the statistics' loss is differentiated
        alignment_loss(captured, post_image, real).sum().backward()

    _, extra = tensor_peak(run, device)
    hidden.grad = None
    free_memory(device)
    return extra


if __name__ == "__main__":
    main()
