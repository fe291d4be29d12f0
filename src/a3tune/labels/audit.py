"""Audit weak labels before training: ``a3tune inspect labels DIR`` and overlay figures.

A label directory ``labels/{ds}/`` holds ``labels.parquet`` (one row a sample, contract "labels")
and ``labels.zarr`` (``masks`` (n_labels, k, S, S) bool, ``grid`` (n_labels, k, G, G) float16).
The stage's provenance names ``samples`` (samples.parquet), ``root`` (the data root, for images
and ground-truth masks), ``images`` (images.parquet), ``k``, ``grid`` and ``working_size``.

``label_metrics`` computes the numbers (status counts, masks per sample, CLIP scores, label areas,
empty grids, IoU with ground truth where ``gt_mask_ref`` exists, consistency checks);
``label_report`` prints them; ``a3tune.labels.audit_overlays.write_overlays`` draws a deterministic
sample of labels over their images. Ground-truth masks are PNGs under the root (non-zero = inside) at the original image size;
they are squashed to S×S with nearest sampling, the same geometry as the SAM working image.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from a3tune.data.images import resolve_under
from a3tune.io.parquet import read_parquet
from a3tune.io.provenance import read_provenance
from a3tune.io.zarr_store import open_store

log = logging.getLogger(__name__)

HIT_IOU = 0.5  # a proposal "finds" the ground truth at this IoU
_BLOCK = 64  # label rows read from the store at a time


@dataclasses.dataclass
class LabelSet:
    """A label directory with everything it points to; missing pointers are None."""

    dir: Path
    labels: pl.DataFrame
    store: Any  # zarr.Group
    params: dict[str, Any]
    samples: pl.DataFrame | None
    images: pl.DataFrame | None
    root: Path | None
    samples_path: Path | None


def _resolve(value: Any, label_dir: Path) -> Path | None:
    """A path from provenance: absolute, or relative to the working directory or an ancestor of DIR."""
    if not value:
        return None
    path = Path(str(value))
    bases = [] if path.is_absolute() else [Path.cwd(), *label_dir.resolve().parents]
    candidates = [base / path for base in bases] or [path]
    return next((c for c in candidates if c.exists()), None)


def load_label_set(label_dir: str | os.PathLike) -> LabelSet:
    """The label directory with the samples, images and data root its provenance names (missing: None, warned)."""
    label_dir = Path(label_dir)
    labels = read_parquet(label_dir / "labels.parquet", contract="labels")
    store = open_store(label_dir / "labels.zarr")
    params: dict[str, Any] = {}
    for artifact in ("labels.zarr", "labels.parquet"):  # the manifest's params win
        prov = read_provenance(label_dir / artifact)
        params.update(prov.params if prov else {})
    samples_path = _resolve(params.get("samples"), label_dir)
    samples = read_parquet(samples_path) if samples_path else None
    images_path = _resolve(params.get("images"), label_dir)
    if images_path is None and samples_path is not None and (samples_path.parent / "images.parquet").is_file():
        images_path = samples_path.parent / "images.parquet"
    images = read_parquet(images_path) if images_path else None
    root = _resolve(params.get("root"), label_dir)
    for name, found in (("samples", samples_path), ("images", images_path), ("root", root)):
        if found is None:
            log.warning("%s: %s %r (provenance) not found; auditing without it", label_dir, name, params.get(name))
    return LabelSet(label_dir, labels, store, params, samples, images, root, samples_path)


def joined_labels(ls: LabelSet) -> pl.DataFrame:
    """labels.parquet with ``dataset``, ``image_id`` and ``gt_mask_ref`` from samples.parquet."""
    df = ls.labels
    extra = [c for c in ("dataset", "image_id", "gt_mask_ref") if ls.samples is not None and c in ls.samples.columns]
    if extra:
        df = df.drop([c for c in extra if c in df.columns]).join(
            ls.samples.select("sample_id", *extra), on="sample_id", how="left"
        )
    if "dataset" not in df.columns:
        df = df.with_columns(pl.lit(ls.dir.name).alias("dataset"))
    if "gt_mask_ref" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias("gt_mask_ref"))
    return df.with_columns(pl.col("dataset").fill_null(ls.dir.name))


def _summary(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """n, mean and quantiles (min, q25, median, q75, max) as plain floats; None when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "min": None, "q25": None, "median": None, "q75": None, "max": None}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"n": int(values.size), "mean": float(values.mean()),
            **{k: float(v) for k, v in zip(("min", "q25", "median", "q75", "max"), q)}}  # fmt: skip


def read_gt_mask(path: Path, size: int) -> np.ndarray:
    """A ground-truth PNG as an S×S bool mask (non-zero = inside; alpha ignored; nearest squash)."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA"):
            image = image.convert(image.mode[:-1] if image.mode != "PA" else "P")
        if image.size != (size, size):
            image = image.resize((size, size), Image.NEAREST)
        array = np.asarray(image)
    return array.any(axis=-1) if array.ndim == 3 else array != 0


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of masks a (..., S, S) with one mask b (S, S)."""
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _sample_stats(masks: np.ndarray, grid: np.ndarray, n: int, gt: np.ndarray | None) -> dict[str, Any]:
    """One label's numbers: masks (k, S, S) and grid (k, G, G), of which the first ``n`` are kept."""
    kept, kept_grid = masks[:n], grid[:n]
    union = kept.any(axis=0)
    stats = {
        "n": n,
        "area": float(union.mean()) if n else 0.0,
        "grid_empty": bool(n and not kept_grid.any()),
        "mask_grid_empty": int((~kept_grid.any(axis=(1, 2))).sum()),
        "empty_masks": int((~kept.any(axis=(1, 2))).sum()),
        "stray": bool(masks[n:].any()),
    }
    if gt is not None and n:
        stats["iou_union"] = float(_iou(union, gt))
        stats["iou_best"] = float(_iou(kept, gt).max())
    return stats


def label_metrics(label_dir: str | os.PathLike) -> dict[str, Any]:
    """Every number of the label audit, per data set, as plain JSON-able values."""
    ls = load_label_set(label_dir)
    df = joined_labels(ls)
    masks, grids = ls.store["masks"], ls.store["grid"]
    size = int(masks.shape[-1])
    read_gt = functools.lru_cache(maxsize=256)(lambda ref: read_gt_mask(resolve_under(ls.root, ref), size))

    # Per labelled sample, reading the store a block of label rows at a time.
    per_sample: dict[str, dict[str, Any]] = {}
    labelled = df.filter(pl.col("label_row").is_not_null()).sort("label_row")
    for start in range(0, labelled.height, _BLOCK):
        block = labelled.slice(start, _BLOCK)
        rows = block["label_row"].to_numpy()
        block_masks, block_grids = masks.oindex[rows], grids.oindex[rows]
        for i, rec in enumerate(block.iter_rows(named=True)):
            gt, extra = None, {}
            if rec["gt_mask_ref"] is not None and ls.root is not None and rec["n_masks"]:
                try:
                    gt = read_gt(rec["gt_mask_ref"])
                except Exception as exc:  # noqa: BLE001 - a bad gt file is counted, not fatal
                    extra["gt_error"] = f"{rec['gt_mask_ref']}: {type(exc).__name__}: {exc}"
                else:
                    extra["gt_empty"] = not gt.any()
                    gt = gt if gt.any() else None
            stats = _sample_stats(block_masks[i], block_grids[i], rec["n_masks"], gt)
            per_sample[rec["sample_id"]] = {**stats, **extra}

    result: dict[str, Any] = {
        "label_dir": str(label_dir),
        "k": int(masks.shape[1]),
        "working_size": size,
        "grid": ls.params.get("grid"),
        "grid_shape": list(grids.shape[-2:]),
        "samples": str(ls.samples_path) if ls.samples_path else None,
        "root": str(ls.root) if ls.root else None,
        "datasets": {},
    }
    for (dataset,), part in sorted(df.group_by("dataset"), key=lambda kv: str(kv[0][0])):
        result["datasets"][str(dataset)] = _dataset_metrics(part, per_sample, gt_known=ls.root is not None)
    return result


def _dataset_metrics(part: pl.DataFrame, per_sample: dict[str, dict[str, Any]], gt_known: bool) -> dict[str, Any]:
    done = [per_sample[s] for s in part["sample_id"] if s in per_sample]
    n_masks = part["n_masks"].to_numpy()
    scores = [list(s) for s in part["clip_scores"].to_list()]
    proposal_rows = part["proposal_rows"].to_list()
    lengths = zip(scores, proposal_rows, n_masks.tolist())
    values, counts = np.unique(n_masks, return_counts=True)
    metrics: dict[str, Any] = {
        "n_samples": part.height,
        "status": {s: int(n) for s, n in part["status"].value_counts(sort=True).iter_rows()},
        "n_masks": {**_summary(n_masks), "histogram": {int(v): int(c) for v, c in zip(values, counts)}},
        "clip_scores": _summary([x for s in scores for x in s]),
        "clip_top1": _summary([s[0] for s in scores if s]),
        "label_area": _summary([d["area"] for d in done]),
        "empty_grid": {
            "labels": sum(d["grid_empty"] for d in done),
            "n_labels": len(done),
            "masks": sum(d["mask_grid_empty"] for d in done),
            "n_masks": sum(d["n"] for d in done),
        },
        "checks": {
            "ok_without_label": part.filter((pl.col("status") == "ok") & pl.col("label_row").is_null()).height,
            "length_mismatch": sum(len(s) != n or len(p) != n for s, p, n in lengths),
            "unsorted_scores": sum(any(a < b for a, b in zip(s, s[1:])) for s in scores),
            "empty_kept_masks": sum(d["empty_masks"] for d in done),
            "masks_beyond_n_masks": sum(d["stray"] for d in done),
        },
    }
    with_gt = part.filter(pl.col("gt_mask_ref").is_not_null())["sample_id"].to_list()
    if not with_gt:
        metrics["gt"] = None
        return metrics
    scored = [per_sample[s] for s in with_gt if s in per_sample and "iou_best" in per_sample[s]]
    errors = [per_sample[s]["gt_error"] for s in with_gt if "gt_error" in per_sample.get(s, {})]
    n_empty = sum(1 for s in with_gt if per_sample.get(s, {}).get("gt_empty"))
    n_unlabelled = sum(1 for s in with_gt if not per_sample.get(s, {}).get("n"))
    hits = int(sum(d["iou_best"] >= HIT_IOU for d in scored))
    metrics["gt"] = {
        "n_samples": len(with_gt),
        "n_scored": len(scored),
        "n_unlabelled": n_unlabelled,
        "n_empty": n_empty,
        "n_errors": len(errors),
        "first_error": errors[0] if errors else None,
        "root_found": gt_known,
        "iou_union": _summary([d["iou_union"] for d in scored]),
        "iou_best": _summary([d["iou_best"] for d in scored]),
        # Share whose best kept mask reaches HIT_IOU: of the scored samples, and counting the
        # samples with a gt mask but no label as misses.
        "hit_rate": hits / len(scored) if scored else None,
        "hit_rate_all": hits / (len(scored) + n_unlabelled) if scored or n_unlabelled else None,
    }
    return metrics


def _fmt(summary: dict[str, Any], digits: int = 3) -> str:
    if not summary["n"]:
        return "n=0"
    keys = ("min", "q25", "median", "q75", "max", "mean")
    return f"n={summary['n']}  " + "  ".join(f"{k} {summary[k]:.{digits}f}" for k in keys)


def label_report(label_dir: str | os.PathLike) -> str:
    """The label audit as text: one block per data set."""
    m = label_metrics(label_dir)
    grid = m["grid"] or {}
    shape = "x".join(map(str, m["grid_shape"]))
    lines = [f"labels {m['label_dir']}: k={m['k']}, working size {m['working_size']}, "
             f"grid {shape} ({grid.get('preprocess', '?')}, {grid.get('mode', '?')})"]  # fmt: skip
    if not m["datasets"]:
        lines.append("no samples")
    for name, d in m["datasets"].items():
        lines.append(f"[{name}] {d['n_samples']} samples")
        if not d["n_samples"]:
            continue
        nm, eg = d["n_masks"], d["empty_grid"]
        hist = " ".join(f"{k}:{v}" for k, v in nm["histogram"].items())
        lines += [
            "  status: " + ", ".join(f"{s}={n}" for s, n in d["status"].items()),
            f"  masks per sample: min {nm['min']:.0f}, median {nm['median']:g}, max {nm['max']:.0f}, "
            f"mean {nm['mean']:.2f}; histogram (n_masks:samples) {hist}",
            f"  CLIP score, kept masks: {_fmt(d['clip_scores'], 2)}",
            f"  CLIP score, best per label: {_fmt(d['clip_top1'], 2)}",
            f"  label area (union of kept masks, share of image): {_fmt(d['label_area'])}",
            f"  all-zero grids: {eg['labels']} of {eg['n_labels']} labels, "
            f"{eg['masks']} of {eg['n_masks']} kept masks",
        ]
        gt = d["gt"]
        if gt is None:
            lines.append("  ground truth: none (no gt_mask_ref)")
        elif not gt["root_found"]:
            lines.append(f"  ground truth: {gt['n_samples']} samples with a mask, but the data root is not found")
        else:
            lines += [
                f"  ground truth: {gt['n_samples']} samples with a mask; {gt['n_scored']} scored, "
                f"{gt['n_unlabelled']} unlabelled, {gt['n_empty']} empty, {gt['n_errors']} unreadable",
                f"    IoU, union of kept masks: {_fmt(gt['iou_union'])}",
                f"    IoU, best kept mask:      {_fmt(gt['iou_best'])}",
            ]
            if gt["hit_rate"] is not None:
                lines.append(f"    best kept mask IoU >= {HIT_IOU}: {100 * gt['hit_rate']:.1f}% of scored, "
                             f"{100 * gt['hit_rate_all']:.1f}% counting unlabelled samples as misses")  # fmt: skip
            if gt["first_error"]:
                lines.append(f"    first unreadable: {gt['first_error']}")
        bad = {k: v for k, v in d["checks"].items() if v}
        lines.append("  checks: " + (", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "all passed"))
    return "\n".join(lines)
