"""Report figures: metric bars per data set, and attention overlays of the same samples across runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from a3tune.data.images import load_rgb, resolve_under
from a3tune.io.atomic import save_png
from a3tune.io.parquet import read_parquet
from a3tune.labels.audit import read_gt_mask
from a3tune.labels.grid import GridSpec, cell_edges

# The closed-accuracy groups (cue agrees / disagrees, with / without confuser) show only where the
# data set marks them (the phantom): the split that tells looking from following the cue.
BAR_METRICS = (("closed_acc", "closed acc."), ("closed_acc_cue_agrees", "closed, cue\nagrees"),
               ("closed_acc_cue_disagrees", "closed, cue\ndisagrees"), ("closed_acc_confuser", "closed,\nconfuser"),
               ("closed_acc_no_confuser", "closed, no\nconfuser"), ("open_recall", "open recall"),
               ("inside_label", "in weak label"), ("inside_gt", "in ground truth"), ("pointing", "pointing game"))  # fmt: skip


def write_metric_bars(table: pl.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """``metrics-<ds>.png``: per data set, grouped bars (mean over seeds, std as error bars) per method."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    written = []
    for (dataset,), part in table.group_by("dataset", maintain_order=True):
        metrics = [(c, name) for c, name in BAR_METRICS if part[c].is_not_null().any()]
        methods = part["method"].unique(maintain_order=True).to_list()
        if not metrics:
            continue
        fig = Figure(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(methods) / 3), 3.6), dpi=100, layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            runs = part.filter(pl.col("method") == method)
            means = [runs[c].drop_nulls().mean() or 0.0 for c, _ in metrics]
            stds = [runs[c].drop_nulls().std() if runs[c].drop_nulls().len() > 1 else 0.0 for c, _ in metrics]
            ax.bar(np.arange(len(metrics)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds,
                   label=method, capsize=2)  # fmt: skip
        ax.set_xticks(np.arange(len(metrics)), [name for _, name in metrics], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{dataset}: test metrics (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7, ncols=min(len(methods), 4))
        path = Path(out_dir) / f"metrics-{dataset}.png"
        save_png(fig, path)
        written.append(path)
    return written


def write_attention_overlays(
    *, figures_dir: str | os.PathLike, runs: list[tuple[str, str | os.PathLike]], samples: str | os.PathLike,
    images: str | os.PathLike, root: str | os.PathLike, grid: dict, dataset: str, n: int = 6,
) -> Path:  # fmt: skip
    """``attention-<ds>.png``: rows = ``n`` test samples with a ground-truth mask, columns = runs
    in the given order (e.g. base, then A³Tune): the head- and row-averaged attention map over the
    image tokens, drawn where those tokens see the image and stretched to its own min..max (the maps
    of small models are close to uniform), with the ground truth dashed."""
    from matplotlib.figure import Figure

    spec = GridSpec.from_dict(grid)
    maps = {name: read_parquet(path).select("sample_id", "attention_map") for name, path in runs}
    common = set.intersection(*(set(m.filter(pl.col("attention_map").is_not_null())["sample_id"]) for m in maps.values()))
    table = (read_parquet(samples).filter(pl.col("sample_id").is_in(sorted(common)), pl.col("gt_mask_ref").is_not_null())
             .join(read_parquet(images).select("image_id", "path"), on="image_id").sort("sample_id").head(n))  # fmt: skip
    fig = Figure(figsize=(2.6 * len(maps) + 0.4, 2.5 * max(table.height, 1) + 0.4), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(table.height, 1), len(maps), squeeze=False))
    for row, sample in enumerate(table.iter_rows(named=True)):
        image = load_rgb(resolve_under(root, sample["path"]))
        h, w = image.shape[:2]
        gt = read_gt_mask(resolve_under(root, sample["gt_mask_ref"]), max(h, w))
        y_edges, x_edges = cell_edges((h, w), spec)
        for col, (name, table_maps) in enumerate(maps.items()):
            ax = axes[row, col]
            values = np.asarray(table_maps.filter(pl.col("sample_id") == sample["sample_id"])["attention_map"][0])
            ax.imshow(image.mean(axis=2), cmap="gray", extent=(0, w, h, 0))
            stretched = (values - values.min()) / max(values.max() - values.min(), 1e-12)
            ax.pcolormesh(x_edges, y_edges, stretched.reshape(spec.grid, spec.grid), cmap="magma", alpha=0.6, vmin=0, vmax=1)
            sy, sx = gt.shape
            ax.contour((np.arange(sx) + 0.5) * w / sx, (np.arange(sy) + 0.5) * h / sy, gt.astype(float), levels=[0.5],
                       colors=["cyan"], linestyles="--", linewidths=1)  # fmt: skip
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if row == 0 else "", fontsize=9)
            if col == 0:
                ax.set_ylabel(_wrap(sample["question"]), fontsize=7)
    fig.suptitle(f"{dataset}: attention on the image while reading question and answer (cyan: ground truth)", fontsize=9)
    path = Path(figures_dir) / f"attention-{dataset}.png"
    save_png(fig, path)
    return path


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])
