"""Provenance: what made an artifact, from what, with which parameters.

Every artifact carries one ``Provenance`` record, stored as JSON under the key ``a3tune`` (Parquet
schema metadata, Zarr group attributes, ``provenance.json`` in other directories). Input hashes are
content hashes, so an audit can tell whether an artifact was built from the files now on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import a3tune

PROVENANCE_KEY = "a3tune"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Who built an artifact: the stage, the code version, its parameters and its inputs' hashes."""

    stage: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # name or path -> sha256
    version: str = a3tune.__version__
    # No timestamp on purpose: a rerun on the same inputs must give a bitwise-identical artifact.

    @classmethod
    def for_inputs(cls, stage: str, params: dict[str, Any], inputs: dict[str, str | os.PathLike]) -> Provenance:
        """Provenance whose input hashes are computed from the given files or directories."""
        return cls(stage=stage, params=params, inputs={k: hash_path(v) for k, v in inputs.items()})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "stage" not in data:
            raise ValueError(f"not an a3tune provenance record (fields {sorted(data)})")
        return cls(**data)


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's relative file names and contents in sorted order.

    Provenance metadata is part of the content, so a directory hash changes whenever any file of
    the store changes; hidden temporary siblings are not inside the directory and do not count.
    """
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash {path}: no such file or directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(rel.encode() + b"\0" + hash_file(file).encode() + b"\n")
    return digest.hexdigest()


def read_provenance(path: str | os.PathLike) -> Provenance | None:
    """The provenance of any artifact (Parquet file, Zarr store, directory with provenance.json)."""
    path = Path(path)
    if path.suffix == ".parquet":
        from a3tune.io.parquet import read_parquet_metadata

        text = read_parquet_metadata(path).get(PROVENANCE_KEY)
        return Provenance.from_json(text) if text else None
    if (path / "zarr.json").is_file():
        meta = json.loads((path / "zarr.json").read_text())
        record = meta.get("attributes", {}).get(PROVENANCE_KEY)
        return Provenance.from_json(json.dumps(record)) if record else None
    if (path / "provenance.json").is_file():
        return Provenance.from_json((path / "provenance.json").read_text())
    return None
