"""Overlay figures of weak labels (``a3tune inspect overlays``): a deterministic sample of labelled
samples, each drawn as its kept masks over the image and its vision-token grid as a heat map.

The label directory is read as in ``a3tune.labels.audit`` (same provenance pointers, same
ground-truth geometry).
"""

from __future__ import annotations

import hashlib
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from a3tune.data.images import load_rgb, resolve_under
from a3tune.io.atomic import save_png
from a3tune.labels.audit import joined_labels, load_label_set, read_gt_mask
from a3tune.labels.grid import GridSpec, cell_edges


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._") or "sample"


def write_overlays(
    label_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = 12, seed: int = 0
) -> list[Path]:
    """One PNG per sample for a seeded sample of ``n`` labelled samples; returns the paths written.

    The sample is drawn from the labelled samples (at least one kept mask) in sample-id order, so
    the same labels and seed give the same files.
    """
    ls = load_label_set(label_dir)
    if ls.root is None:
        root = ls.params.get("root")
        raise FileNotFoundError(f"{label_dir}: the data root named in the labels' provenance ({root}) is not found")
    df = joined_labels(ls)
    labelled = df.filter(pl.col("label_row").is_not_null() & (pl.col("n_masks") > 0)).sort("sample_id")
    pick = np.sort(np.random.default_rng(seed).choice(labelled.height, size=min(n, labelled.height), replace=False))
    spec = GridSpec.from_dict(ls.params["grid"]) if isinstance(ls.params.get("grid"), dict) else None
    images = ls.images.select("image_id", "path", "height", "width") if ls.images is not None else None
    size = int(ls.store["masks"].shape[-1])
    written: list[Path] = []
    for rec in labelled[pick.tolist()].iter_rows(named=True):
        k, row = rec["n_masks"], rec["label_row"]
        image, notes = _image_for(ls.root, images, rec.get("image_id"), size)
        gt = None
        if rec["gt_mask_ref"] is not None:
            try:
                gt = read_gt_mask(resolve_under(ls.root, rec["gt_mask_ref"]), size)
            except Exception as exc:  # noqa: BLE001 - draw the labels anyway
                notes.append(f"gt unreadable: {type(exc).__name__}")
        subtitle = f"{rec['sample_id']}  status={rec['status']}"
        if spec is not None:
            subtitle += f"  grid {spec.grid}x{spec.grid} {spec.preprocess}/{spec.mode}"
        fig = _draw_overlay(
            image=image,
            masks=np.asarray(ls.store["masks"][row, :k]),
            scores=list(rec["clip_scores"]),
            grid=np.asarray(ls.store["grid"][row, :k], dtype=np.float32),
            edges=cell_edges(image.shape[:2], spec) if spec is not None else None,
            gt=gt,
            title=rec["query_text"] or "",
            subtitle=subtitle + (f"  ({'; '.join(notes)})" if notes else ""),
        )
        name = _safe_name(rec["sample_id"])
        if any(p.stem == name for p in written):  # two ids that sanitise alike
            name += "-" + hashlib.sha1(rec["sample_id"].encode()).hexdigest()[:8]
        path = Path(out_dir) / f"{name}.png"
        save_png(fig, path)
        written.append(path)
    return written


def _image_for(
    root: Path, images: pl.DataFrame | None, image_id: str | None, size: int
) -> tuple[np.ndarray, list[str]]:
    """The sample's RGB image, or a grey stand-in of the right shape with a note saying why."""
    if images is None or image_id is None:
        return np.full((size, size, 3), 128, np.uint8), ["no images.parquet"]
    row = images.filter(pl.col("image_id") == image_id)
    if row.is_empty():
        return np.full((size, size, 3), 128, np.uint8), [f"image {image_id} not in images.parquet"]
    rec = row.row(0, named=True)
    try:
        return load_rgb(resolve_under(root, rec["path"])), []
    except Exception as exc:  # noqa: BLE001 - draw the labels anyway
        hw = (rec["height"] or size, rec["width"] or size)
        return np.full((*hw, 3), 128, np.uint8), [f"image unreadable: {type(exc).__name__}"]


def _draw_overlay(
    image: np.ndarray, masks: np.ndarray, scores: list[float], grid: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray] | None, gt: np.ndarray | None, title: str, subtitle: str,
) -> Any:  # fmt: skip
    """Two panels: the kept masks (and gt) as contours on the image; the grid as a heat map over it."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(11, 5.6), dpi=100, layout="constrained")
    ax_img, ax_grid = fig.subplots(1, 2)
    colors = matplotlib.colormaps["tab10"]

    def contour(ax, mask, **style):
        # Pad with an empty border so masks touching the edge (or full masks) still close.
        sy, sx = mask.shape
        ys = np.concatenate([[0.0], (np.arange(sy) + 0.5) * h / sy, [h]])
        xs = np.concatenate([[0.0], (np.arange(sx) + 0.5) * w / sx, [w]])
        ax.contour(xs, ys, np.pad(mask, 1).astype(np.float32), levels=[0.5], **style)

    # Panel 1: the image with the kept masks, rank and CLIP score at each mask's centroid.
    ax_img.imshow(image, extent=(0, w, h, 0))
    for j, (mask, score) in enumerate(zip(masks, scores)):
        if not mask.any():
            continue
        color = colors(j % 10)
        contour(ax_img, mask, colors=[color], linewidths=1.6)
        yy, xx = np.nonzero(mask)
        cy, cx = (yy.mean() + 0.5) * h / mask.shape[0], (xx.mean() + 0.5) * w / mask.shape[1]
        ax_img.text(cx, cy, f"{j + 1}: {score:.1f}", fontsize=8, color="white", ha="center", va="center",
                    bbox={"facecolor": color, "alpha": 0.75, "pad": 1.5, "edgecolor": "none"})  # fmt: skip
    has_gt = gt is not None and gt.any()
    if has_gt:
        contour(ax_img, gt, colors=["white"], linestyles="--", linewidths=1.4)
    ax_img.set_xlim(0, w)
    ax_img.set_ylim(h, 0)
    ax_img.set_title("kept masks (rank: CLIP score)" + ("; dashed white: ground truth" if has_gt else ""), fontsize=9)

    # Panel 2: the grid (max over kept masks) placed where the model's tokens see the image.
    g = grid.shape[-1]
    y_edges, x_edges = edges if edges is not None else (np.linspace(0, h, g + 1), np.linspace(0, w, g + 1))
    ax_grid.imshow(image.mean(axis=2), cmap="gray", extent=(0, w, h, 0))
    mesh = ax_grid.pcolormesh(x_edges, y_edges, grid.max(axis=0), cmap="magma", vmin=0, vmax=1, alpha=0.6)
    ax_grid.add_patch(Rectangle((x_edges[0], y_edges[0]), x_edges[-1] - x_edges[0], y_edges[-1] - y_edges[0],
                                fill=False, edgecolor="cyan", linewidth=1))  # fmt: skip
    if has_gt:
        contour(ax_grid, gt, colors=["white"], linestyles="--", linewidths=1.2)
    x0, x1 = min(0.0, x_edges[0]), max(float(w), x_edges[-1])
    y0, y1 = min(0.0, y_edges[0]), max(float(h), y_edges[-1])
    margin = 0.02 * max(x1 - x0, y1 - y0)
    ax_grid.set_xlim(x0 - margin, x1 + margin)
    ax_grid.set_ylim(y1 + margin, y0 - margin)
    ax_grid.set_title(f"token grid {g}x{g}, max over {len(grid)} kept masks (cyan: model input)", fontsize=9)
    fig.colorbar(mesh, ax=ax_grid, shrink=0.8)
    for ax in (ax_img, ax_grid):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.fill(title, 110) + "\n" + subtitle, fontsize=9)
    return fig
