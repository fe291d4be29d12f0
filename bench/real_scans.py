"""Real-image proposal benchmark: slices of real MRI volumes with real masks on the same voxel grid.

    python bench/real_scans.py OUT [--sources colin27,mni152] [--mricron DIR] [--nilearn PATH]
                                   [--axial N] [--coronal N] [--min-area PX]

Sources, read from where their packages install them (override with the flags):

- ``colin27`` (``apt-get install mricron-data``, /usr/share/mricron/templates): ``ch2.nii.gz``, the
  Colin27 single-subject T1 MRI (1 mm, 181 x 217 x 181); ``aal.nii.gz`` + ``aal.nii.txt``, the AAL
  atlas drawn on that scan (116 regions: kinds cortical_region, subcortical = caudate, putamen,
  pallidum, thalamus, hippocampus, amygdala, and cerebellar_region = cerebellum and vermis);
  ``ch2bet.nii.gz``, its brain-extracted copy (non-zero voxels: kind brain).
- ``mni152``: the MNI ICBM152 2009a symmetric T1 template with its grey- and white-matter probability
  maps (1 mm, 197 x 233 x 189), the three files shipped inside the nilearn wheel under
  ``nilearn/datasets/data`` (an installed nilearn, its unpacked data folder or the ``.whl`` itself:
  ``pip download --no-deps nilearn==0.14.1``); nilearn's fetchers are never used. Masks: probability
  >= 0.5 (grey_matter, white_matter) and grey + white >= 0.5 (brain).

Two **levels** of structure, each a full set of masks for every slice (column ``level``):

- ``anatomy``: the structures a question names. The AAL parcels are merged by the atlas's own
  anatomical code (the third column of ``aal.nii.txt``; its thousands digit is the lobe) into lobes
  per hemisphere (kind lobe: frontal, insula, limbic, occipital, parietal, temporal), the
  cerebellum per hemisphere and the vermis (kind cerebellum), and the central nuclei stay one by
  one (kind deep_nucleus: caudate, putamen, pallidum, thalamus); plus brain, grey and white matter.
  At most 22 structures on a slice.
- ``parcels``: every atlas region as labelled (the 116 AAL parcels), plus brain, grey and white
  matter: up to 44 structures on a slice, more than the 25 proposals a generator may keep. Most
  parcel boundaries are lines the atlas draws across uniform cortex, not edges in the image.

Every volume is reoriented to RAS. A slice is shown in neurological convention: axial slices with
anterior at the top, coronal slices with superior at the top, the patient's right on the image's
right. Slices are taken at ``--axial`` / ``--coronal`` evenly spaced planes strictly inside the range
where the source's brain mask covers at least ``EXTENT_SHARE`` of its largest area in that plane.
Intensities map linearly from the source's fixed window (``WINDOWS``, in the file's stored units; both
sources are uint8) to 0-255, clipped, grey in all three channels; the slice is then zero-padded to a
centred square. A labelled structure is written for a slice when it covers >= ``--min-area`` pixels.

Output (built in a temporary sibling and renamed into place; same inputs give byte-identical files):
``images/<slice_id>.png`` (RGB), ``masks/<slice_id>.npz`` (one bool array per structure, image-sized),
``index.parquet`` (slice_id, source, plane, index, level, structure, kind, area_px, components;
a structure of both levels has a row for each, one mask) and
``provenance.json`` (sources' sha256, parameters, package versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from a3tune.io import Provenance, atomic_dir, write_parquet
from a3tune.io.provenance import hash_bytes

MRICRON = Path("/usr/share/mricron/templates")
NILEARN_DATA = "nilearn/datasets/data"
MNI_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
WINDOWS = {"colin27": (0.0, 160.0), "mni152": (0.0, 240.0)}  # about the 99th percentile inside the brain
EXTENT_SHARE = 0.25
SUBCORTICAL = ("Caudate", "Putamen", "Pallidum", "Thalamus", "Hippocampus", "Amygdala")
PLANES = ("axial", "coronal")
LEVELS = ("anatomy", "parcels")
# AAL's anatomical code, thousands digit -> lobe (7: central nuclei, 9: cerebellum, 91xx: vermis)
LOBES = {2: "Frontal", 3: "Insula", 4: "Limbic", 5: "Occipital", 6: "Parietal", 8: "Temporal"}
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
VERSIONS = ("a3tune", "nibabel", "numpy", "opencv-python-headless", "polars")


@dataclasses.dataclass
class Volume:
    """One scan and its masks on the same RAS voxel grid; each layer maps label values to structures."""

    source: str
    image: np.ndarray
    window: tuple[float, float]
    layers: list[tuple[np.ndarray, dict[int, tuple[str, str]], tuple[str, ...]]]  # labels, {value: (structure, kind)}, levels
    brain: np.ndarray  # bool, the slice range's extent
    inputs: dict[str, str]  # file -> sha256


def _nifti(data: bytes):
    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return nib.as_closest_canonical(image)


def _read_all(source: str, files: dict[str, bytes]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """RAS arrays of NIfTI files that must share one voxel grid, and every file's sha256."""
    arrays, grid = {}, None
    for name, data in files.items():
        if not name.endswith((".nii", ".nii.gz")):
            continue
        image = _nifti(data)
        if grid is None:
            grid = (name, image.shape, image.affine)
        elif image.shape != grid[1] or not np.allclose(image.affine, grid[2], atol=1e-4):
            raise ValueError(f"{source}: {name} {image.shape} is not on the voxel grid of {grid[0]} {grid[1]}")
        arrays[name] = np.asarray(image.dataobj)
    return arrays, {f"{source}/{name}": hash_bytes(data) for name, data in sorted(files.items())}


def _files(location: Path, names: list[str], hint: str) -> dict[str, bytes]:
    """Bytes of the named files in a folder, or in a wheel's ``nilearn/datasets/data``."""
    if location.suffix == ".whl":
        with zipfile.ZipFile(location) as wheel:
            return {name: wheel.read(f"{NILEARN_DATA}/{name}") for name in names}
    missing = [str(location / name) for name in names if not (location / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: {hint}")
    return {name: (location / name).read_bytes() for name in names}


def aal_kind(name: str) -> str:
    if name.startswith(("Cerebelum", "Vermis")):
        return "cerebellar_region"
    return "subcortical" if name.startswith(SUBCORTICAL) else "cortical_region"


def aal_anatomy(name: str, code: int) -> tuple[str, str]:
    """(structure, kind) at the anatomy level of the AAL parcel ``name`` with anatomical ``code``."""
    side = name.rsplit("_", 1)[-1]
    if code // 1000 == 7:
        return name, "deep_nucleus"
    if code // 100 == 91:
        return "Vermis", "cerebellum"
    if code // 1000 == 9:
        return f"Cerebellum_{side}", "cerebellum"
    if code // 1000 not in LOBES or side not in ("L", "R"):
        raise ValueError(f"AAL parcel {name} has code {code}: no lobe for it (known thousands: {sorted(LOBES)}, 7, 9)")
    return f"{LOBES[code // 1000]}_lobe_{side}", "lobe"


def anatomy_layer(atlas: np.ndarray, parcels: dict[int, tuple[str, int]]) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    """The atlas relabelled to anatomy-level structures, and their table {label: (structure, kind)};
    ``parcels`` maps each atlas value to its (parcel name, AAL code)."""
    groups = {value: aal_anatomy(name, code) for value, (name, code) in parcels.items()}
    numbers = {group: i + 1 for i, group in enumerate(sorted(set(groups.values())))}
    lookup = np.zeros(max(int(atlas.max()), max(parcels)) + 1, dtype=np.int16)
    for value, group in groups.items():
        lookup[value] = numbers[group]
    return lookup[atlas.astype(np.int64)], {number: group for group, number in numbers.items()}


def colin27(root: Path) -> Volume:
    """Colin27 T1 (mricron-data) with the AAL atlas and its brain-extracted copy."""
    files = _files(root, ["ch2.nii.gz", "aal.nii.gz", "aal.nii.txt", "ch2bet.nii.gz"], "apt-get install mricron-data")
    arrays, inputs = _read_all("colin27", files)
    parcels = {}
    for line in files["aal.nii.txt"].decode().splitlines():
        if line.strip():
            value, name, code = line.split()[:3]
            parcels[int(value)] = (name, int(code))
    atlas = arrays["aal.nii.gz"]
    brain = arrays["ch2bet.nii.gz"] > 0
    layers = [(brain.astype(np.uint8), {1: ("brain", "brain")}, LEVELS),
              (atlas, {value: (name, aal_kind(name)) for value, (name, _) in parcels.items()}, ("parcels",)),
              (*anatomy_layer(atlas, parcels), ("anatomy",))]  # fmt: skip
    return Volume("colin27", arrays["ch2.nii.gz"], WINDOWS["colin27"], layers, brain, inputs)


def mni152(location: Path) -> Volume:
    """MNI152 2009a T1 template (nilearn's wheel) with grey / white matter at probability >= 0.5."""
    names = list(MNI_FILES.values())
    arrays, inputs = _read_all("mni152", _files(location, names, "pip install nilearn==0.14.1 (or pass --nilearn)"))
    # The probability maps are stored as uint8 0-255 (scale 1), so 0.5 is 128.
    grey, white = (arrays[MNI_FILES[k]].astype(np.int32) for k in ("gm", "wm"))
    brain = grey + white >= 128
    layers = [(brain.astype(np.uint8), {1: ("brain", "brain")}, LEVELS),
              ((grey >= 128).astype(np.uint8), {1: ("grey_matter", "grey_matter")}, LEVELS),
              ((white >= 128).astype(np.uint8), {1: ("white_matter", "white_matter")}, LEVELS)]  # fmt: skip
    return Volume("mni152", arrays[MNI_FILES["t1"]], WINDOWS["mni152"], layers, brain, inputs)


def nilearn_location() -> Path:
    """The installed nilearn's data folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: pip install nilearn==0.14.1, or pass --nilearn PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One RAS plane as an image: rows anterior (axial) or superior (coronal) first, columns left to right."""
    cut = volume[:, :, index] if plane == "axial" else volume[:, index, :]
    return np.ascontiguousarray(cut.T[::-1])


def pad_square(image: np.ndarray) -> np.ndarray:
    side = max(image.shape[:2])
    top, left = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
    out = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    out[top : top + image.shape[0], left : left + image.shape[1]] = image
    return out


def to_rgb(cut: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    grey = np.clip((cut.astype(np.float64) - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def planes(brain: np.ndarray, plane: str, n: int) -> list[int]:
    """n evenly spaced planes strictly inside the range where the brain covers >= EXTENT_SHARE of its largest area."""
    area = brain.sum(axis=(0, 1)) if plane == "axial" else brain.sum(axis=(0, 2))
    inside = np.flatnonzero(area >= EXTENT_SHARE * area.max())
    return [int(round(v)) for v in np.linspace(inside[0], inside[-1], n + 2)[1:-1]]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed's layout with fixed entry times, so equal masks give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entry.getvalue())
    return buffer.getvalue()


def slice_structures(volume: Volume, plane: str, index: int, min_area: int) -> list[tuple[str, str, str, np.ndarray]]:
    """(level, structure, kind, square bool mask) for the labelled structures of one slice above min_area."""
    found = []
    for labels, table, levels in volume.layers:
        cut = pad_square(plane_slice(labels, plane, index))
        for value in np.unique(cut):
            if int(value) in table and np.count_nonzero(cut == value) >= min_area:
                structure, kind = table[int(value)]
                found.extend((level, structure, kind, cut == value) for level in levels)
    return found


def build(volumes: list[Volume], out: Path, axial: int, coronal: int, min_area: int) -> Path:
    """Write the benchmark folder for the given volumes (see the module docstring)."""
    rows = []
    params = {"axial": axial, "coronal": coronal, "min_area": min_area, "extent_share": EXTENT_SHARE,
              "windows": {v.source: list(v.window) for v in volumes}}  # fmt: skip
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for volume in volumes:
            for plane, n in zip(PLANES, (axial, coronal)):
                for index in planes(volume.brain, plane, n):
                    slice_id = f"{volume.source}-{plane}-{index:03d}"
                    rgb = to_rgb(pad_square(plane_slice(volume.image, plane, index)), volume.window)
                    (tmp / "images" / f"{slice_id}.png").write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
                    found = slice_structures(volume, plane, index, min_area)
                    masks = {}
                    for level, structure, kind, mask in found:
                        if structure in masks and not np.array_equal(masks[structure], mask):
                            raise ValueError(f"{slice_id}: two different masks named {structure}")
                        masks[structure] = mask
                        components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
                        rows.append((slice_id, volume.source, plane, index, level, structure, kind, int(mask.sum()),
                                     components))  # fmt: skip
                    (tmp / "masks" / f"{slice_id}.npz").write_bytes(npz_bytes(masks))
        columns = ["slice_id", "source", "plane", "index", "level", "structure", "kind", "area_px", "components"]
        index_df = pl.DataFrame(rows, schema=columns, orient="row")
        inputs = {k: v for volume in volumes for k, v in volume.inputs.items()}
        versions = {name: importlib.metadata.version(name) for name in VERSIONS}
        provenance = Provenance(stage="real_scans", params=params | {"versions": versions}, inputs=inputs)
        write_parquet(index_df, tmp / "index.parquet", provenance)
        (tmp / "provenance.json").write_text(json.dumps(json.loads(provenance.to_json()), indent=1, sort_keys=True) + "\n")
    return out


def load_slices(
    root: Path, n: int | None = None, level: str = "anatomy"
) -> list[tuple[str, np.ndarray, list[tuple[str, str, np.ndarray]]]]:
    """(slice_id, RGB image, [(kind, structure, mask)]) at ``level`` (see the module docstring) for n
    evenly spaced slices of a built folder (all if None)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; known: {LEVELS}")
    index = pl.read_parquet(Path(root) / "index.parquet")
    if "level" not in index.columns:
        raise ValueError(f"{root} was built before structure levels existed: rebuild it with bench/real_scans.py")
    index = index.filter(pl.col("level") == level)
    ids = sorted(index["slice_id"].unique().to_list())
    if n is not None and n < len(ids):
        ids = [ids[int(round(i))] for i in np.linspace(0, len(ids) - 1, n)]
    out = []
    for slice_id in ids:
        image = cv2.imread(str(Path(root) / "images" / f"{slice_id}.png"), cv2.IMREAD_COLOR)[..., ::-1]
        with np.load(Path(root) / "masks" / f"{slice_id}.npz") as masks:
            rows = index.filter(pl.col("slice_id") == slice_id).iter_rows(named=True)
            truth = [(r["kind"], r["structure"], masks[r["structure"]]) for r in rows]
        out.append((slice_id, np.ascontiguousarray(image), truth))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (replaced atomically)")
    parser.add_argument("--sources", default="colin27,mni152", help="comma-separated subset of colin27,mni152")
    parser.add_argument("--mricron", type=Path, default=MRICRON, help=f"mricron-data templates folder (default {MRICRON})")
    parser.add_argument("--nilearn", type=Path, help="nilearn's datasets/data folder or wheel (default: installed nilearn)")
    parser.add_argument("--axial", type=int, default=8, help="axial slices per volume (default 8)")
    parser.add_argument("--coronal", type=int, default=4, help="coronal slices per volume (default 4)")
    parser.add_argument("--min-area", type=int, default=30, help="smallest structure kept, in pixels (default 30)")
    args = parser.parse_args(argv)
    loaders = {"colin27": lambda: colin27(args.mricron), "mni152": lambda: mni152(args.nilearn or nilearn_location())}
    names = args.sources.split(",")
    unknown = set(names) - set(loaders)
    if unknown:
        raise SystemExit(f"unknown sources {sorted(unknown)}; known: {sorted(loaders)}")
    build([loaders[name]() for name in names], args.out, args.axial, args.coronal, args.min_area)
    index = pl.read_parquet(args.out / "index.parquet")
    per_level = ", ".join(f"{(index['level'] == level).sum()} at level {level}" for level in LEVELS)
    print(f"{args.out}: {index['slice_id'].n_unique()} slices; structures: {per_level}")
    print(index.group_by("level", "source", "kind").agg(pl.len().alias("structures"),
                                                        pl.col("area_px").median().alias("median_px"))
          .sort("level", "source", "kind"))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
