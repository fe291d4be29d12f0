"""Image files: safe path resolution under a data root, hashing, measuring and decoding.

A bad image is described, never fatal: ``probe_image`` returns a record with a ``status`` and an
``error`` for a missing, empty, undecodable or oversized file, and the stages downstream skip it.
A path that leaves the data root is different: it is a malformed (or hostile) data set file, and
``resolve_under`` raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Decompression-bomb guard: images past this many pixels are refused before decoding.
MAX_PIXELS = 64_000_000

STATUS_OK = "ok"
STATUS_MISSING = "missing"
STATUS_EMPTY = "empty"
STATUS_UNREADABLE = "unreadable"
STATUS_TOO_LARGE = "too_large"


class PathEscapeError(ValueError):
    """A path in a data set file that points outside its data root."""


def resolve_under(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and anything that resolves outside ``root``.

    Symlinks are resolved before the check, so a link inside the root that points out is refused.
    """
    root = Path(root).resolve()
    if not relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise PathEscapeError(f"path {relative!r} must be relative to the data root {root}")
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise PathEscapeError(f"path {relative!r} escapes the data root {root} (resolves to {candidate})")
    return candidate


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: str
    sha256: str | None
    height: int | None
    width: int | None
    status: str
    error: str | None = None
    format: str | None = None
    mode: str | None = None


def probe_image(root: str | os.PathLike, relative: str, max_pixels: int = MAX_PIXELS) -> ImageRecord:
    """Hash and measure one image without fully trusting it; never raises for a bad file."""
    path = resolve_under(root, relative)

    def bad(status: str, error: str, sha: str | None = None) -> ImageRecord:
        return ImageRecord(relative, sha, None, None, status, error)

    if not path.is_file():
        return bad(STATUS_MISSING, f"no such file: {relative}")
    data = path.read_bytes()
    if not data:
        return bad(STATUS_EMPTY, "zero-byte file")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return bad(STATUS_TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels", sha)
            image.load()  # decode fully: truncated or corrupt data fails here, not in a later stage
            return ImageRecord(relative, sha, height, width, STATUS_OK, None, image.format, image.mode)
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unreadable
        return bad(STATUS_UNREADABLE, f"{type(exc).__name__}: {exc}", sha)


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to uint8 RGB (H, W, 3).

    16-bit greyscale is rescaled by its own range (medical PNGs rarely use the full 16 bits),
    CMYK and palette images are converted, alpha is dropped.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{path}: {image.width}x{image.height} exceeds {max_pixels} pixels")
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                low, high = float(array.min()), float(array.max())
                scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
                grey = np.round(scaled).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
