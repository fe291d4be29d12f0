"""Turn a data set in its published format into samples.parquet + images.parquet."""

from __future__ import annotations

import collections
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from a3tune.data.images import STATUS_OK, probe_image, resolve_under
from a3tune.data.records import RawDataset, RawSample, check_samples
from a3tune.io.parquet import write_parquet
from a3tune.io.provenance import Provenance, hash_file

log = logging.getLogger(__name__)

FORMATS = ("slake", "vqarad", "pathvqa", "r2gen", "phantom")  # module a3tune.data.<format> has read()


def read_dataset(fmt: str, root: str | os.PathLike, **options: Any) -> RawDataset:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data set format {fmt!r}; supported: {', '.join(FORMATS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    reader = importlib.import_module(f"a3tune.data.{fmt}")
    raw = reader.read(root, **options)
    check_samples(raw.samples)
    for sample in raw.samples:  # refuse escaping paths before any work on images
        resolve_under(root, sample.image_path)
        if sample.gt_mask_path:
            resolve_under(root, sample.gt_mask_path)
    return raw


def image_id_for(path: str) -> str:
    """A stable image id: the path relative to the data root, without its extension."""
    return str(Path(path).with_suffix("").as_posix())


def build_images(root: Path, paths: list[str], progress: bool = True) -> pl.DataFrame:
    rows = []
    for path in tqdm(paths, desc="images", unit="img", disable=not progress, mininterval=1.0):
        rec = probe_image(root, path)
        rows.append(
            {
                "image_id": image_id_for(path),
                "path": rec.path,
                "sha256": rec.sha256,
                "height": rec.height,
                "width": rec.width,
                "status": rec.status,
                "error": rec.error,
                "format": rec.format,
                "mode": rec.mode,
            }
        )
    schema = {
        "image_id": pl.String, "path": pl.String, "sha256": pl.String, "height": pl.Int32, "width": pl.Int32,
        "status": pl.String, "error": pl.String, "format": pl.String, "mode": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def build_samples(dataset: str, samples: list[RawSample]) -> pl.DataFrame:
    extra_keys = sorted({k for s in samples for k in s.extra})
    rows = []
    for s in samples:
        row = {
            "sample_id": s.sample_id,
            "dataset": dataset,
            "split": s.split,
            "image_id": image_id_for(s.image_path),
            "question": s.question,
            "answer": s.answer,
            "answer_type": s.answer_type,
            "task": s.task,
            "organ": s.organ,
            "location": s.location,
            "modality": s.modality,
            "gt_mask_ref": s.gt_mask_path,
        }
        row.update({k: s.extra.get(k) for k in extra_keys})
        rows.append(row)
    schema = {c: pl.String for c in (
        "sample_id", "dataset", "split", "image_id", "question", "answer", "answer_type", "task",
        "organ", "location", "modality", "gt_mask_ref",
    )}  # fmt: skip
    schema.update({k: pl.String for k in extra_keys})
    return pl.DataFrame(rows, schema=schema)


def import_dataset(
    fmt: str,
    root: str | os.PathLike,
    dataset: str,
    samples_out: str | os.PathLike,
    images_out: str | os.PathLike,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read, check, probe images and write both manifests (atomically, with provenance)."""
    root = Path(root)
    options = dict(options or {})
    raw = read_dataset(fmt, root, **options)
    samples = build_samples(dataset, raw.samples)
    paths = sorted({s.image_path for s in raw.samples})
    images = build_images(root, paths, progress=progress)

    statuses = collections.Counter(images["status"].to_list())
    bad = {k: v for k, v in statuses.items() if k != STATUS_OK}
    log.info("%s: %d samples on %d images; image status %s", dataset, samples.height, images.height, dict(statuses))
    for row in images.filter(pl.col("status") != STATUS_OK).iter_rows(named=True):
        log.warning("image %s: %s (%s)", row["path"], row["status"], row["error"])
    if bad:
        log.warning("%s: %d of %d images are not usable; their samples stay, marked by image status", dataset,
                    sum(bad.values()), images.height)

    params = {"format": fmt, "dataset": dataset, "root": str(root), "options": options}
    inputs = {str(f.relative_to(root) if f.is_relative_to(root) else f): hash_file(f) for f in raw.files}
    write_parquet(samples, samples_out, Provenance("import", params, inputs), contract="samples")
    # images.parquet is derived from the images themselves: their hashes are its inputs.
    write_parquet(images, images_out, Provenance("import", params, inputs), contract="images")
    return samples, images
