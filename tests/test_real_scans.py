"""bench/real_scans.py on a constructed volume: byte-identical reruns, and masks that line up with their images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bench_module

nib = pytest.importorskip("nibabel")

SHAPE = (12, 14, 10)  # stored in LAS order: the builder must flip x to reach RAS
CUBE = (slice(2, 5), slice(8, 11), slice(3, 8))  # bright (200), AAL label 1
BLOCK = (slice(7, 10), slice(2, 6), slice(3, 8))  # dark (60), AAL label 2
SLAB = (slice(2, 5), slice(11, 13), slice(3, 8))  # next to the cube, also bright (200), AAL label 3
# Where the cube must appear, in (rows, columns) of the padded square images (see _expected).
EXPECTED = {"axial": ((3, 6), (8, 11)), "coronal": ((3, 8), (7, 10))}


def _write_colin_layout(root):
    """Files named as mricron-data's: a T1-like volume, its AAL-like atlas and label table, its brain mask."""
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (5.0, -7.0, -4.0)
    image = np.full(SHAPE, 20, dtype=np.uint8)
    image[CUBE], image[BLOCK], image[SLAB] = 200, 60, 200
    atlas = np.zeros(SHAPE, dtype=np.uint8)
    atlas[CUBE], atlas[BLOCK], atlas[SLAB] = 1, 2, 3
    brain = np.zeros(SHAPE, dtype=np.uint8)
    brain[1:11, 1:13, 1:9] = 50
    root.mkdir()
    for name, data in {"ch2": image, "aal": atlas, "ch2bet": brain}.items():
        nib.save(nib.Nifti1Image(data, affine), root / f"{name}.nii.gz")
    # Label, name, AAL's anatomical code (thousands digit: 2 frontal lobe, 7 central nuclei)
    (root / "aal.nii.txt").write_text("1 Precentral_L 2001\n2 Thalamus_L 7101\n3 Frontal_Sup_L 2101\n")


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_gives_identical_bytes_and_masks_line_up(tmp_path):
    real_scans = bench_module("real_scans")
    _write_colin_layout(tmp_path / "src")
    args = ["--sources", "colin27", "--mricron", str(tmp_path / "src"), "--axial", "3", "--coronal", "2", "--min-area", "2"]
    for out in ("a", "b"):
        assert real_scans.main([str(tmp_path / out), *args]) == 0
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert {"index.parquet", "provenance.json"} <= set(first) and any(k.startswith("masks/") for k in first)

    # Window (0, 160): cube and slab 200 -> 255, block 60 -> 96, background 20 -> 32.
    seen, merged = {"axial": 0, "coronal": 0}, 0
    anatomy = {slice_id: {s: (k, m) for k, s, m in truth} for slice_id, _, truth in real_scans.load_slices(tmp_path / "a")}
    for slice_id, image, truth in real_scans.load_slices(tmp_path / "a", level="parcels"):
        grey = image[..., 0]
        assert image.shape == ((14, 14, 3) if "axial" in slice_id else (12, 12, 3))
        assert np.array_equal(image[..., 0], image[..., 2])
        masks = {structure: (kind, mask) for kind, structure, mask in truth}
        assert masks["brain"][0] == "brain" and masks["brain"][1][grey == 255].all()
        # The anatomy level: parcels merged by lobe code, central nuclei one by one, brain at both levels
        assert anatomy[slice_id]["brain"][0] == "brain"
        assert np.array_equal(anatomy[slice_id]["brain"][1], masks["brain"][1])
        assert not {"Precentral_L", "Frontal_Sup_L"} & set(anatomy[slice_id])
        if "Thalamus_L" in masks:
            assert masks["Thalamus_L"][0] == "subcortical" and anatomy[slice_id]["Thalamus_L"][0] == "deep_nucleus"
            assert np.array_equal(masks["Thalamus_L"][1], grey == 96)
            assert np.array_equal(anatomy[slice_id]["Thalamus_L"][1], grey == 96)
        if "Frontal_lobe_L" in anatomy[slice_id]:
            kind, mask = anatomy[slice_id]["Frontal_lobe_L"]
            assert kind == "lobe" and np.array_equal(mask, grey == 255)
            merged += "Frontal_Sup_L" in masks and "Precentral_L" in masks
        if "Precentral_L" not in masks:
            continue
        kind, mask = masks["Precentral_L"]
        assert kind == "cortical_region"
        assert np.array_equal(mask, (grey == 255) & ~masks.get("Frontal_Sup_L", (None, np.zeros_like(mask)))[1])
        plane = slice_id.split("-")[1]
        (top, bottom), (left, right) = EXPECTED[plane]
        rows, cols = np.nonzero(mask)
        assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (top, bottom, left, right), slice_id
        seen[plane] += 1
    assert seen["axial"] == 3 and seen["coronal"] >= 1 and merged >= 1


def test_parcels_without_a_lobe_are_refused():
    real_scans = bench_module("real_scans")
    assert real_scans.aal_anatomy("Vermis_4_5", 9120) == ("Vermis", "cerebellum")
    assert real_scans.aal_anatomy("Cerebelum_Crus1_R", 9012) == ("Cerebellum_R", "cerebellum")
    with pytest.raises(ValueError, match="no lobe"):
        real_scans.aal_anatomy("Mystery_L", 1001)


def test_volumes_off_one_grid_are_refused(tmp_path):
    real_scans = bench_module("real_scans")
    _write_colin_layout(tmp_path / "src")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), dtype=np.uint8), np.eye(4)), tmp_path / "src" / "aal.nii.gz")
    with pytest.raises(ValueError, match="not on the voxel grid"):
        real_scans.colin27(tmp_path / "src")
