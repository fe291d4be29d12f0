"""Benchmark of the head probe: capture (SDPA + one indicator call) against eager ``output_attentions``.

    python bench/probe_bench.py [--samples 8] [--batch 2] [--image-size 336] [--top 10]

Runs SmolLM2-135M-Instruct's trained weights as the language model of a LLaVA (30 layers x 9 heads,
GQA; a random tiny vision tower; ``a3tune.models.smollm2``) on phantom images and questions, with
each sample's ground-truth mask of the queried structure as its label. The same batches go through
the probe twice: once with the capture attention function, once with eager attention and
``output_attentions=True`` (the reference's way), the scores computed from the full probability
maps. Prints one table of runtime and peak extra memory (resident set high-water mark above the
level before the pass, reset through /proc/self/clear_refs) with their ratios, the largest score
difference between the two, and SmolLM2's top heads. ``--image-size 336`` gives the LLaVA v1.5
geometry (24 x 24 = 576 image tokens).
"""

from __future__ import annotations

import argparse

import torch
from _common import captures_from_probabilities, measure, phantom_batches

from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.smollm2 import build_smollm_llava
from a3tune.probe.head_scores import HeadScoreAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="probe samples (phantom VQA questions)")
    parser.add_argument("--batch", type=int, default=2, help="samples per forward pass")
    parser.add_argument("--image-size", type=int, default=336, help="vision input side P (patch 14)")
    parser.add_argument("--top", type=int, default=10, help="top heads to list")
    args = parser.parse_args()

    lvlm = build_smollm_llava(image_size=args.image_size)
    lvlm.model.eval()
    batches = phantom_batches(lvlm, args.samples, args.batch)
    text = lvlm.model.config.text_config
    n_tokens = batches[0][0].inputs["input_ids"].shape[1]

    with torch.no_grad():  # warm-up: first-call costs (allocator, kernels) belong to neither method
        lvlm.model(**batches[0][0].inputs)
    enable_capture(lvlm.model)
    captured, capture_s, capture_mb = measure(lambda: probe(lvlm, batches, text, eager=False))
    lvlm.model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa", "": "sdpa"})
    reference, eager_s, eager_mb = measure(lambda: probe(lvlm, batches, text, eager=True))

    ours, theirs = captured.table(top_k=args.top), reference.table(top_k=args.top)
    diff = max((ours[c] - theirs[c]).abs().max() for c in ("score", "inside_score"))
    print(f"head probe, SmolLM2-135M in LLaVA ({text.num_hidden_layers} layers x {text.num_attention_heads} heads), "
          f"{args.samples} samples, batch {args.batch}, ~{n_tokens} tokens ({lvlm.n_image_tokens} image)")
    print(f"| {'measure':<36} | {'capture':>10} | {'eager':>10} | {'capture / eager':>15} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    print(f"| {'wall time, s':<36} | {capture_s:>10.2f} | {eager_s:>10.2f} | {capture_s / eager_s:>15.2f} |")
    print(f"| {'peak extra memory, MB':<36} | {capture_mb:>10.0f} | {eager_mb:>10.0f} | {capture_mb / eager_mb:>15.3f} |")
    print(f"max |score difference| capture vs eager: {diff:.2e}")
    print(f"\ntop {args.top} heads by score (share of post-image attention on the image):")
    print(ours.sort("rank").head(args.top).select("rank", "layer", "head", "score", "inside_score"))


def probe(lvlm, batches, text, *, eager: bool) -> HeadScoreAccumulator:
    acc = HeadScoreAccumulator(text.num_hidden_layers, text.num_attention_heads)
    real = None
    for encoded, labels in batches:
        real = labels.sum(dim=2) > 0
        with torch.no_grad():
            if eager:
                attentions = lvlm.model(**encoded.inputs, output_attentions=True).attentions
                acc.add(captures_from_probabilities(attentions, encoded.image_index, labels), encoded.post_image, real)
                del attentions
            else:
                with capture_attention(heads="all", image_index=encoded.image_index, labels=labels) as captured:
                    lvlm.model(**encoded.inputs)
                acc.add(captured, encoded.post_image, real)
    return acc


if __name__ == "__main__":
    main()
