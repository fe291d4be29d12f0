"""Parquet manifests (polars), written atomically with provenance and checked against a contract."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from a3tune.io.atomic import atomic_file
from a3tune.io.contracts import check_contract
from a3tune.io.provenance import PROVENANCE_KEY, Provenance


def write_parquet(
    df: pl.DataFrame, path: str | os.PathLike, provenance: Provenance, contract: str | None = None
) -> Path:
    """Check ``df`` against ``contract`` (if named), then write it atomically with provenance."""
    if contract is not None:
        check_contract(df, contract)
    path = Path(path)
    with atomic_file(path) as tmp:
        df.write_parquet(tmp, metadata={PROVENANCE_KEY: provenance.to_json()})
    return path


def read_parquet(path: str | os.PathLike, contract: str | None = None) -> pl.DataFrame:
    """Read a manifest; with ``contract``, fail with a clear message if it does not conform."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such artifact: {path}")
    df = pl.read_parquet(path)
    if contract is not None:
        check_contract(df, contract, source=str(path))
    return df


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's key/value schema metadata, decoded (pandas/arrow internals dropped)."""
    meta = pq.ParquetFile(path).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}
