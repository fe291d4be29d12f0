"""Benchmark of one training step: plain LoRA against A³Tune (static, dynamic) and the reference's eager path.

    python bench/tune_bench.py [--steps 3] [--batch 2] [--image-size 224] [--heads 0.125]

One model and input set (SmolLM2-135M-Instruct's trained weights in a LLaVA with a random tiny
vision tower, ``a3tune.models.smollm2``; phantom VQA samples with their ground-truth masks as the
weak labels), four ways to train it, each on a fresh copy of the model:

- plain LoRA: LoRA (r 64) on every linear layer of the language model, q/k included; CE only;
- A³Tune static: A³MoE on q/k restricted to the selected heads' rows, LoRA on V/O/MLP, CE + λ·
  alignment loss from the capture attention function on the selected heads only;
- A³Tune dynamic: the same without row restriction, capture on every head, top-K re-chosen per
  sample per step;
- reference eager: as dynamic, but with eager attention and ``output_attentions=True`` and the loss
  computed from the full L x H x N x N probabilities, as the reference code does.

The selected heads (static) are the top ``--heads`` of a probe on the same batches. Prints step
time and peak extra memory (resident high-water mark above the level before the steps) of each,
as ratios to the plain-LoRA step, with the targets of issue 5 (static <= 1.2x time, <= 1.15x memory).
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import captures_from_probabilities, measure, phantom_batches

from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.smollm2 import build_smollm_llava
from a3tune.probe.head_scores import HeadScoreAccumulator, n_selected
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.adapters import apply_adapters
from a3tune.tune.alignment import alignment_loss, select_dynamic
from a3tune.tune.moe import routing

LAM = 0.03
EAGER = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--image-size", type=int, default=224, help="vision input side P (patch 14)")
    parser.add_argument("--heads", type=float, default=0.125, help="heads selected: a fraction (or count) of all")
    args = parser.parse_args()

    base = build_smollm_llava(image_size=args.image_size)
    batches = phantom_batches(base, args.batch * (args.steps + 1), args.batch)
    text = base.model.config.text_config
    k = n_selected(args.heads, text.num_hidden_layers * text.num_attention_heads)
    heads = probe_heads(base, batches, k)

    results = {}
    for name in ("plain LoRA", "A3Tune static", "A3Tune dynamic", "reference eager"):
        results[name] = time_variant(make_step(base, name, heads, k), batches, args.steps)

    n_tokens = batches[0][0].inputs["input_ids"].shape[1]
    print(f"training step, SmolLM2-135M in LLaVA ({text.num_hidden_layers} x {text.num_attention_heads} heads), "
          f"batch {args.batch}, ~{n_tokens} tokens ({base.n_image_tokens} image), {k} selected heads, "
          f"mean of {args.steps} steps")  # fmt: skip
    lora_s, lora_mb = results["plain LoRA"]
    targets = {"A3Tune static": ("<= 1.2", "<= 1.15")}
    print(f"| {'variant':<16} | {'step, s':>8} | {'peak extra MB':>13} | {'time ratio':>10} | {'memory ratio':>12} | target |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 15}|{'-' * 12}|{'-' * 14}|--------|")
    for name, (seconds, megabytes) in results.items():
        target = "{} / {}".format(*targets[name]) if name in targets else ""
        print(f"| {name:<16} | {seconds:>8.2f} | {megabytes:>13.0f} | {seconds / lora_s:>10.2f} | "
              f"{megabytes / lora_mb:>12.2f} | {target} |")  # fmt: skip


def time_variant(step, batches, steps: int) -> tuple[float, float]:
    """Seconds per step and peak extra memory (MB) of ``steps`` steps after one warm-up step."""
    step(*batches[0])
    _, seconds, megabytes = measure(lambda: [step(*b) for b in batches[1:]])
    return seconds / steps, megabytes


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


def make_step(base, name: str, heads: dict[int, list[int]], k: int):
    """A closure running one optimizer step of ``name`` on a fresh copy of the base model."""
    model = copy.deepcopy(base.model).train()
    qk = "lora" if name == "plain LoRA" else "moe"
    static = name == "A3Tune static"
    apply_adapters(model, AdapterConfig(base_model="bench", qk=qk, heads=heads if static else None))
    if name == "reference eager":
        model.set_attn_implementation(EAGER)
    elif name != "plain LoRA":
        enable_capture(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(encoded, labels):
        real = labels.sum(dim=2) > 0
        with routing(encoded.question_span, encoded.image_index):
            if name == "plain LoRA":
                loss = model(**encoded.inputs, labels=encoded.labels).loss
            elif name == "reference eager":
                out = model(**encoded.inputs, labels=encoded.labels, output_attentions=True)
                captured = captures_from_probabilities(out.attentions, encoded.image_index, labels)
                selection = select_dynamic(captured, encoded.post_image, k)
                loss = out.loss + LAM * alignment_loss(captured, encoded.post_image, real, selection=selection).mean()
            else:
                with capture_attention(heads=heads if static else "all", image_index=encoded.image_index,
                                       labels=labels) as captured:  # fmt: skip
                    out = model(**encoded.inputs, labels=encoded.labels)
                selection = None if static else select_dynamic(captured, encoded.post_image, k)
                loss = out.loss + LAM * alignment_loss(captured, encoded.post_image, real, selection=selection).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    main()
