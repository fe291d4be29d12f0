"""The reference implementation's mask filters, and the deterministic order of proposals.

Pure functions of ``Proposals`` columns, each returning the rows to keep (or their order), so that
every generator is filtered the same way and each filter is testable on its own. ``apply_filters``
runs the reference's filters (area, box extent, border, sides) with ``ProposalParams``;
``sort_order`` and ``first_of_duplicates`` give ``generate_proposals`` its fixed order without
duplicate masks.
"""

from __future__ import annotations

import numpy as np

from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.proposal_types import Proposals


def area_below(area: np.ndarray, max_area: int) -> np.ndarray:
    return np.asarray(area) < max_area


def box_has_extent(bbox_xywh: np.ndarray) -> np.ndarray:
    """Non-empty masks spanning at least 2 px each way (SAM's boxes of 1-px masks have w or h 0)."""
    return (bbox_xywh[:, 2] >= 2) & (bbox_xywh[:, 3] >= 2)


def away_from_border(bbox_xywh: np.ndarray, size: int, margin: tuple[int, int]) -> np.ndarray:
    """Boxes outside the first ``margin[0]`` and the last ``margin[1]`` rows and columns."""
    x, y, w, h = bbox_xywh.T
    low, high = margin
    return (x >= low) & (y >= low) & (x + w <= size - high) & (y + h <= size - high)


def sides_above(bbox_xywh: np.ndarray, min_side: int) -> np.ndarray:
    """Boxes whose SAM-style sides (pixel width - 1, pixel height - 1) both exceed ``min_side``."""
    return (bbox_xywh[:, 2] - 1 > min_side) & (bbox_xywh[:, 3] - 1 > min_side)


def sort_order(proposals: Proposals) -> np.ndarray:
    """Row order by area descending, then box x, y, w, h ascending, then predicted IoU descending."""
    x, y, w, h = proposals.bbox_xywh.T
    return np.lexsort((-proposals.predicted_iou, h, w, y, x, -proposals.area))


def first_of_duplicates(masks: np.ndarray) -> np.ndarray:
    """Keep the first of each group of identical masks."""
    seen: set[bytes] = set()
    keep = np.zeros(len(masks), dtype=bool)
    for i, mask in enumerate(masks):
        key = np.packbits(mask).tobytes()
        keep[i] = key not in seen
        seen.add(key)
    return keep


def reference_keep(area: np.ndarray, bbox_xywh: np.ndarray, size: int, params: ProposalParams) -> np.ndarray:
    """The reference's mask filters as one keep column; all are per-mask, so their order does not matter.

    Large masks (reference: area < 40000), empty masks and zero-size boxes (its get_crops), masks at
    the image border (x == 0 or y == 0 or x + w > 253 or y + h > 253), thin and small masks (w <= 12
    or h <= 12)."""
    return (area_below(area, params.max_area) & box_has_extent(bbox_xywh)
            & away_from_border(bbox_xywh, size, params.border_margin) & sides_above(bbox_xywh, params.min_side))  # fmt: skip


def reference_ok(masks: np.ndarray, params: ProposalParams) -> np.ndarray:
    """``reference_keep`` for bare masks, to apply before any cap."""
    found = Proposals.from_masks(masks, np.zeros(len(masks)), np.zeros(len(masks)))
    return reference_keep(found.area, found.bbox_xywh, masks.shape[-1], params)


def apply_filters(found: Proposals, params: ProposalParams) -> Proposals:
    """The proposals that pass the reference's mask filters (``reference_keep``)."""
    return found.filter(reference_keep(found.area, found.bbox_xywh, found.masks.shape[-1], params))
