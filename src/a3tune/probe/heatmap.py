"""The probe's layers × heads heatmap: where the image-attending heads sit, and which were selected."""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from a3tune.io.atomic import save_png


def write_heatmap(table: pl.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """One panel per score column (``score``, and ``inside_score`` when measured); selected heads boxed."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.patches import Rectangle

    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    columns = ["score"] + (["inside_score"] if table["inside_score"].null_count() < table.height else [])
    captions = {"score": "share of post-image\nattention on the image",
                "inside_score": "share of image attention\ninside the weak label"}  # fmt: skip
    ordered = table.sort("layer", "head")
    width = max(3.6, 1.2 + 0.28 * n_heads)
    fig = Figure(figsize=(width * len(columns) + 1, max(3.0, 1.4 + 0.22 * n_layers)), dpi=100, layout="constrained")
    selected = ordered["selected"].to_numpy().reshape(n_layers, n_heads)
    for ax, column in zip(np.atleast_1d(fig.subplots(1, len(columns))), columns):
        values = ordered[column].fill_null(np.nan).to_numpy().reshape(n_layers, n_heads)
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=max(float(np.nanmax(values)), 1e-6),
                          origin="lower", interpolation="nearest")  # fmt: skip
        for layer, head in zip(*np.nonzero(selected)):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{column}: {captions[column]}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.85)
    fig.suptitle(f"{title}; red: the {int(selected.sum())} selected heads".lstrip("; "), fontsize=10)
    save_png(fig, path)
