"""Artifact I/O shared by every stage: atomic writes, provenance, Parquet manifests, Zarr stores."""

from a3tune.io.atomic import atomic_dir, atomic_file
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, hash_path, read_provenance
from a3tune.io.zarr_store import build_store, open_store, write_store

__all__ = [
    "Provenance",
    "atomic_dir",
    "build_store",
    "atomic_file",
    "hash_path",
    "open_store",
    "read_parquet",
    "read_provenance",
    "write_parquet",
    "write_store",
]
