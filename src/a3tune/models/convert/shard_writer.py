"""Write a planned set of tensors as safetensors shards with an index, one shard in memory at a time.

The sizes are known before any data is read (from the source's headers), so the shards are
assigned up front and named ``model-0000k-of-0000n.safetensors`` as ``save_pretrained`` names
them; each shard's tensors are produced, written and dropped before the next shard starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

Producer = Callable[[], torch.Tensor]
INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"64KB"`` or an integer."""
    if isinstance(text, int):
        return text
    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def assign_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most ``max_bytes`` unless one tensor is larger."""
    shards: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(i)
        filled += size
    return shards


def write_shards(
    out_dir: Path,
    plan: Sequence[tuple[str, int, Producer]],
    *,
    max_bytes: int,
    expect: Callable[[str, torch.Tensor], None],
    progress: bool = True,
) -> dict[str, str]:
    """Write ``plan`` (key, bytes, producer) to ``out_dir``; returns the index's weight map.

    ``expect(key, tensor)`` checks each produced tensor before it is written (shape, dtype).
    """
    groups = assign_shards([size for _, size, _ in plan], max_bytes)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(plan), desc="convert_model", unit="tensor", disable=not progress, mininterval=1.0)
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for i in group:
            key, _, produce = plan[i]
            tensor = produce().contiguous()
            expect(key, tensor)
            tensors[key] = tensor
            weight_map[key] = name
            bar.update()
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors
    bar.close()
    total = sum(size for _, size, _ in plan)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
