"""Label audit: metrics on a hand-built label directory, the text report, overlay PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from a3tune.io import Provenance, write_parquet, write_store
from a3tune.labels.audit import label_metrics, label_report
from a3tune.labels.audit_overlays import write_overlays
from a3tune.labels.grid import GridSpec, project_masks

S, K = 16, 3
SPEC = GridSpec(grid=4, input_size=16, preprocess="squash", mode="centre")  # reads mask rows/cols 2, 6, 10, 14
PROV = Provenance(stage="test")


def _box(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((S, S), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


# Working-size masks per labelled sample. The gt of img0 is its top half: rows 0..7 at S=16.
A, B = _box((0, 8), (0, 8)), _box((8, 16), (0, 16))  # s0: IoU 0.5 and 0; union IoU 64/256
C = _box((0, 8), (0, 6))  # s1: IoU 48/128
D, E, F = _box((3, 6), (3, 6)), _box((10, 14), (10, 14)), _box((0, 16), (0, 4))  # s2: no gt; D misses the grid
IMAGES = {"img0": (64, 32), "img1": (48, 48), "img2": (32, 64)}  # (H, W)
LABELS = [  # sample, image, gt, status, masks, scores
    ("s0", "img0", "masks/gt0.png", "ok", [A, B], [30.0, 25.0]),
    ("s1", "img0", "masks/gt0.png", "ok", [C], [28.0]),
    ("s2", "img1", None, "ok", [D, E, F], [31.0, 22.0, 20.0]),
    ("s3", "img2", "masks/gt2.png", "no_proposals", [], []),
]


def write_label_dir(base: Path, spec: GridSpec = SPEC, mutate=None) -> Path:
    """A data root, samples/images manifests and labels/ds exactly as the refine stage lays them out."""
    root = base / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for image_id, (h, w) in IMAGES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    gt0 = np.zeros((64, 32), dtype=np.uint8)
    gt0[:32] = 255  # top half of img0
    Image.fromarray(gt0).save(root / "masks" / "gt0.png")
    gt2 = np.zeros((32, 64), dtype=np.uint8)
    gt2[8:20, 8:40] = 1
    Image.fromarray(gt2).save(root / "masks" / "gt2.png")

    data = base / "data" / "ds"
    samples = pl.DataFrame({
        "sample_id": [r[0] for r in LABELS], "dataset": "ds", "split": "train", "image_id": [r[1] for r in LABELS],
        "question": "Where?", "answer": "here", "answer_type": "open", "task": "vqa", "organ": None,
        "location": "abdomen", "modality": "CT", "gt_mask_ref": [r[2] for r in LABELS],
    }, schema_overrides={"organ": pl.String})  # fmt: skip
    write_parquet(samples, data / "samples.parquet", PROV, contract="samples")
    images = pl.DataFrame({
        "image_id": list(IMAGES), "path": [f"images/{i}.png" for i in IMAGES], "sha256": None,
        "height": [h for h, _ in IMAGES.values()], "width": [w for _, w in IMAGES.values()],
        "status": "ok", "error": None,
    }, schema_overrides={"sha256": pl.String, "height": pl.Int32, "width": pl.Int32, "error": pl.String})  # fmt: skip
    write_parquet(images, data / "images.parquet", PROV, contract="images")

    labelled = [r for r in LABELS if r[4]]
    masks = np.zeros((len(labelled), K, S, S), dtype=bool)
    for i, r in enumerate(labelled):
        masks[i, : len(r[4])] = r[4]
    grid = np.stack([project_masks(m, IMAGES[r[1]], spec) for m, r in zip(masks, labelled)]).astype(np.float16)
    rows, next_row, next_prop = [], 0, 0
    for sample_id, image_id, _, status, kept, scores in LABELS:
        rows.append({
            "sample_id": sample_id, "label_row": next_row if kept else None, "n_masks": len(kept),
            "proposal_rows": list(range(next_prop, next_prop + len(kept))), "clip_scores": scores,
            "query_text": f"Medical image of abdomen. Where is it? ({sample_id})", "status": status,
            "all_scores": scores + [5.0] if kept else [], "image_id": image_id,
        })  # fmt: skip
        next_row += bool(kept)
        next_prop += len(kept)
    labels = pl.DataFrame(rows, schema_overrides={
        "label_row": pl.Int64, "n_masks": pl.Int32, "proposal_rows": pl.List(pl.Int64),
        "clip_scores": pl.List(pl.Float32), "all_scores": pl.List(pl.Float32),
    })  # fmt: skip
    if mutate is not None:
        labels, masks = mutate(labels, masks)
    # Relative paths, as a Snakemake run records them from its working directory.
    params = {"samples": "data/ds/samples.parquet", "images": "data/ds/images.parquet", "root": "raw",
              "k": K, "grid": spec.to_dict(), "working_size": S}  # fmt: skip
    out = base / "labels" / "ds"
    prov = Provenance(stage="refine", params=params)
    write_parquet(labels, out / "labels.parquet", prov, contract="labels")
    write_store(out / "labels.zarr", {"masks": masks, "grid": grid}, prov)
    return out


@pytest.fixture
def label_dir(tmp_path) -> Path:
    return write_label_dir(tmp_path)


def test_metrics_by_hand(label_dir):
    m = label_metrics(label_dir)
    assert (m["k"], m["working_size"], m["grid_shape"], m["grid"]) == (K, S, [4, 4], SPEC.to_dict())
    d = m["datasets"]["ds"]
    assert d["n_samples"] == 4
    assert d["status"] == {"ok": 3, "no_proposals": 1}
    assert d["n_masks"]["histogram"] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert (d["n_masks"]["min"], d["n_masks"]["median"], d["n_masks"]["max"]) == (0, 1.5, 3)
    assert d["clip_scores"]["n"] == 6
    assert (d["clip_scores"]["min"], d["clip_scores"]["median"], d["clip_scores"]["max"]) == (20, 26.5, 31)
    assert d["clip_top1"]["median"] == 30
    assert d["label_area"]["n"] == 3
    assert sorted([d["label_area"]["min"], d["label_area"]["median"], d["label_area"]["max"]]) == pytest.approx(
        [48 / 256, 86 / 256, 192 / 256]
    )
    assert d["empty_grid"] == {"labels": 0, "n_labels": 3, "masks": 1, "n_masks": 6}  # D falls between samples
    assert all(v == 0 for v in d["checks"].values())
    assert json.loads(json.dumps(m))["datasets"]["ds"]["n_samples"] == 4  # plain values, ready for a benchmark


def test_iou_with_ground_truth(label_dir):
    gt = label_metrics(label_dir)["datasets"]["ds"]["gt"]
    assert (gt["n_samples"], gt["n_scored"], gt["n_unlabelled"], gt["n_empty"], gt["n_errors"]) == (3, 2, 1, 0, 0)
    # s0: union A∪B has IoU 64/256 = 0.25, best mask A 0.5; s1: C has 48/128 = 0.375.
    assert gt["iou_union"]["mean"] == pytest.approx((0.25 + 0.375) / 2)
    assert gt["iou_best"]["mean"] == pytest.approx((0.5 + 0.375) / 2)
    assert gt["iou_best"]["median"] == pytest.approx(0.4375)
    assert gt["hit_rate"] == 0.5  # s0 only
    assert gt["hit_rate_all"] == pytest.approx(1 / 3)  # s3 has a gt mask but no label


def test_report_names_statuses_and_numbers(label_dir):
    text = label_report(label_dir)
    for piece in ["[ds] 4 samples", "ok=3", "no_proposals=1", "histogram (n_masks:samples) 0:1 1:1 2:1 3:1",
                  "median 26.50", "1 of 6 kept masks", "3 samples with a mask; 2 scored, 1 unlabelled",
                  "mean 0.438", "50.0% of scored", "33.3% counting unlabelled", "checks: all passed",
                  "grid 4x4 (squash, centre)"]:  # fmt: skip
        assert piece in text, f"{piece!r} not in report:\n{text}"


def test_checks_catch_inconsistent_labels(tmp_path):
    def mutate(labels, masks):
        masks[1, 2] = True  # s1 keeps one mask, row 2 must be empty
        scores = labels["clip_scores"].to_list()
        scores[2] = [20.0, 31.0, 22.0]  # not best first
        return labels.with_columns(pl.Series("clip_scores", scores, dtype=pl.List(pl.Float32))), masks

    checks = label_metrics(write_label_dir(tmp_path, mutate=mutate))["datasets"]["ds"]["checks"]
    assert checks["masks_beyond_n_masks"] == 1 and checks["unsorted_scores"] == 1
    assert "masks_beyond_n_masks=1" in label_report(tmp_path / "labels" / "ds")


def test_missing_samples_and_root_degrade_gracefully(tmp_path):
    label_dir = write_label_dir(tmp_path)
    (tmp_path / "data" / "ds" / "samples.parquet").unlink()
    m = label_metrics(label_dir)
    assert list(m["datasets"]) == ["ds"] and m["samples"] is None
    assert m["datasets"]["ds"]["gt"] is None and m["datasets"]["ds"]["status"] == {"ok": 3, "no_proposals": 1}


@pytest.mark.parametrize("preprocess", ["squash", "pad"])
def test_overlays(tmp_path, preprocess):
    spec = GridSpec(grid=4, input_size=16, preprocess=preprocess, mode="area")
    label_dir = write_label_dir(tmp_path, spec=spec)
    paths = write_overlays(label_dir, tmp_path / "overlays", n=12, seed=0)
    assert sorted(p.name for p in paths) == ["s0.png", "s1.png", "s2.png"]  # only labelled samples
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["s0.png", "s1.png", "s2.png"]  # no debris


def test_overlay_sample_is_seeded_and_survives_a_missing_image(label_dir, tmp_path):
    first = write_overlays(label_dir, tmp_path / "a", n=2, seed=3)
    again = write_overlays(label_dir, tmp_path / "b", n=2, seed=3)
    assert len(first) == 2 and [p.name for p in first] == [p.name for p in again]
    assert first[0].read_bytes() == again[0].read_bytes()  # deterministic figures
    (label_dir.parents[1] / "raw" / "images" / "img1.png").unlink()
    assert len(write_overlays(label_dir, tmp_path / "c", n=12)) == 3
