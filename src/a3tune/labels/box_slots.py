"""The output slots of the ``"boxes"`` generator: which of its filtered masks become proposals.

At most ``max_proposals`` masks, in three tiers, each without a copy of what an earlier tier kept:

1. **Region slots**: the best ``region_slots`` refined masks of the candidate regions, after mask
   NMS by predicted IoU. On phantoms these are every organ and lesion.
2. **Large-region slots**: the ``large_region_slots`` largest candidate regions themselves (area
   first, boundary contrast at least ``min_contrast``). On real MRI these are brain, grey and
   white matter, which a box prompt outlines poorly.
3. **Grid slots**: masks of the sparse box grid (``a3tune.labels.region_cues``) fill what is left,
   largest first, so that the few slots tile the foreground before they go to its small pieces.

Each function returns row indices into the masks it was given; they are pure functions of columns.
"""

from __future__ import annotations

import numpy as np

from a3tune.labels.box_params import BoxProposalParams
from a3tune.labels.mask_ops import greedy_nms, mask_iou_matrix
from a3tune.labels.proposal_filters import reference_ok
from a3tune.labels.proposal_params import ProposalParams


def region_slots(masks: np.ndarray, predicted_iou: np.ndarray, rows: np.ndarray, bp: BoxProposalParams) -> np.ndarray:
    """Of ``masks[rows]``, those kept by mask NMS (higher predicted IoU first), at most ``region_slots``."""
    if not len(rows):
        return rows
    kept = rows[greedy_nms(mask_iou_matrix(masks[rows]), predicted_iou[rows], bp.mask_nms)]
    return kept[: min(bp.region_slots, bp.max_proposals)]


def large_region_slots(
    regions: np.ndarray, contrast: np.ndarray, kept: np.ndarray, params: ProposalParams
) -> np.ndarray:
    """Rows of ``regions`` taken as proposals themselves: the largest that pass the reference filters
    and the contrast filter and overlap no ``kept`` mask (nor each other) above ``mask_nms``; at most
    ``large_region_slots``, and no more than the cap leaves after ``len(kept)``."""
    bp: BoxProposalParams = params.boxes
    room = min(bp.large_region_slots, bp.max_proposals - len(kept))
    big = np.flatnonzero(reference_ok(regions, params) & (contrast >= bp.min_contrast))
    big = big[np.argsort(-regions[big].sum(axis=(1, 2)), kind="stable")]
    taken: list[int] = []
    for i in big[: 4 * bp.large_region_slots]:
        if len(taken) >= room:
            break
        overlap = mask_iou_matrix(regions[i : i + 1], np.concatenate([kept, regions[taken]]))[0]
        if not len(overlap) or overlap.max() <= bp.mask_nms:
            taken.append(int(i))
    return np.array(taken, dtype=np.int64)


def grid_slots(
    masks: np.ndarray, predicted_iou: np.ndarray, stability: np.ndarray, kept: np.ndarray, params: ProposalParams
) -> np.ndarray:
    """Rows of the grid's ``masks`` that fill the slots ``kept`` leaves: the model's filters, the
    reference filters, no copy of a kept mask or of each other (mask IoU above ``grid_mask_nms``),
    largest first."""
    bp: BoxProposalParams = params.boxes
    ok = (predicted_iou > bp.grid_min_predicted_iou) & (stability >= bp.grid_min_stability)
    ok[ok] &= reference_ok(masks[ok], params)
    rows = np.flatnonzero(ok)
    if len(rows) and len(kept):
        rows = rows[mask_iou_matrix(masks[rows], kept).max(axis=1) <= bp.grid_mask_nms]
    if len(rows):
        rows = rows[greedy_nms(mask_iou_matrix(masks[rows]), masks[rows].sum(axis=(1, 2)), bp.grid_mask_nms)]
    return rows[: max(bp.max_proposals - len(kept), 0)]
