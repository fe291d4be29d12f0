"""``a3tune inspect PATH``: a human-readable account of any artifact of the pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from a3tune.io.atomic import is_temporary
from a3tune.io.contracts import CONTRACTS, ContractError, check_contract
from a3tune.io.provenance import Provenance, read_provenance


def inspect_path(path: str | os.PathLike) -> str:
    """Describe a Parquet manifest, a Zarr store, an artifact directory, or every artifact under a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    if path.is_file() and path.suffix == ".parquet":
        return _parquet(path)
    if (path / "zarr.json").is_file():
        return _zarr(path)
    if path.is_dir() and (path / "provenance.json").is_file():
        return _directory(path)
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*")
            if not any(is_temporary(part) for part in p.relative_to(path).parts)
            and (p.suffix == ".parquet" or (p / "zarr.json").is_file() or (p / "provenance.json").is_file())
            and not any((q / "zarr.json").is_file() for q in p.parents if path in q.parents)
        )  # fmt: skip
        if not found:
            raise ValueError(f"{path}: no a3tune artifacts (Parquet, Zarr store, provenance.json) inside")
        return "\n\n".join(inspect_path(p) for p in found)
    raise ValueError(f"{path}: not an a3tune artifact (expected .parquet, a Zarr store or a directory)")


def _provenance(prov: Provenance | None) -> list[str]:
    if prov is None:
        return ["provenance: MISSING (not written by a3tune, or written by an older tool)"]
    lines = [f"provenance: stage={prov.stage} a3tune={prov.version}"]
    lines.append("  params: " + json.dumps(prov.params, sort_keys=True))
    lines.extend(f"  input {name}: sha256 {digest}" for name, digest in sorted(prov.inputs.items()))
    return lines


def _parquet(path: Path) -> str:
    df = pl.read_parquet(path)
    lines = [f"{path}  (Parquet, {df.height} rows, {df.width} columns)", "schema:"]
    lines.extend(f"  {name}: {dtype}" for name, dtype in df.schema.items())
    contract = path.stem if path.stem in CONTRACTS else None
    if contract:
        try:
            check_contract(df, contract, source=path.name)
            lines.append(f"contract: {contract} ok")
        except ContractError as exc:
            lines.append(f"contract: {contract} BROKEN: {exc}")
    if "status" in df.columns:
        counts = df["status"].value_counts(sort=True)
        lines.append("status: " + ", ".join(f"{s}={n}" for s, n in counts.iter_rows()))
    for column in ("split", "answer_type", "task"):
        if column in df.columns:
            counts = df[column].value_counts(sort=True)
            lines.append(f"{column}: " + ", ".join(f"{s}={n}" for s, n in counts.iter_rows()))
    lines.extend(_provenance(read_provenance(path)))
    return "\n".join(lines)


def _zarr(path: Path) -> str:
    from a3tune.io.zarr_store import open_store

    group = open_store(path)
    lines = [f"{path}  (Zarr v3 store)", "arrays:"]
    for name, array in sorted(group.arrays()):
        lines.append(f"  {name}: shape={array.shape} dtype={array.dtype} chunks={array.chunks}")
    lines.extend(_provenance(read_provenance(path)))
    return "\n".join(lines)


def _directory(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    lines = [f"{path}  (directory artifact, {len(files)} files, {size / 1e6:.1f} MB)"]
    lines.extend(_provenance(read_provenance(path)))
    return "\n".join(lines)
