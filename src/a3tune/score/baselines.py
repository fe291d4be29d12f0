"""Inference-time baselines against hallucination, applied to the plain-LoRA model (reference §9.5).

Both are ``transformers`` logits processors built per prompt batch, so they plug into
``a3tune.score.generation.generate_answers(..., logits_processors=[factory])`` where ``factory`` is
``functools.partial(pai_processor, lvlm, **settings)`` or ``functools.partial(vcd_processor, lvlm, **settings)``
(called with the encoded prompt batch). Each runs a second, contrast pass of the same model on
other inputs for the same generated tokens, with its own KV cache, so they need one row per
sample (``num_beams=1``; the reference decodes PAI greedily and VCD by sampling).

**PAI** (Liu et al., ECCV 2024, "Paying More Attention to Image"), as its code does it:

- attention amplification: in language-model layers ``layers_from``.. L-1 (0-based; PAI's
  ``range(start_layer=2, end_layer=32)`` of LLaVA's 32 layers), the pre-softmax attention logits
  z of the last query row (the token being predicted from) at the image columns become
  ``z + α·|z|`` (α = 0.2), then the row is softmaxed as usual. It is a registered attention
  function (:data:`PAI_ATTENTION`, ``AttentionInterface``; eager softmax while amplifying, SDPA
  otherwise) that :func:`amplify_attention` switches the language model to for a block;
- image-free contrast (classifier-free guidance): with s = log_softmax(l_img) and u =
  log_softmax(l_noimg) the next-token log-probabilities with and without the image, the scores
  become ``γ·s − (γ−1)·u`` (γ = 1.1; PAI computes ``γ·(s − u) + u``, the same). The image-free
  prompt is the prompt with its image tokens removed, decoded without amplification. γ = 1 skips
  the contrast pass and leaves the scores as they are.

**VCD** (Leng et al., CVPR 2024, visual contrastive decoding), as its code does it: v' is the
processor-normalised image at step t = ``noise_step`` of forward diffusion,
``v' = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·ε``, ε ~ N(0, I) (seeded), ᾱ_t = Π_{s<=t} (1 − β_s) (VCD's
``add_diffusion_noise``: the cumulative product *through* t, t in 0..999) over its 1000-step *sigmoid*
schedule β_s = sigmoid(linspace(−6, 6, 1000))_s·(5e-3 − 1e-5) + 1e-5; VCD's default t is 500.
With l(v), l(v') the next-token logits, the scores become
``(1 + α)·l(v) − α·l(v')`` (α = 1) on the tokens with ``p(v) >= β·max p(v)`` (β = 0.1, the
adaptive plausibility constraint, i.e. ``l(v) >= log β + max l(v)``) and −inf elsewhere; the
reference then samples at temperature 1 (``DecodeSettings(do_sample=True)``), greedy also works.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from a3tune.compat import ensure_torchvision

ensure_torchvision()  # importing transformers' modeling code imports torchvision

from transformers import AttentionInterface, LogitsProcessor  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from a3tune.context_value import bound  # noqa: E402
from a3tune.models.key_scope import scoped_attention_inputs  # noqa: E402
from a3tune.models.layout import Batch, pad_token_id  # noqa: E402
from a3tune.models.lvlm import LoadedLvlm  # noqa: E402
from a3tune.tune.moe import RoutingState, activate  # noqa: E402

PAI_ATTENTION = "a3tune_pai"
DIFFUSION_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class _Amplification:
    alpha: float
    layers_from: int
    image_index: Tensor  # (B, n_img) long, positions in the prompt (and so in the KV cache)


_AMPLIFY: contextvars.ContextVar[_Amplification | None] = contextvars.ContextVar("a3tune_pai_amplify", default=None)


@contextlib.contextmanager
def amplification(image_index: Tensor, *, alpha: float = 0.2, layers_from: int = 2) -> Iterator[None]:
    """Amplify in :data:`PAI_ATTENTION` layers during the block (the model must already use that function).

    ``image_index``: (B, n_img) image positions of the prompt batch (``Batch.image_index``); beam
    search's repeated rows are served too.
    """
    if alpha < 0 or layers_from < 0:
        raise ValueError(f"PAI needs alpha >= 0 and layers_from >= 0, got {alpha}, {layers_from}")
    with bound(_AMPLIFY, _Amplification(float(alpha), int(layers_from), image_index)):
        yield


@contextlib.contextmanager
def amplify_attention(lvlm: LoadedLvlm, image_index: Tensor, *, alpha: float = 0.2, layers_from: int = 2) -> Iterator[None]:
    """PAI's amplification for the forward passes (and generate calls) inside the block: switches the
    language model to :data:`PAI_ATTENTION`, and back to its previous function at the end."""
    model = lvlm.model
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": PAI_ATTENTION})
    try:
        with amplification(image_index, alpha=alpha, layers_from=layers_from):
            yield
    finally:
        model.set_attn_implementation({"text_config": previous})


def pai_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """SDPA, except in an amplified layer: softmax of the logits with the last row's image columns z -> z + α|z|."""
    request = _AMPLIFY.get()
    attending, key, value = scoped_attention_inputs(module, key, value)  # head-scoped keys of an A³Tune adapter
    if request is None or module.layer_idx < request.layers_from:
        return sdpa_attention_forward(
            attending, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(attending, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query @ key.transpose(-1, -2)).float() * scale  # (B, H, q, kv)
    logits = _masked(logits, attention_mask, is_causal if is_causal is not None else getattr(module, "is_causal", True))
    index = request.image_index.to(query.device)
    index = index.repeat_interleave(query.shape[0] // index.shape[0], dim=0)  # beam search repeats each sample
    columns = index[:, None, :].expand(-1, logits.shape[1], -1)
    last = logits[:, :, -1]
    z = last.gather(-1, columns)
    last = last.scatter(-1, columns, z + request.alpha * z.abs())
    logits = torch.cat([logits[:, :, :-1], last[:, :, None]], dim=2)
    output = logits.softmax(dim=-1).to(value.dtype) @ value
    return output.transpose(1, 2).contiguous(), None


def _masked(logits: Tensor, attention_mask: Tensor | None, is_causal: bool) -> Tensor:
    """Apply SDPA's mask (None: causal, aligned to the last key; bool: True = attend; float: additive)."""
    q_length, kv_length = logits.shape[-2:]
    if attention_mask is None:
        if not is_causal or q_length == 1:
            return logits
        rows = torch.arange(kv_length - q_length, kv_length, device=logits.device)
        attention_mask = rows[:, None] >= torch.arange(kv_length, device=logits.device)
    if attention_mask.dtype == torch.bool:
        return logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
    return logits + attention_mask.float()


class _ContrastPass:
    """The model on other prompt inputs, fed the generated tokens as they come, with its own KV cache.

    Runs without PAI amplification and with its own A³MoE routing state (None: no routing inputs).
    """

    def __init__(self, lvlm: LoadedLvlm, inputs: dict[str, Tensor], prompt_length: int, routing: RoutingState | None) -> None:
        device = lvlm.model.device
        self.model = lvlm.model
        self.inputs = {name: value.to(device) for name, value in inputs.items()}
        self.prompt_length, self.routing = prompt_length, routing
        self.cache, self.seen = None, prompt_length

    def logits(self, input_ids: Tensor) -> Tensor:
        """(B, V) float32 next-token logits of the contrast inputs followed by ``input_ids``' generated tokens."""
        rows = self.inputs["input_ids"].shape[0]
        if input_ids.shape[0] != rows:
            raise ValueError(f"contrastive decoding needs num_beams=1: {rows} prompts but {input_ids.shape[0]} rows")
        with torch.no_grad(), activate(self.routing), bound(_AMPLIFY, None):
            if self.cache is None:
                if input_ids.shape[1] != self.prompt_length:
                    raise RuntimeError("a contrastive processor serves one generate call from its prompt on; build a new one")
                out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
            else:
                new = input_ids[:, self.seen :]
                mask = self.inputs["attention_mask"]
                self.inputs["attention_mask"] = torch.cat([mask, mask.new_ones(new.shape)], dim=1)
                positions = self.inputs["position_ids"][:, -1:] + torch.arange(1, new.shape[1] + 1, device=new.device)
                self.inputs["position_ids"] = positions
                out = self.model(input_ids=new, attention_mask=self.inputs["attention_mask"], position_ids=positions,
                                 cache=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        self.cache, self.seen = out.cache, input_ids.shape[1]
        return out.logits[:, -1].float()


def image_free_inputs(lvlm: LoadedLvlm, batch: Batch) -> dict[str, Tensor]:
    """The prompts of ``batch`` with their image tokens (and padding) removed, left-padded again, positions from 0."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    rows = [row[keep] for row, keep in zip(ids, mask & (ids != lvlm.image_token_id), strict=True)]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id(lvlm.processor.tokenizer), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    position_ids = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :] = row
        attention_mask[b, length - len(row) :] = 1
        position_ids[b, length - len(row) :] = torch.arange(len(row))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class PaiProcessor(LogitsProcessor, contextlib.AbstractContextManager):
    """PAI for one prompt batch: a context manager that amplifies attention while generating, and the
    logits processor of the image-free contrast (``γ·log_softmax(l_img) − (γ−1)·log_softmax(l_noimg)``)."""

    def __init__(self, lvlm: LoadedLvlm, batch: Batch, *, alpha: float, gamma: float, layers_from: int) -> None:
        if gamma < 1:
            raise ValueError(f"PAI's guidance gamma must be >= 1, got {gamma}")
        self.lvlm, self.batch, self.alpha, self.gamma, self.layers_from = lvlm, batch, alpha, gamma, layers_from
        prompt_length = batch.inputs["input_ids"].shape[1]
        self.contrast = _ContrastPass(lvlm, image_free_inputs(lvlm, batch), prompt_length, routing=None)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> PaiProcessor:
        self._stack.enter_context(
            amplify_attention(self.lvlm, self.batch.image_index, alpha=self.alpha, layers_from=self.layers_from)
        )
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.gamma == 1:
            return scores
        image_free = self.contrast.logits(input_ids).log_softmax(dim=-1).to(scores.dtype)
        return self.gamma * scores.log_softmax(dim=-1) - (self.gamma - 1) * image_free


def pai_processor(
    lvlm: LoadedLvlm, batch: Batch, *, alpha: float = 0.2, gamma: float = 1.1, layers_from: int = 2
) -> PaiProcessor:
    """PAI (module docstring) for the prompt ``batch``; the reference's settings are the defaults."""
    return PaiProcessor(lvlm, batch, alpha=alpha, gamma=gamma, layers_from=layers_from)


def diffusion_noise(pixel_values: Tensor, noise_step: int, *, seed: int = 0) -> Tensor:
    """``sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε`` over VCD's sigmoid β schedule, ε from a generator seeded with ``seed``."""
    if not 0 <= noise_step < DIFFUSION_STEPS:
        raise ValueError(f"noise_step must be in [0, {DIFFUSION_STEPS - 1}], got {noise_step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.prod(1 - betas[: noise_step + 1])  # through step t, as VCD's alphas_prod[t]
    noise = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noised = alpha_bar.sqrt() * pixel_values.cpu().double() + (1 - alpha_bar).sqrt() * noise
    return noised.to(pixel_values.device, pixel_values.dtype)


class VcdProcessor(LogitsProcessor):
    """VCD for one prompt batch: ``(1+α)·l(v) − α·l(v')`` where ``p(v) >= β·max p(v)``, −inf elsewhere."""

    def __init__(self, lvlm: LoadedLvlm, batch: Batch, *, alpha: float, beta: float, noise_step: int, seed: int) -> None:
        if alpha < 0 or not 0 < beta <= 1:
            raise ValueError(f"VCD needs alpha >= 0 and beta in (0, 1], got {alpha}, {beta}")
        self.alpha, self.log_beta = alpha, math.log(beta)
        inputs = {**batch.inputs, "pixel_values": diffusion_noise(batch.inputs["pixel_values"], noise_step, seed=seed)}
        routing = RoutingState(question_span=batch.question_span, image_index=batch.image_index)
        self.contrast = _ContrastPass(lvlm, inputs, batch.inputs["input_ids"].shape[1], routing)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        noised = self.contrast.logits(input_ids).to(scores.dtype)
        combined = (1 + self.alpha) * scores - self.alpha * noised
        cutoff = self.log_beta + scores.max(dim=-1, keepdim=True).values
        return combined.masked_fill(scores < cutoff, -math.inf)


def vcd_processor(
    lvlm: LoadedLvlm, batch: Batch, *, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0
) -> VcdProcessor:
    """VCD (module docstring) for the prompt ``batch``; the reference's settings are the defaults."""
    return VcdProcessor(lvlm, batch, alpha=alpha, beta=beta, noise_step=noise_step, seed=seed)


AttentionInterface.register(PAI_ATTENTION, pai_attention_forward)
AttentionMaskInterface.register(PAI_ATTENTION, sdpa_mask)
