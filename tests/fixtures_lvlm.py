"""Inputs of the model-facing stages (probe, tune) on a small scale: phantom data, weak labels made
by hand on an 8x8 grid, and a saved tiny LLaVA with that grid (P 112, patch 14, G 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance
from a3tune.io.zarr_store import build_store
from a3tune.models.lvlm import build_tiny_llava


def write_lvlm_inputs(tmp: Path) -> int:
    """Write raw/, samples.parquet, images.parquet, labels.parquet, labels.zarr and model/ into ``tmp``.

    Every training sample gets a label (a 3x3 block) except the first, whose label row is empty
    (status empty_grid). Returns the number of training samples.
    """
    root = tmp / "raw"
    generate(PhantomConfig.from_dict({"n_images": {"train": 4, "val": 1, "test": 1}, "size": 96,
                                      "lesion_radius": [3, 5]}), root)  # fmt: skip
    samples, images = tmp / "samples.parquet", tmp / "images.parquet"
    import_dataset("phantom", root, "phantom", samples, images, progress=False)
    table = read_parquet(samples)
    train = table.filter(pl.col("split") == "train")["sample_id"].to_list()
    rows = []
    grids = np.zeros((len(train), 2, 8, 8), np.float16)
    for i, sample_id in enumerate(train):
        grids[i, 0, 2:5, 3:6] = 1.0
        rows.append({"sample_id": sample_id, "image_id": "x", "label_row": i, "n_masks": 1, "proposal_rows": [0],
                     "clip_scores": [1.0], "all_scores": [1.0], "query_text": "q",
                     "status": "ok" if i else "empty_grid"})  # fmt: skip
    grids[0] = 0
    provenance = Provenance(stage="refine", params={"grid": {"grid": 8, "input_size": 112, "preprocess": "pad",
                                                             "mode": "area"}})  # fmt: skip
    with build_store(tmp / "labels.zarr", provenance) as group:
        group.create_array("grid", shape=grids.shape, dtype=np.float16, chunks=(1, 2, 8, 8))[:] = grids
    scores = pl.List(pl.Float32)
    labels = pl.DataFrame(rows, schema_overrides={"label_row": pl.Int64, "n_masks": pl.Int32, "clip_scores": scores,
                                                   "all_scores": scores})  # fmt: skip
    write_parquet(labels, tmp / "labels.parquet", provenance, contract="labels")
    corpus = table["question"].to_list() + table["answer"].to_list()
    build_tiny_llava(corpus=corpus, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2).save(tmp / "model")
    return len(train)
