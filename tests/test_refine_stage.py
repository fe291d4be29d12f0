"""Stage refine: label rows, k per task, statuses, proposal rows that point at the right masks."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.io import Provenance, open_store, read_parquet, read_provenance, write_parquet, write_store
from a3tune.io.contracts import CONTRACTS
from a3tune.labels.demo_clip import train_demo_clip
from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.refine_stage import run_refine

S = 64  # working size of the constructed proposals
GRID = {"grid": 4, "input_size": 64, "preprocess": "pad", "mode": "area"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    root = tmp / "raw"
    generate(PhantomConfig.from_dict({"n_images": {"train": 3, "val": 0, "test": 1}, "size": 96,
                                      "lesion_radius": [3, 5], "report_rate": 1.0}), root)  # fmt: skip
    import_dataset("phantom", root, "phantom", tmp / "samples.parquet", tmp / "images.parquet", progress=False)
    clip = train_demo_clip(root, tmp / "clip", steps=2, progress=False)
    return tmp, root, clip


def _write_proposals(tmp, images: pl.DataFrame, per_image: dict[str, int]):
    """Proposals: for each image, n random blob masks; images not in ``per_image`` get none."""
    rng = np.random.default_rng(0)
    masks, rows = [], []
    for image_id in images["image_id"]:
        n = per_image.get(image_id, 0)
        if n == 0:
            rows.append({"image_id": image_id, "sha256": "x", "status": "no_proposals"})
        for _ in range(n):
            y, x = rng.integers(4, S - 20, size=2)
            mask = np.zeros((S, S), bool)
            mask[y : y + 16, x : x + 16] = True
            rows.append({"image_id": image_id, "sha256": "x", "mask_row": len(masks), "bbox_xywh": [int(x), int(y), 16, 16],
                         "area": 256, "predicted_iou": 0.9, "stability_score": 0.9, "status": "ok"})  # fmt: skip
            masks.append(mask)
    schema = {name: col.dtype for name, col in CONTRACTS["proposals"].items()} | {"status": pl.String}
    table = pl.DataFrame(rows, schema=schema).with_columns(pl.lit(0, pl.Int32).alias("shard"))
    params = {"shard": 0, "shards": 1, "params": ProposalParams(working_size=S).to_dict()}
    write_store(tmp / "shard-0.zarr", {"masks": np.stack(masks)}, Provenance("sam_masks", params))
    write_parquet(table, tmp / "proposals.parquet", Provenance("sam_masks_gather", params), contract="proposals")
    return np.stack(masks), table


def test_refine_labels_statuses_and_rows(setup):
    tmp, root, clip = setup
    images = read_parquet(tmp / "images.parquet")
    ids = sorted(images["image_id"])
    all_masks, proposals = _write_proposals(tmp, images, {ids[0]: 10, ids[1]: 3, ids[2]: 6})  # ids[3]: none
    table = run_refine(tmp / "samples.parquet", tmp / "images.parquet", tmp / "proposals.parquet", root, clip,
                       tmp / "labels.zarr", tmp / "labels.parquet", dataset_format="phantom", grid=GRID,
                       top_k={"vqa": 5, "report": 2}, progress=False)  # fmt: skip
    samples = read_parquet(tmp / "samples.parquet")
    assert table["sample_id"].to_list() == samples["sample_id"].to_list()
    joined = table.join(samples.select("sample_id", "task", "image_id"), on=["sample_id", "image_id"])
    store = open_store(tmp / "labels.zarr")
    assert store["masks"].shape[1:] == (5, S, S) and store["grid"].shape[1:] == (5, 4, 4)
    for row in joined.iter_rows(named=True):
        available = {ids[0]: 10, ids[1]: 3, ids[2]: 6}.get(row["image_id"], 0)
        if available == 0:
            assert row["status"] == "no_proposals" and row["label_row"] is None
            continue
        k = 5 if row["task"] == "vqa" else 2
        assert row["n_masks"] == min(k, available) and len(row["all_scores"]) == available
        assert row["clip_scores"] == sorted(row["clip_scores"], reverse=True)
        stored = store["masks"][row["label_row"]]
        for j, proposal_row in enumerate(row["proposal_rows"]):
            assert proposals["image_id"][proposal_row] == row["image_id"]
            np.testing.assert_array_equal(stored[j], all_masks[proposals["mask_row"][proposal_row]])
        assert not stored[row["n_masks"]:].any()
        assert row["status"] == "ok" and np.asarray(store["grid"][row["label_row"]][: row["n_masks"]]).any()
    prov = read_provenance(tmp / "labels.parquet")
    assert prov.stage == "refine" and prov.params["grid"]["grid"] == 4 and set(prov.inputs) >= {"proposals.parquet", "clip"}
    assert json.loads(json.dumps(prov.params))["k"] == 5


def test_refine_min_score_and_unreadable_image(setup, tmp_path):
    tmp, root, clip = setup
    images = read_parquet(tmp / "images.parquet")
    ids = sorted(images["image_id"])
    broken = images.with_columns(
        pl.when(pl.col("image_id") == ids[1]).then(pl.lit("unreadable")).otherwise(pl.col("status")).alias("status"))
    write_parquet(broken, tmp_path / "images.parquet", Provenance("import"), contract="images")
    _write_proposals(tmp, images, {i: 4 for i in ids})
    table = run_refine(tmp / "samples.parquet", tmp_path / "images.parquet", tmp / "proposals.parquet", root, clip,
                       tmp_path / "labels.zarr", tmp_path / "labels.parquet", dataset_format="phantom", grid=GRID,
                       min_score=1e9, progress=False)  # fmt: skip
    statuses = dict(table.select("image_id", "status").unique().iter_rows())
    assert statuses[ids[1]] == "image_unreadable"
    assert {statuses[i] for i in ids if i != ids[1]} == {"below_min_score"}
