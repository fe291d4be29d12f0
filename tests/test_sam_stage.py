"""Stage sam_masks: shards, the content-addressed cache (incremental reruns), gather, statuses."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.io import open_store, read_parquet, read_provenance
from a3tune.labels.sam_stage import gather, run_shard

# Random tiny SAM: thresholds at zero so that it proposes something on every image.
TINY = {"backend": "tiny", "seed": 0}
PERMISSIVE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "points_per_side": 4, "crop_n_layers": 0,
              "min_side": 0, "max_area": 65536, "border_margin": -1, "min_mask_region_area": 0}  # fmt: skip


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "raw"
    generate(PhantomConfig.from_dict({"n_images": {"train": 4, "val": 1, "test": 1}, "size": 96, "lesion_radius": [3, 5]}), root)
    samples, images = tmp_path / "samples.parquet", tmp_path / "images.parquet"
    import_dataset("phantom", root, "phantom", samples, images, progress=False)
    return root, images


def _run(tmp_path, root, images, shards=2, **kwargs):
    stats = []
    for k in range(shards):
        stats.append(
            run_shard(images, root, k, shards, tmp_path / f"shard-{k}.zarr", tmp_path / f"shard-{k}.parquet",
                      cache_dir=tmp_path / "cache", progress=False, **{**TINY, "params": PERMISSIVE, **kwargs})
        )  # fmt: skip
    table = gather([tmp_path / f"shard-{k}.parquet" for k in range(shards)], tmp_path / "proposals.parquet")
    return stats, table


def _reimport(tmp_path, root):
    import_dataset("phantom", root, "phantom", tmp_path / "samples.parquet", tmp_path / "images.parquet", progress=False)


def test_shards_partition_the_images_and_masks_line_up(tmp_path, dataset):
    root, images = dataset
    stats, table = _run(tmp_path, root, images)
    assert sum(s.images for s in stats) == 6 and sum(s.computed for s in stats) == 6
    assert set(table["image_id"]) == set(read_parquet(images)["image_id"])
    for k in range(2):
        masks = open_store(tmp_path / f"shard-{k}.zarr")["masks"][:]
        rows = table.filter((pl.col("shard") == k) & pl.col("mask_row").is_not_null())
        assert len(masks) == rows.height
        assert rows["area"].to_list() == [int(masks[r].sum()) for r in rows["mask_row"]]
    assert read_provenance(tmp_path / "proposals.parquet").params["backend"] == "tiny"


def test_rerun_after_changing_two_images_recomputes_exactly_two(tmp_path, dataset):
    root, images = dataset
    _, first = _run(tmp_path, root, images)
    for path in sorted((root / "images").glob("*.png"))[:2]:
        pixels = np.asarray(Image.open(path)).copy()
        pixels[:8, :8] = 255 - pixels[:8, :8]
        Image.fromarray(pixels).save(path)
    _reimport(tmp_path, root)
    stats, second = _run(tmp_path, root, images)
    assert sum(s.computed for s in stats) == 2 and sum(s.reused for s in stats) == 4
    unchanged = sorted(p.stem for p in (root / "images").glob("*.png"))[2:]
    keep = pl.col("image_id").is_in([f"images/{s}" for s in unchanged])
    cols = ["image_id", "bbox_xywh", "area", "predicted_iou"]
    assert first.filter(keep).select(cols).equals(second.filter(keep).select(cols))


def test_rerun_with_everything_cached_does_not_load_the_model(tmp_path, dataset, monkeypatch):
    root, images = dataset
    _run(tmp_path, root, images)
    import a3tune.labels.sam_backends as backends

    monkeypatch.setattr(backends, "build_sam", lambda *a, **k: pytest.fail("model loaded although all cached"))
    stats, _ = _run(tmp_path, root, images)
    assert sum(s.computed for s in stats) == 0


def test_bad_images_and_empty_results_get_statuses(tmp_path, dataset):
    root, images = dataset
    victim = sorted((root / "images").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    _reimport(tmp_path, root)
    # Reference thresholds on a random model: typically nothing survives, which is a status.
    stats, table = _run(tmp_path, root, images, params={"pred_iou_thresh": 0.99, "stability_score_thresh": 0.99})
    statuses = dict(table.group_by("status").len().iter_rows())
    assert statuses.get("image_unreadable") == 1
    assert statuses.get("no_proposals", 0) + statuses.get("ok", 0) >= 5


def test_shard_index_checked(tmp_path, dataset):
    root, images = dataset
    with pytest.raises(ValueError, match="shard 2"):
        run_shard(images, root, 2, 2, tmp_path / "s.zarr", tmp_path / "s.parquet", cache_dir=tmp_path, **TINY)
