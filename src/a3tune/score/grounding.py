"""Attention grounding of a scored model, measured with the capture code the probe uses.

Why: A³Tune claims better attention distributions, but the reference has no grounding metric
(reference §9.5). These numbers say where a model looks while it reads a sample's question and an
answer (teacher forced: the reference answer, or its own generated one, whichever the batch holds),
with the same statistics ``a3tune.probe.head_scores`` ranks heads by.

For one sample, its post-image query rows R (every real token after the last image token), a set
of heads H and attention A_h:

- ``image_share`` = mean_h (1/|R|) Σ_{t∈R} Σ_{j∈image} A_h[t, j];
- ``inside_<map>`` = mean_h Σ_{t∈R} Σ_{j∈image} A_h[t, j]·m[j] / Σ_{t∈R} Σ_{j∈image} A_h[t, j], for the
  weak label (``label``: the union, element-wise max, of its k maps) and the ground-truth mask
  (``gt``) projected on the token grid; null for a sample whose map is absent or all zero;
- ``attention_map`` (n_img values, row-major grid) = mean_h (1/|R|) Σ_{t∈R} A_h[t, image];
- ``pointing_hit`` (pointing game): whether the grid cell where ``attention_map`` peaks lies inside
  the ground-truth mask (its value there >= 0.5, so an area-projected mask counts a cell that is
  at least half covered); null without a ground-truth mask.

Each number is reported for two head sets H, from one forward pass: the probe's selected heads
(the columns above; the heads a static A³Tune run trains, the same for every scored run) and the
run's own heads, the heads whose q/k its adapter changed (the same columns prefixed ``own_``; see
``a3tune.score.score_stage.own_heads``), so a run that trained other heads is also measured on them.

The sums come from ``capture_attention`` (exact SDPA reductions, float32) and the map from its
``probabilities`` block (rows from the batch's first post-image row on); per-head ratios
(``a3tune.probe.head_ratios``) are averaged with equal weight, as the probe does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch import Tensor

from a3tune.models.capture import CAPTURE_ATTENTION, LayerCapture, capture_attention, enable_capture
from a3tune.models.layout import Batch, first_post_image_row
from a3tune.models.lvlm import LoadedLvlm
from a3tune.probe.head_ratios import head_ratios
from a3tune.tune.moe import routing

MAP_NAMES = ("label", "gt")
POINTING_THRESHOLD = 0.5
OWN_PREFIX = "own_"

HeadSet = Mapping[int, Sequence[int]] | None  # layer -> head indices; None = every head of every layer


def grounding_scores(
    lvlm: LoadedLvlm,
    batch: Batch,
    maps: Mapping[str, Tensor | None],
    heads: HeadSet = None,
    own_heads: HeadSet = None,
) -> pl.DataFrame:
    """One row per sample of ``batch`` (encoded with the answers to read): ``image_share``,
    ``inside_label``, ``inside_gt``, ``pointing_hit``, ``attention_map`` over ``heads``, and the
    same five with the ``own_`` prefix over ``own_heads``.

    ``maps``: ``label`` (B, k, n_img) weak-label maps and ``gt`` (B, 1, n_img) ground-truth masks on
    the image tokens, each optional (None or missing). ``heads``: layer -> head indices (the probe's
    selection); ``own_heads``: the heads the scored run's adapter changed (see
    ``a3tune.score.score_stage.own_heads``); None = every head, for either. One forward pass
    captures the union of both sets; each table is built from its heads' columns of that capture
    (one table serves both when the sets are equal). Switches the model's language model to the
    capture attention function (``enable_capture``, plain SDPA outside a capture block) and runs
    the pass inside the A³MoE routing block.
    """
    unknown = sorted(set(maps) - set(MAP_NAMES))
    if unknown:
        raise ValueError(f"grounding maps: unknown name(s) {unknown}; known: {list(MAP_NAMES)}")
    union = {name: _union(maps[name], batch, name) for name in MAP_NAMES if maps.get(name) is not None}
    labels = torch.stack(list(union.values()), dim=1) if union else None
    row_start = first_post_image_row(batch.post_image)
    probe, own = _normal(heads), _normal(own_heads)
    both = None if probe is None or own is None else {layer: sorted({*probe.get(layer, ()), *own.get(layer, ())})
                                                      for layer in sorted({*probe, *own})}  # fmt: skip
    if lvlm.model.config.get_text_config()._attn_implementation != CAPTURE_ATTENTION:
        enable_capture(lvlm.model)
    device = lvlm.model.device
    inputs = {name: value.to(device) for name, value in batch.inputs.items()}
    image_index = batch.image_index.to(device)
    with (
        torch.no_grad(),
        routing(batch.question_span.to(device), image_index),
        capture_attention(
            heads="all" if both is None else both,
            image_index=image_index,
            labels=None if labels is None else labels.to(device),
            probabilities=True,
            row_start=row_start,
        ) as captured,
    ):
        lvlm.model(**inputs)
    table = grounding_table(head_subset(captured, probe), batch.post_image, union)
    own_table = table if own == probe else grounding_table(head_subset(captured, own), batch.post_image, union)
    return table.hstack(own_table.rename({name: OWN_PREFIX + name for name in own_table.columns}))


def head_subset(captured: Mapping[int, LayerCapture], heads: HeadSet) -> dict[int, LayerCapture]:
    """The captured columns of ``heads`` only (by ``LayerCapture.heads``); None keeps every captured head."""
    if heads is None:
        return dict(captured)
    subset = {}
    for layer, wanted in heads.items():
        cap = captured.get(layer)
        if cap is None:
            continue
        keep = torch.isin(cap.heads, torch.as_tensor(list(wanted), dtype=cap.heads.dtype, device=cap.heads.device))
        index = keep.nonzero()[:, 0]
        if index.numel():
            subset[layer] = dataclasses.replace(
                cap,
                heads=cap.heads[index],
                image_share=cap.image_share[:, index],
                inside=None if cap.inside is None else cap.inside[:, index],
                probabilities=None if cap.probabilities is None else cap.probabilities[:, index],
            )
    return subset


def grounding_table(captured: Mapping[int, LayerCapture], post_image: Tensor, maps: Mapping[str, Tensor]) -> pl.DataFrame:
    """The per-sample table from a capture's layers; ``maps`` name -> (B, n_img), in the order of the
    capture's label channels (``inside[:, :, i]`` is ``maps``' i-th)."""
    if not captured:
        raise ValueError("grounding: the capture holds no layer (no head selected in the model's layers?)")
    rows = post_image.to("cpu", torch.float64)
    n_rows = rows.sum(dim=1)
    shares, insides, attention = [], [], []
    for cap in captured.values():
        share, inside = head_ratios(cap.image_share, cap.inside if maps else None, post_image)  # (B, h), (B, h, c)
        shares.append(share)
        if inside is not None:
            insides.append(inside)
        post = rows[:, None, cap.row_start :, None]  # (B, 1, R', 1)
        attention.append((cap.probabilities.detach().to("cpu", torch.float64) * post).sum(dim=2) / n_rows[:, None, None])
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


def _normal(heads: HeadSet) -> dict[int, tuple[int, ...]] | None:
    """A head set as int layer -> sorted distinct head indices (None stays None), so equal sets compare equal."""
    if heads is None:
        return None
    return {int(layer): tuple(sorted({int(h) for h in indices})) for layer, indices in sorted(heads.items())}
