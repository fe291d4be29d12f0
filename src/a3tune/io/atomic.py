"""Atomic writes: build an artifact under a temporary sibling name, then rename it into place.

A reader (or a rerun of Snakemake) therefore sees either the previous complete artifact or the new
complete one, never a half-written file or store. Temporary siblings are named
``.<name>.tmp-<random>`` so they are hidden, unique per writer and easy to recognise as debris.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the temporary sibling of an artifact that is still being written (or was abandoned)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to {tmp}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``path`` atomically as a PNG, without the "Software" metadata key
    (which names the matplotlib version), so that the same figure gives the same bytes."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it takes the place of ``path``.

    An existing ``path`` is first renamed aside and deleted only after the new directory is in
    place, so a crash at any point leaves either the old or the new directory (or, between the two
    renames, none, which the next run rebuilds), never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = _tmp_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            _remove(old)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
