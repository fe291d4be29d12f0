"""Attention grounding of a scored model, measured with the capture code the probe uses.

Why: A³Tune claims better attention distributions, but the reference has no grounding metric
(reference §9.5). These numbers say where a model looks while it reads a sample's question and an
answer (teacher forced: the reference answer, or its own generated one, whichever the batch holds),
with the same statistics ``a3tune.probe.head_scores`` ranks heads by.

For one sample, its post-image query rows R (every real token after the last image token), a set
of heads H (the probe's selected heads, or every head of every layer) and attention A_h:

- ``image_share`` = mean_h (1/|R|) Σ_{t∈R} Σ_{j∈image} A_h[t, j];
- ``inside_<map>`` = mean_h Σ_{t∈R} Σ_{j∈image} A_h[t, j]·m[j] / Σ_{t∈R} Σ_{j∈image} A_h[t, j], for the
  weak label (``label``: the union, element-wise max, of its k maps) and the ground-truth mask
  (``gt``) projected on the token grid; null for a sample whose map is absent or all zero;
- ``attention_map`` (n_img values, row-major grid) = mean_h (1/|R|) Σ_{t∈R} A_h[t, image];
- ``pointing_hit`` (pointing game): whether the grid cell where ``attention_map`` peaks lies inside
  the ground-truth mask (its value there >= 0.5, so an area-projected mask counts a cell that is
  at least half covered); null without a ground-truth mask.

The sums come from ``capture_attention`` (exact SDPA reductions, float32) and the map from its
``probabilities`` block (rows from the batch's first post-image row on); per-head ratios are
averaged with equal weight, as the probe does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch import Tensor

from a3tune.models.capture import CAPTURE_ATTENTION, LayerCapture, capture_attention, enable_capture
from a3tune.models.layout import Batch
from a3tune.models.lvlm import LoadedLvlm
from a3tune.tune.moe import routing

MAP_NAMES = ("label", "gt")
POINTING_THRESHOLD = 0.5


def grounding_scores(
    lvlm: LoadedLvlm,
    batch: Batch,
    maps: Mapping[str, Tensor | None],
    heads: Mapping[int, Sequence[int]] | None = None,
) -> pl.DataFrame:
    """One row per sample of ``batch`` (encoded with the answers to read): ``image_share``,
    ``inside_label``, ``inside_gt``, ``pointing_hit``, ``attention_map``.

    ``maps``: ``label`` (B, k, n_img) weak-label maps and ``gt`` (B, 1, n_img) ground-truth masks on
    the image tokens, each optional (None or missing). ``heads``: layer -> head indices (the probe's
    selection); None = every head. Switches the model's language model to the capture attention
    function (``enable_capture``, plain SDPA outside a capture block) and runs one forward pass
    inside the A³MoE routing block.
    """
    unknown = sorted(set(maps) - set(MAP_NAMES))
    if unknown:
        raise ValueError(f"grounding maps: unknown name(s) {unknown}; known: {list(MAP_NAMES)}")
    union = {name: _union(maps[name], batch, name) for name in MAP_NAMES if maps.get(name) is not None}
    labels = torch.stack(list(union.values()), dim=1) if union else None
    row_start = _first_post_image_row(batch.post_image)
    if lvlm.model.config.get_text_config()._attn_implementation != CAPTURE_ATTENTION:
        enable_capture(lvlm.model)
    device = lvlm.model.device
    inputs = {name: value.to(device) for name, value in batch.inputs.items()}
    image_index = batch.image_index.to(device)
    with (
        torch.no_grad(),
        routing(batch.question_span.to(device), image_index),
        capture_attention(
            heads="all" if heads is None else heads,
            image_index=image_index,
            labels=None if labels is None else labels.to(device),
            probabilities=True,
            row_start=row_start,
        ) as captured,
    ):
        lvlm.model(**inputs)
    return grounding_table(captured, batch.post_image, union)


def grounding_table(captured: Mapping[int, LayerCapture], post_image: Tensor, maps: Mapping[str, Tensor]) -> pl.DataFrame:
    """The per-sample table from a capture's layers; ``maps`` name -> (B, n_img), in the order of the
    capture's label channels (``inside[:, :, i]`` is ``maps``' i-th)."""
    if not captured:
        raise ValueError("grounding: the capture holds no layer (no head selected in the model's layers?)")
    rows = post_image.to(torch.float64)
    n_rows = rows.sum(dim=1)
    if bool((n_rows == 0).any()):
        raise ValueError("grounding: a sample has no tokens after its image")
    shares, insides, attention = [], [], []
    for cap in captured.values():
        on_image = (cap.image_share.detach().double() * rows[:, None]).sum(dim=2)  # (B, h)
        shares.append(on_image / n_rows[:, None])
        if maps:
            inside = (cap.inside.detach().double() * rows[:, None, None]).sum(dim=3)  # (B, h, c)
            insides.append(inside / on_image.clamp_min(1e-12)[:, :, None])
        post = rows[:, None, cap.row_start :, None]  # (B, 1, R', 1)
        attention.append((cap.probabilities.detach().double() * post).sum(dim=2) / n_rows[:, None, None])
    attention_map = torch.cat(attention, dim=1).mean(dim=1)  # (B, n_img)
    columns = {"image_share": torch.cat(shares, dim=1).mean(dim=1).tolist()}
    inside_means = torch.cat(insides, dim=1).mean(dim=1) if maps else None  # (B, c)
    for name in MAP_NAMES:
        present = maps[name].cpu().sum(dim=1) > 0 if name in maps else torch.zeros(len(rows), dtype=torch.bool)
        values = inside_means[:, list(maps).index(name)].tolist() if name in maps else [None] * len(rows)
        columns[f"inside_{name}"] = [v if p else None for v, p in zip(values, present.tolist(), strict=True)]
    columns["pointing_hit"] = pointing_hits(attention_map, maps.get("gt"))
    columns["attention_map"] = attention_map.float().tolist()
    schema = {"image_share": pl.Float64, "inside_label": pl.Float64, "inside_gt": pl.Float64, "pointing_hit": pl.Boolean,
              "attention_map": pl.List(pl.Float32)}  # fmt: skip
    return pl.DataFrame(columns, schema=schema)


def pointing_hits(attention_map: Tensor, gt: Tensor | None) -> list[bool | None]:
    """Pointing game per sample: ``gt[argmax attention_map] >= 0.5``; None where ``gt`` is absent or empty."""
    if gt is None:
        return [None] * len(attention_map)
    gt = gt.to(attention_map.device)
    peak = attention_map.argmax(dim=1, keepdim=True)
    hit = gt.gather(1, peak)[:, 0] >= POINTING_THRESHOLD
    return [bool(h) if present else None for h, present in zip(hit.tolist(), (gt.sum(dim=1) > 0).tolist(), strict=True)]


def _union(maps: Tensor, batch: Batch, name: str) -> Tensor:
    """(B, n_img): the element-wise max of a (B, k, n_img) stack of maps."""
    expected = (batch.image_index.shape[0], batch.image_index.shape[1])
    if maps.ndim != 3 or (maps.shape[0], maps.shape[2]) != expected:
        raise ValueError(
            f"grounding map {name!r} must be (batch, k, n_img) = ({expected[0]}, k, {expected[1]}), got {tuple(maps.shape)}"
        )
    return maps.float().amax(dim=1)


def _first_post_image_row(post_image: Tensor) -> int:
    """The earliest post-image row of any sample: the capture keeps probability rows from there on."""
    rows = post_image.any(dim=0).nonzero()
    if rows.numel() == 0:
        raise ValueError("grounding: no sample has tokens after its image")
    return int(rows[0, 0])
