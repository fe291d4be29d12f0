"""What a proposal generator returns: the ``Proposals`` column container and its ``Timings``.

Every generator, filter and the proposal cache pass proposals around as ``Proposals``: the masks
of one image at the working size with their boxes, areas and the model's scores, as columns of
equal length. Plain numpy, no model, so that the cache can read and write them without torch.

Boxes are tight pixel boxes ``[x, y, w, h]`` (``w`` = number of columns the mask spans, as in
``a3tune.data.phantom_scene.bbox_xywh``). segment_anything's own boxes, which the reference filtered,
are one pixel smaller (``w = x1 - x0`` with ``x1`` the last column); the filter parameters are
defined so that their defaults make exactly the reference's decisions (``a3tune.labels.proposal_filters``).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Timings:
    """Wall time of one call, and the part of it spent inside the model."""

    total_s: float = 0.0
    encoder_s: float = 0.0  # image encoder forward passes
    decoder_s: float = 0.0  # prompt encoder and mask decoder forward passes
    encoder_calls: int = 0
    decoder_calls: int = 0

    @property
    def model_s(self) -> float:
        return self.encoder_s + self.decoder_s

    @property
    def outside_s(self) -> float:
        return max(0.0, self.total_s - self.model_s)

    @property
    def outside_fraction(self) -> float:
        return self.outside_s / self.total_s if self.total_s > 0 else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Proposals:
    """Proposal masks of one image at the working size S, as columns of equal length n."""

    masks: np.ndarray  # (n, S, S) bool
    bbox_xywh: np.ndarray  # (n, 4) int32, tight pixel boxes
    area: np.ndarray  # (n,) int64, pixels
    predicted_iou: np.ndarray  # (n,) float32
    stability_score: np.ndarray  # (n,) float32
    timings: Timings | None = None

    COLUMNS = ("masks", "bbox_xywh", "area", "predicted_iou", "stability_score")

    def __post_init__(self) -> None:
        dtypes = {"masks": bool, "bbox_xywh": np.int32, "area": np.int64, "predicted_iou": np.float32,
                  "stability_score": np.float32}  # fmt: skip
        for name, dtype in dtypes.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        object.__setattr__(self, "bbox_xywh", self.bbox_xywh.reshape(-1, 4))
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (n, S, S), got shape {self.masks.shape}")
        lengths = {name: len(getattr(self, name)) for name in self.COLUMNS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"proposal columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.masks)

    def filter(self, keep: np.ndarray) -> Proposals:
        """The rows selected by a boolean mask or an index array, in that order."""
        keep = np.asarray(keep)
        if keep.dtype != bool:
            keep = keep.astype(np.int64)
        return dataclasses.replace(self, **{name: getattr(self, name)[keep] for name in self.COLUMNS})

    @classmethod
    def empty(cls, size: int) -> Proposals:
        return cls.from_masks(np.zeros((0, size, size), bool), np.zeros(0), np.zeros(0))

    @classmethod
    def from_masks(cls, masks: np.ndarray, predicted_iou: np.ndarray, stability_score: np.ndarray) -> Proposals:
        """Proposals with boxes and areas computed from the masks."""
        masks = np.asarray(masks, dtype=bool)
        return cls(masks, boxes_from_masks(masks), masks.sum(axis=(1, 2)), predicted_iou, stability_score)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight ``[x, y, w, h]`` boxes of (n, H, W) masks; an empty mask gets ``[0, 0, 0, 0]``."""
    masks = np.asarray(masks, dtype=bool)
    cols, rows = masks.any(axis=1), masks.any(axis=2)  # (n, W), (n, H)
    x0, y0 = cols.argmax(axis=1), rows.argmax(axis=1)
    x1 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)  # exclusive
    y1 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int32)
    boxes[~cols.any(axis=1)] = 0
    return boxes.reshape(-1, 4)
