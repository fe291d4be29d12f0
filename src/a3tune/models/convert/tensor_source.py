"""Lazy, file-aware access to the tensors of an original-layout checkpoint folder.

Original LLaVA-Med folders hold safetensors shards (v1.5) or ``pytorch_model-*.bin`` pickles (v1
deltas, LLaMA bases), each with or without an index. ``TensorSource`` lists every tensor's name,
shape, dtype and file without reading the data, and reads one tensor when asked: safetensors
through ``safe_open``, pickles through ``torch.load(mmap=True, weights_only=True)``, so that a
converter can stream a 7B model one output shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those its index names, or its single weights file."""
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
            files = sorted({folder / f for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shard(s) that are not in the folder: {absent}")
            return files
    for name in _SINGLES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{folder}: no weights found (expected one of {[*_INDEXES, *_SINGLES]})"
    )


class TensorSource:
    """Every tensor of a checkpoint folder by name, read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {self.folder}")
        self.info: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for file in _weight_files(self.folder):
            handle = self._open(file)
            for key in handle.keys():
                if key in self.info:
                    raise ValueError(f"tensor {key!r} appears in both {self.info[key].file} and {file}")
                self.info[key] = TensorInfo(file, *self._describe(handle, key))

    def _open(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                self._handles[file] = safe_open(str(file), framework="pt")
            else:
                try:
                    self._handles[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # a legacy (non-zip) pickle or a damaged file
                    raise ValueError(f"{file}: cannot read as a PyTorch state dict ({exc})") from exc
                if not isinstance(self._handles[file], dict):
                    raise ValueError(f"{file}: not a state dict of tensors")
        return self._handles[file]

    @staticmethod
    def _describe(handle, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if isinstance(handle, dict):
            tensor = handle[key]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"entry {key!r} is not a tensor")
            return tuple(tensor.shape), tensor.dtype
        piece = handle.get_slice(key)
        return tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()]

    def keys(self) -> list[str]:
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def where(self, key: str) -> str:
        """``file:key``, for error messages."""
        return f"{self.info[key].file}: {key}"

    def get(self, key: str) -> torch.Tensor:
        handle = self._open(self.info[key].file)
        if isinstance(handle, dict):
            return handle[key].clone()  # off the memory map, so the file can close
        return handle.get_tensor(key)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
