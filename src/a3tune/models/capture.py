"""Attention statistics of selected heads without eager attention or N×N probability maps.

The reference forces eager attention in every layer and keeps all L×H×N×N probabilities to score
heads and to compute the alignment loss. Both need much less: per query row t, the share of the
row's attention on the image, ``s_t = Σ_{j∈image} A[t, j]``, and the mass inside each weak label
``a_{t,i} = Σ_{j∈image} A[t, j]·m_i[j]`` (DESIGN §4.2). Those are ``A·V`` for a value matrix whose
channels are indicators on the key positions: ``[1_image, m_1 .. m_k]`` scattered onto the image
tokens, zeros elsewhere. So one extra SDPA call of the selected heads' queries against their keys,
with those indicator channels as values and the layer's own mask, gives ``s`` and ``a`` exactly,
differentiably, and without ever materialising the probabilities.

How it plugs in: transformers picks each layer's attention function by
``config._attn_implementation`` from ``AttentionInterface``. :data:`CAPTURE_ATTENTION` is
registered there at import; it computes the layer output with transformers' own SDPA function (so
the logits are SDPA's) and, only while a :func:`capture_attention` block is active in the current
context, adds the indicator call for the requested layers and heads. The request lives in a
``ContextVar``; outside a block the function is plain SDPA.

Masks: for a name it does not know, transformers' ``create_causal_mask`` returns ``None`` (it
assumes a backend that masks by itself), which would silently drop padding. The name is therefore
also registered in ``AttentionMaskInterface`` with SDPA's mask builder, so the function receives
exactly what SDPA receives: ``None`` (plain causal, use ``is_causal``) or a boolean
(B, 1, N, N) mask, True = attend.

Cost (DESIGN §4.2): only the rows ``row_start``.. are computed (the caller passes the first
post-image row; earlier rows of ``image_share``/``inside`` are zeros), with an explicit boolean
mask for them, in the model's dtype, and with the indicator channels zero-padded to the head dim,
so a fused kernel (flash attention, on CPU and CUDA) takes the call: memory grows linearly with
the sequence length. The kernel accumulates in float32 and rounds its output to the model's dtype:
in bf16 the statistics keep about three significant digits, which the tests bound for the loss.
They ignore attention dropout (they describe the attention distribution itself). A row that sees
no key at all gets zeros.

The optional probabilities for a KL loss are the rows × image columns block of the selected
heads, from the image columns' logits only (the softmax over the image columns, times the row's
image share, is the full softmax there), never rows × N.

Grouped-query layers with head-scoped keys (``a3tune.models.key_scope``) give each query head its
own key, in the layer output and in the capture alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from a3tune.compat import ensure_torchvision
from a3tune.context_value import bound

ensure_torchvision()  # importing transformers' modeling code imports torchvision

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from a3tune.models.key_scope import scoped_attention_inputs  # noqa: E402

CAPTURE_ATTENTION = "a3tune_capture"
# The SDPA backends the capture's own call may use; None lets torch choose (a test and
# bench/gpu_check.sh set fused backends only, to prove one of them accepts the call).
CAPTURE_SDPA_BACKENDS: list[SDPBackend] | None = None


@dataclasses.dataclass
class LayerCapture:
    """What one language-model layer's selected heads did in the forward pass of a capture block."""

    heads: Tensor  # (h,) long, head indices
    image_share: Tensor  # (B, h, N) attention share on the image tokens, per query row
    inside: Tensor | None  # (B, h, k, N) attention mass inside each label map, per query row
    probabilities: Tensor | None  # (B, h, N - row_start, n_img) rows row_start.. × image columns
    row_start: int


@dataclasses.dataclass(frozen=True)
class _Request:
    heads: Mapping[int, Tensor] | None  # None: every head of every layer
    image_index: Tensor  # (B, n_img) long
    labels: Tensor | None  # (B, k, n_img) float
    probabilities: bool
    row_start: int
    results: dict[int, LayerCapture]


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("a3tune_capture_request", default=None)


def capture_implementation() -> dict[str, str]:
    """``attn_implementation`` for ``from_pretrained``/``from_config``: capture in the language model only."""
    return {"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa", "": "sdpa"}


def enable_capture(model: torch.nn.Module) -> None:
    """Switch a built model's language model to the capture function; a vision tower keeps its own.

    Works for ``LlavaForConditionalGeneration``-like models (a ``text_config`` sub-config) and plain
    causal LMs. Raises if the language model's config does not end up with the capture function.
    """
    config = model.config
    has_text_config = "text_config" in getattr(config, "sub_configs", {})
    model.set_attn_implementation(capture_implementation() if has_text_config else CAPTURE_ATTENTION)
    actual = config.get_text_config()._attn_implementation
    if actual != CAPTURE_ATTENTION:
        raise RuntimeError(
            f"enable_capture: {type(model).__name__}'s language model still uses attention {actual!r} "
            f"after set_attn_implementation; it does not dispatch through AttentionInterface"
        )


@contextlib.contextmanager
def capture_attention(
    *,
    heads: Mapping[int, Sequence[int]] | Literal["all"],
    image_index: Tensor,
    labels: Tensor | None = None,
    probabilities: bool = False,
    row_start: int = 0,
) -> Iterator[dict[int, LayerCapture]]:
    """Capture image share / label mass (and optionally probabilities) of selected heads.

    ``heads``: layer index -> head indices of that layer, or ``"all"`` for every head of every
    language-model layer. ``image_index``: (B, n_img) positions of the image tokens in each
    sequence, in the label maps' (row-major grid) order. ``labels``: (B, k, n_img) weights in
    [0, 1] on those tokens, or None. ``probabilities``: also keep the block of rows ``row_start``..N
    × image columns. Yields a dict, filled during forward passes inside the block,
    layer index -> :class:`LayerCapture`; a layer that runs again (activation-checkpointing
    recompute, see :func:`checkpoint_context`) overwrites its entry. Layers named in ``heads`` that
    the model does not have are simply absent. The model must use :data:`CAPTURE_ATTENTION` (see
    :func:`enable_capture`); blocks cannot be nested.
    """
    if _REQUEST.get() is not None:
        raise RuntimeError("capture_attention blocks cannot be nested: one request per forward pass")
    request = _Request(
        heads=_head_tensors(heads),
        image_index=_check_image_index(image_index),
        labels=_check_labels(labels, image_index),
        probabilities=probabilities,
        row_start=_check_row_start(row_start),
        results={},
    )
    with bound(_REQUEST, request):
        yield request.results


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for non-reentrant activation checkpointing, so a recompute captures like its forward.

    Checkpointing reruns a layer when backward needs its activations, often after the capture block
    has ended or on an autograd worker thread (CUDA), where the ``ContextVar`` is unset: the rerun
    then skips the capture ops and torch fails with "a different number of tensors was saved".
    This hands the recompute the request that was active at the original forward. Use:
    ``model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": checkpoint_context})``.
    """
    return contextlib.nullcontext(), bound(_REQUEST, _REQUEST.get())


def _head_tensors(heads: Mapping[int, Sequence[int]] | Literal["all"]) -> dict[int, Tensor] | None:
    if isinstance(heads, str):
        if heads != "all":
            raise ValueError(f"heads must be a mapping layer -> head indices or 'all', got {heads!r}")
        return None
    selected = {}
    for layer, layer_heads in heads.items():
        index = torch.as_tensor(list(layer_heads), dtype=torch.long)
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"heads[{layer}] must be a non-empty sequence of head indices, got {layer_heads!r}")
        selected[int(layer)] = index
    return selected


def _check_image_index(image_index: Tensor) -> Tensor:
    if image_index.ndim != 2 or image_index.dtype != torch.long:
        raise ValueError(
            f"image_index must be a (batch, n_img) long tensor, got {tuple(image_index.shape)} {image_index.dtype}"
        )
    return image_index


def _check_labels(labels: Tensor | None, image_index: Tensor) -> Tensor | None:
    if labels is None:
        return None
    if labels.ndim != 3 or labels.shape[0] != image_index.shape[0] or labels.shape[2] != image_index.shape[1]:
        raise ValueError(
            f"labels must be (batch, k, n_img) = ({image_index.shape[0]}, k, {image_index.shape[1]}) "
            f"to match image_index, got {tuple(labels.shape)}"
        )
    if not labels.is_floating_point():
        raise ValueError(f"labels must be float weights in [0, 1], got dtype {labels.dtype}")
    return labels


def _check_row_start(row_start: int) -> int:
    if row_start < 0:
        raise ValueError(f"row_start must be >= 0, got {row_start}")
    return int(row_start)


def capture_attention_forward(
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
    """SDPA for the layer output; while a capture block is active, also the selected heads' statistics."""
    attending, key, value = scoped_attention_inputs(module, key, value)
    output = sdpa_attention_forward(
        attending, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    request = _REQUEST.get()
    if request is not None:
        layer = module.layer_idx
        heads = _layer_heads(request, layer, query.shape[1])
        if heads is not None:
            is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            groups = getattr(attending, "num_key_value_groups", 1)
            request.results[layer] = _capture_layer(request, heads, query, key, groups, attention_mask, scaling, is_causal)
    return output


def _layer_heads(request: _Request, layer: int, num_heads: int) -> Tensor | None:
    if request.heads is None:
        return torch.arange(num_heads)
    heads = request.heads.get(layer)
    if heads is not None and (heads.min() < 0 or heads.max() >= num_heads):
        raise ValueError(f"layer {layer} has {num_heads} heads, capture asked for heads {heads.tolist()}")
    return heads


def _capture_layer(
    request: _Request,
    heads: Tensor,
    query: Tensor,
    key: Tensor,
    groups: int,
    attention_mask: Tensor | None,
    scaling: float | None,
    is_causal: bool,
) -> LayerCapture:
    batch, _, length, head_dim = query.shape
    if key.shape[2] != length:
        raise RuntimeError(
            f"attention capture needs a full-sequence forward (query length {length} != key length "
            f"{key.shape[2]}): run it without a filled cache (use_cache=False)"
        )
    if request.image_index.shape[0] != batch:
        raise ValueError(f"image_index has batch {request.image_index.shape[0]}, the forward pass has {batch}")
    row_start = request.row_start
    if row_start >= length:
        raise ValueError(f"row_start {row_start} is not a row of a sequence of length {length}")
    heads = heads.to(query.device)
    q = query[:, heads, row_start:]  # (B, h, R, D): the supervised rows only
    k = key[:, heads // groups]
    scale = scaling if scaling is not None else head_dim**-0.5
    image_index = request.image_index.to(query.device)
    mask = _row_mask(attention_mask, row_start, length, is_causal, query.device)  # (B | 1, 1, R, N)

    channels = _indicator_values(image_index, request.labels, length)  # (B, N, 1 + k)
    sums = _indicator_attention(q, k, channels, mask, scale)  # (B, h, R, 1 + k) float32
    sums = torch.nn.functional.pad(sums, (0, 0, row_start, 0))  # rows before row_start: zeros
    inside = sums[..., 1:].transpose(-1, -2) if request.labels is not None else None
    probabilities = None
    if request.probabilities:
        probabilities = _image_probabilities(q, k, mask, scale, image_index, sums[:, :, row_start:, 0])
    return LayerCapture(heads, sums[..., 0], inside, probabilities, row_start)


def _row_mask(attention_mask: Tensor | None, row_start: int, length: int, is_causal: bool, device) -> Tensor | None:
    """The layer's mask restricted to the query rows row_start..: boolean (True = attend) or additive float.

    A layer without a mask attends causally (or to everything); a subset of query rows cannot use
    SDPA's ``is_causal`` (it aligns the diagonal top-left), so the causal pattern is written out.
    """
    if attention_mask is not None:
        return attention_mask[..., row_start:, :]
    if not is_causal:
        return None
    rows = torch.arange(row_start, length, device=device)
    return (rows[:, None] >= torch.arange(length, device=device)[None, :])[None, None]


def _indicator_attention(q: Tensor, k: Tensor, channels: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``A·channels`` for the rows of ``q``: one SDPA call per head_dim-wide chunk of channels, in q's dtype.

    The value channels are zero-padded to the head dim because fused kernels (flash attention on
    CPU and CUDA) need value, query and key head dims equal; flash keeps O(rows) memory and
    recomputes the probabilities in backward. Returns (B, h, R, C) float32.
    """
    batch, heads, _, head_dim = q.shape
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    outputs = []
    for chunk in channels.split(head_dim, dim=-1):
        values = torch.nn.functional.pad(chunk.to(q.dtype), (0, head_dim - chunk.shape[-1]))
        values = values[:, None].expand(batch, heads, -1, -1)
        with _backends():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, values, attn_mask=mask, scale=scale)
        outputs.append(out[..., : chunk.shape[-1]].float())
    return torch.cat(outputs, dim=-1)


def _backends() -> contextlib.AbstractContextManager:
    """The SDPA backends the capture may use: :data:`CAPTURE_SDPA_BACKENDS`, or torch's own choice (None)."""
    if CAPTURE_SDPA_BACKENDS is None:
        return contextlib.nullcontext()
    return sdpa_kernel(CAPTURE_SDPA_BACKENDS)


def _indicator_values(image_index: Tensor, labels: Tensor | None, length: int) -> Tensor:
    """(B, N, 1 + k): channel 0 is 1 on the image tokens, channel 1 + i is label i on them; zeros elsewhere."""
    batch, n_img = image_index.shape
    if n_img and (image_index.min() < 0 or image_index.max() >= length):
        raise ValueError(f"image_index holds positions outside the sequence of length {length}")
    on_image = [torch.ones(batch, n_img, 1, device=image_index.device)]
    if labels is not None:
        on_image.append(labels.to(image_index.device, torch.float32).transpose(1, 2))
    on_image = torch.cat(on_image, dim=-1)
    values = torch.zeros(batch, length, on_image.shape[-1], device=image_index.device)
    return values.scatter(1, image_index[..., None].expand_as(on_image), on_image)


def _image_probabilities(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, image_index: Tensor, image_share: Tensor
) -> Tensor:
    """A[t, image] for the rows of ``q``: (B, h, R, n_img), from the image columns' logits only.

    ``A[t, j] = softmax over the image columns of the logits, times the row's image share`` (the
    full softmax's normaliser cancels), so no row × all-columns block is ever built.
    """
    batch, heads, rows, head_dim = q.shape
    columns = image_index[:, None, :, None].expand(batch, heads, -1, head_dim)
    logits = (q.float() @ k.gather(2, columns).float().transpose(-1, -2)) * scale  # (B, h, R, n_img)
    if mask is not None:
        mask = mask.expand(batch, -1, rows, -1).gather(3, image_index[:, None, None, :].expand(-1, mask.shape[1], rows, -1))
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1) * image_share[..., None]


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
