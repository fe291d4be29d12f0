"""What the model-facing stages (probe, tune, score) read of a data set and its weak labels.

``labelled_samples`` joins samples with their usable images and their label rows;
``label_maps`` turns a batch's label rows into grids flattened onto the image tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from a3tune.data.images import STATUS_OK
from a3tune.io.parquet import read_parquet


def labelled_samples(
    samples_path: str | os.PathLike, images_path: str | os.PathLike, labels_table: str | os.PathLike, split: str
) -> pl.DataFrame:
    """The samples of ``split`` whose image is usable, with the image's ``path`` (relative to the data
    root), ``height`` and ``width``, and ``label_row`` (null unless the weak label's status is ok);
    sorted by sample_id."""
    samples = read_parquet(samples_path, contract="samples").filter(pl.col("split") == split)
    images = read_parquet(images_path, contract="images").filter(pl.col("status") == STATUS_OK)
    labels = read_parquet(labels_table, contract="labels")
    ok_row = pl.when(pl.col("label_status") == STATUS_OK).then(pl.col("label_row"))
    return (
        samples.join(images.select("image_id", "path", "height", "width"), on="image_id")
        .join(labels.select("sample_id", "label_row", pl.col("status").alias("label_status")), on="sample_id", how="left")
        .with_columns(ok_row.alias("label_row"))
        .drop("label_status")
        .sort("sample_id")
    )


def label_maps(grids, label_rows: Sequence[int | None], n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a labels store's ``grid`` array (n_labels, k, G, G) for a batch, flattened row-major.

    Returns the maps (B, k, G·G) float32, zero for a sample without a label (``None`` row), and
    which maps are real (B, k) bool: a map with positive sum (rows past a sample's ``n_masks`` are
    empty in the store, and so is a sample without a label).
    """
    k, cells = grids.shape[1], grids.shape[2] * grids.shape[3]
    if cells != n_image_tokens:
        raise ValueError(f"label grids have {cells} cells but the model has {n_image_tokens} image tokens")
    out = np.zeros((len(label_rows), k, n_image_tokens), dtype=np.float32)
    for i, row in enumerate(label_rows):
        if row is not None:
            out[i] = np.asarray(grids[int(row)], dtype=np.float32).reshape(k, -1)
    maps = torch.from_numpy(out)
    return maps, maps.sum(dim=2) > 0
