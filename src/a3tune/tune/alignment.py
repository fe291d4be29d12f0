"""The A³Tune attention-alignment loss L_attn, from captured attention statistics.

Reference (reference/a3tune-method.md §5): the map of the selected heads over the post-image query
rows R, ``M = Σ_{(l,h)∈selected} A[l, h, R, image]`` (the reference divides by L·H; the constant
cancels), and per weak label map m_k a loss ℓ_k, summed over the maps:

- ``inside``: ``a_{t,k} = Σ_j M[t,j]·m_k[j] / Σ_j M[t,j]``, ``ℓ_k = mean_{t∈R} (1 − a_{t,k})²``.
  From the capture: ``Σ_sel inside[t, k] / Σ_sel image_share[t]``; no probabilities needed.
- ``kl``: ``P_t = M[t] / Σ_j M[t, j]``, ``Q_k = m_k / Σ_j m_k[j]``,
  ``ℓ_k = mean_{t∈R} KL(Q_k ‖ P_t) = Σ_j Q log(Q / P)`` with ``0·log 0 = 0``. Needs the captured
  probability block (rows ``row_start``.. × image columns) and the label maps themselves.

Deliberate choices:

- Both variants renormalise over the image columns: the loss shapes where, within the image, the
  selected heads look; it never asks for more total attention on the image.
- Sum over the sample's *real* maps (``label_valid``), no averaging and no weighting, as the
  reference. A sample without a real map contributes exactly 0, with zero (finite) gradients.
- Clamps, where the reference would give NaN or inf: a row whose selected heads put (almost) nothing
  on the image has its image total clamped to ≥ ``eps`` (inside: ``a`` then tends to 0, not 0/0;
  kl: ``P`` tends to 0), and ``P`` is clamped to ≥ ``eps`` inside the log (the reference has no
  epsilon there and an exact zero gives inf). With the default 1e-8 a zero ``P_j`` under a
  positive ``Q_j`` costs ``Q_j·log(Q_j / 1e-8)``, large and finite, with no gradient through it.
- A sample without post-image rows has nothing that attends to its image: each ℓ_k is 0.
- Head selection: ``selection=None`` sums every captured head (the ``static`` mode, where only the
  probe's heads were captured, and ``all``); :func:`select_dynamic` gives the per-sample top-K of
  the reference code (``dynamic``), chosen on detached statistics, so the choice is not
  differentiated.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from a3tune.models.capture import LayerCapture

VARIANTS = ("inside", "kl")


def select_dynamic(captured: Mapping[int, LayerCapture], post_image: Tensor, k: int) -> dict[int, Tensor]:
    """The reference's per-sample top-``k`` heads over all captured layers (§4), as (B, h) bool masks.

    A head's score is the mean, over the sample's post-image rows, of the share of the row's
    attention on the image (``image_share``, detached). Exactly ``k`` heads per sample are selected;
    ties go to the lower layer, then the lower head index. Returns layer -> (B, h) bool, aligned
    with that layer's ``LayerCapture.heads``.
    """
    _check_captured(captured, post_image)
    layers = sorted(captured)
    n_heads = sum(len(captured[layer].heads) for layer in layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_heads:
        raise ValueError(f"k must be a whole number of heads in [1, {n_heads}], got {k!r}")
    order = {layer: torch.argsort(captured[layer].heads, stable=True) for layer in layers}  # capture column -> head order
    score = torch.cat(
        [_mean_over_rows(captured[layer].image_share.detach(), post_image)[:, order[layer]] for layer in layers], dim=1
    )  # (B, n_heads) in (layer, head) order
    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter(1, top, True)
    selection = {}
    for layer, in_order in zip(layers, chosen.split([len(order[layer]) for layer in layers], dim=1)):
        selection[layer] = torch.empty_like(in_order).index_copy(1, order[layer].to(in_order.device), in_order)
    return selection


def alignment_loss(
    captured: Mapping[int, LayerCapture],
    post_image: Tensor,
    label_valid: Tensor,
    *,
    variant: str = "inside",
    selection: Mapping[int, Tensor] | None = None,
    labels: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Per-sample L_attn = Σ_k ℓ_k over the sample's real label maps: a (B,) tensor, not yet times λ.

    ``captured``: layer -> :class:`LayerCapture` of one forward pass, with ``inside`` (variant
    ``inside``: captured with ``labels=``) or ``probabilities`` (variant ``kl``: captured with
    ``probabilities=True`` and a ``row_start`` at or before every sample's first post-image row).
    ``post_image``: (B, N) bool query rows R. ``label_valid``: (B, k) bool, which of the k maps are
    real. ``selection``: None sums every captured head, else layer -> (B, h) bool from
    :func:`select_dynamic`. ``labels``: (B, k, n_img) label maps, needed by ``kl`` only (``inside``
    has them folded into the capture). ``eps``: the row-sum and probability clamp (module docstring).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _check_captured(captured, post_image)
    _check_label_valid(label_valid, post_image.shape[0])
    weights = _head_weights(captured, selection, post_image.shape[0])
    if variant == "inside":
        per_map = _inside_loss(captured, post_image, weights, label_valid.shape[1], eps)
    else:
        per_map = _kl_loss(captured, post_image, weights, _check_kl_labels(labels, label_valid), eps)
    return torch.where(label_valid.to(per_map.device), per_map, 0.0).sum(dim=1)


def _inside_loss(
    captured: Mapping[int, LayerCapture], post_image: Tensor, weights: Mapping[int, Tensor], n_maps: int, eps: float
) -> Tensor:
    """(B, k) ℓ_k = mean_{t∈R} (1 − a_{t,k})², a = Σ_sel inside / Σ_sel image_share (clamped to ≥ eps)."""
    for layer, cap in captured.items():
        if cap.inside is None:
            raise ValueError(f"variant 'inside' needs captures with label maps: layer {layer} has no `inside` (pass labels=)")
        if cap.inside.shape[2] != n_maps:
            raise ValueError(f"layer {layer} captured {cap.inside.shape[2]} label maps, label_valid has {n_maps}")
    share = _aggregate({layer: cap.image_share for layer, cap in captured.items()}, weights)  # (B, N)
    inside = _aggregate({layer: cap.inside for layer, cap in captured.items()}, weights)  # (B, k, N)
    ratio = inside / share.clamp_min(eps)[:, None]
    return _mean_over_rows((1 - ratio) ** 2, post_image)


def _kl_loss(
    captured: Mapping[int, LayerCapture], post_image: Tensor, weights: Mapping[int, Tensor], labels: Tensor, eps: float
) -> Tensor:
    """(B, k) ℓ_k = mean_{t∈R} KL(Q_k ‖ P_t) over the probability block's rows that are post-image rows."""
    row_start = _kl_row_start(captured, post_image)
    block = _aggregate({layer: cap.probabilities for layer, cap in captured.items()}, weights)  # (B, R', n_img)
    if labels.shape[2] != block.shape[2]:
        raise ValueError(f"labels have {labels.shape[2]} image tokens, the captured probabilities {block.shape[2]}")
    p = block / block.sum(dim=2, keepdim=True).clamp_min(eps)
    labels = labels.to(block)
    total = labels.sum(dim=2, keepdim=True)
    q = labels / total.masked_fill(total == 0, 1)  # an empty map stays all-zero: its KL is 0
    negative_entropy = torch.special.xlogy(q, q).sum(dim=2)  # (B, k), 0·log 0 = 0
    cross = torch.einsum("bkj,btj->bkt", q, p.clamp_min(eps).log())  # (B, k, R')
    return _mean_over_rows(negative_entropy[:, :, None] - cross, post_image[:, row_start:])


def _aggregate(fields: Mapping[int, Tensor], weights: Mapping[int, Tensor]) -> Tensor:
    """Σ over layers and their selected heads of a per-head field (B, h, ...) -> (B, ...)."""
    total = None
    for layer, field in fields.items():
        w = weights[layer].to(field).reshape(*weights[layer].shape, *(1,) * (field.ndim - 2))
        summed = (field * w).sum(dim=1)
        total = summed if total is None else total + summed
    return total


def _mean_over_rows(values: Tensor, rows: Tensor) -> Tensor:
    """Mean of values (B, ..., N) over each sample's rows (B, N) bool; 0 for a sample without rows."""
    rows = rows.to(values)
    count = rows.sum(dim=1).clamp_min(1)
    rows = rows.reshape(rows.shape[0], *(1,) * (values.ndim - 2), rows.shape[1])
    return (values * rows).sum(dim=-1) / count.reshape(-1, *(1,) * (values.ndim - 2))


def _head_weights(captured: Mapping[int, LayerCapture], selection: Mapping[int, Tensor] | None, batch: int) -> dict[int, Tensor]:
    """layer -> (B, h) bool: which captured heads count for each sample."""
    if selection is None:
        return {layer: torch.ones(batch, len(cap.heads), dtype=torch.bool) for layer, cap in captured.items()}
    if set(selection) != set(captured):
        raise ValueError(f"selection covers layers {sorted(selection)}, the capture has layers {sorted(captured)}")
    for layer, cap in captured.items():
        if selection[layer].shape != (batch, len(cap.heads)) or selection[layer].dtype != torch.bool:
            raise ValueError(
                f"selection[{layer}] must be a ({batch}, {len(cap.heads)}) bool tensor, "
                f"got {tuple(selection[layer].shape)} {selection[layer].dtype}"
            )
    return dict(selection)


def _kl_row_start(captured: Mapping[int, LayerCapture], post_image: Tensor) -> int:
    starts = set()
    for layer, cap in captured.items():
        if cap.probabilities is None:
            raise ValueError(f"variant 'kl' needs captures with probabilities: layer {layer} has none (probabilities=True)")
        starts.add(cap.row_start)
    if len(starts) != 1:
        raise ValueError(f"captured layers have different row_start values {sorted(starts)}")
    return starts.pop()


def _check_captured(captured: Mapping[int, LayerCapture], post_image: Tensor) -> None:
    if not captured:
        raise ValueError("nothing captured: run the forward pass inside capture_attention with some heads")
    if post_image.ndim != 2 or post_image.dtype != torch.bool:
        raise ValueError(f"post_image must be a (batch, N) bool tensor, got {tuple(post_image.shape)} {post_image.dtype}")
    for layer, cap in captured.items():
        if cap.image_share.shape[0] != post_image.shape[0] or cap.image_share.shape[2] != post_image.shape[1]:
            raise ValueError(
                f"layer {layer} captured image_share {tuple(cap.image_share.shape)}, post_image is {tuple(post_image.shape)}"
            )
        if post_image[:, : cap.row_start].any():
            raise ValueError(
                f"layer {layer} was captured from row {cap.row_start} on, after some post-image rows: capture with "
                "row_start at or before the first one (a3tune.models.layout.first_post_image_row)"
            )


def _check_kl_labels(labels: Tensor | None, label_valid: Tensor) -> Tensor:
    if labels is None:
        raise ValueError("variant 'kl' needs the label maps: pass labels=(B, k, n_img)")
    if labels.ndim != 3 or labels.shape[:2] != label_valid.shape:
        raise ValueError(f"labels must be (B, k, n_img) with (B, k) = {tuple(label_valid.shape)}, got {tuple(labels.shape)}")
    return labels


def _check_label_valid(label_valid: Tensor, batch: int) -> None:
    if label_valid.ndim != 2 or label_valid.shape[0] != batch or label_valid.dtype != torch.bool:
        raise ValueError(f"label_valid must be a ({batch}, k) bool tensor, got {tuple(label_valid.shape)} {label_valid.dtype}")
