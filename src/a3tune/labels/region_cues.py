"""Model-free candidate boxes beyond MSER regions, for the ``"boxes"`` proposal generator.

MSER regions follow intensity steps. On real scans many structures have none of their own: an
atlas region of cortex is a stretch of a ribbon that looks the same as its neighbours, a deep
nucleus differs from the white matter around it by a few grey levels. Box-trained SAMs still
answer a box placed over such a structure with a mask of what lies in it, so this module adds a
**sparse multi-scale box grid over the foreground**: square boxes of each side in ``sides``, at a
stride of half a side, kept where at least ``min_foreground`` of the box is brighter than
``foreground_level`` (padding and air get no prompt) and where no candidate box already covers
the same place (box IoU above ``max_covered_iou``).
"""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box in ``a`` (n, 4) with every box in ``b`` (m, 4): (n, m)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def sparse_box_grid(
    grey: np.ndarray,
    sides: tuple[int, ...],
    *,
    foreground_level: int,
    min_foreground: float,
    covered: np.ndarray | None = None,
    max_covered_iou: float = 1.0,
) -> np.ndarray:
    """xyxy float32 boxes (exclusive ends) of a multi-scale grid over the foreground of a uint8 image.

    For each side s (smaller than the image), boxes at a stride of s / 2 from the top-left corner;
    a box is kept where the share of its pixels above ``foreground_level`` is at least
    ``min_foreground`` and its IoU with every box in ``covered`` (n, 4) is at most ``max_covered_iou``.
    """
    height, width = grey.shape
    # Share of foreground pixels in any box, from an integral image
    integral = np.pad((grey > foreground_level).astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    out = []
    for side in sides:
        if side > min(height, width) or side < 2:
            continue
        stride = max(side // 2, 1)
        ys, xs = np.meshgrid(np.arange(0, height - side + 1, stride), np.arange(0, width - side + 1, stride),
                             indexing="ij")  # fmt: skip
        ys, xs = ys.ravel(), xs.ravel()
        inside = integral[ys + side, xs + side] - integral[ys, xs + side] - integral[ys + side, xs] + integral[ys, xs]
        keep = inside / (side * side) >= min_foreground
        out.append(np.stack([xs, ys, xs + side, ys + side], axis=1)[keep])
    boxes = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 4), dtype=np.float32)
    if covered is not None and len(covered) and len(boxes):
        boxes = boxes[box_iou(boxes, covered.astype(np.float32)).max(axis=1) <= max_covered_iou]
    return boxes.reshape(-1, 4)
