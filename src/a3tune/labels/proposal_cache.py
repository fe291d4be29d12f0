"""A content-addressed cache of SAM proposals: one file per (generator settings, image sha256).

Snakemake deletes a job's outputs before it reruns the job, so the proposals of unchanged images
cannot be "copied forward" from the previous shard store. They are kept here instead, outside
every rule's outputs, keyed by what determines them: the backend, its checkpoint hash, the
generator parameters and the image content. A rerun after adding or changing images computes only
those images; moving or renaming an image costs nothing. Entries are written atomically, so a
killed run leaves only complete entries behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from a3tune.io.atomic import atomic_file
from a3tune.labels.proposal_types import Proposals

# Bump when the generator's output for the same settings changes, so stale entries are not reused.
CACHE_FORMAT = 1


def cache_key(settings: dict[str, Any]) -> str:
    """A short stable key for everything that decides the proposals of an image."""
    text = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ProposalCache:
    def __init__(self, root: str | os.PathLike, key: str):
        self.dir = Path(root) / key

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npz"

    def __contains__(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def get(self, sha256: str) -> Proposals:
        with np.load(self._path(sha256), allow_pickle=False) as data:
            n, size = int(data["n"]), int(data["size"])
            bits = np.unpackbits(data["masks"], count=n * size * size)
            return Proposals(
                masks=bits.reshape(n, size, size).astype(bool),
                bbox_xywh=data["bbox_xywh"],
                area=data["area"],
                predicted_iou=data["predicted_iou"],
                stability_score=data["stability_score"],
            )

    def put(self, sha256: str, proposals: Proposals, size: int) -> None:
        with atomic_file(self._path(sha256)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                n=np.int64(len(proposals)),
                size=np.int64(size),
                masks=np.packbits(np.asarray(proposals.masks, dtype=bool).ravel()),
                bbox_xywh=np.asarray(proposals.bbox_xywh, dtype=np.int32).reshape(-1, 4),
                area=np.asarray(proposals.area, dtype=np.int64),
                predicted_iou=np.asarray(proposals.predicted_iou, dtype=np.float32),
                stability_score=np.asarray(proposals.stability_score, dtype=np.float32),
            )
