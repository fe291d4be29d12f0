"""Zarr v3 stores for mask arrays, written atomically with provenance in the group attributes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import zarr

from a3tune.io.atomic import atomic_dir
from a3tune.io.provenance import PROVENANCE_KEY, Provenance


def _chunks(array: np.ndarray) -> tuple[int, ...]:
    """One leading-axis item per chunk (one mask per chunk for (n, S, S) masks)."""
    return (1, *array.shape[1:]) if array.ndim > 1 else (max(1, min(len(array), 65536)),)


def write_store(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    provenance: Provenance,
    chunks: Mapping[str, tuple[int, ...]] | None = None,
) -> Path:
    """Write ``arrays`` into a new Zarr v3 group at ``path``, atomically, with provenance."""
    chunks = dict(chunks or {})
    with build_store(path, provenance) as group:
        for name, data in arrays.items():
            data = np.asarray(data)
            group.create_array(name, data=data, chunks=chunks.get(name, _chunks(data)))
    return Path(path)


@contextlib.contextmanager
def build_store(path: str | os.PathLike, provenance: Provenance) -> Iterator[zarr.Group]:
    """Yield an empty Zarr v3 group to fill incrementally (arrays larger than memory).

    The group lives in a temporary sibling until the block ends without error; only then is it
    given its provenance and renamed to ``path``.
    """
    with atomic_dir(path) as tmp:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        yield group
        group.attrs[PROVENANCE_KEY] = json.loads(provenance.to_json())


def open_store(path: str | os.PathLike) -> zarr.Group:
    """Open a finished store read-only; a missing or half-written one is a clear error."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"no Zarr store at {path}")
    group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    if PROVENANCE_KEY not in group.attrs:
        raise ValueError(f"{path} is a Zarr store without a3tune provenance: not an a3tune artifact")
    return group
