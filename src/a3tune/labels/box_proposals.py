"""Proposals for box-trained SAMs (MedSAM, LiteMedSAM): cheap candidate regions, one box prompt each.

Box-trained SAMs have no working automatic mode: their multimask (point) outputs are dead, and a
dense grid of box prompts returns whatever lies in each box, at ~0.1 s per prompt on a CPU
(../shared/STACK.md). This generator spends model calls only on boxes that already hold a
structure:

1. **Candidate regions, no model.** Maximally stable extremal regions (MSER: connected components
   of every grey-level threshold, bright and dark, kept where their area barely changes over
   +-``mser_delta`` levels) of the denoised image, holes filled. Being all thresholds at once, they
   are multi-scale: a 12-px lesion inside an organ and the whole body are both stable regions.
2. **De-duplication before the model.** The model sees only a box, so candidates whose boxes
   overlap by ``candidate_nms`` (box IoU) are one prompt; the one with the highest boundary
   contrast is kept, and at most ``max_candidates``.
3. **One box prompt per candidate**, single-mask output. The encoder runs once per image; each
   prompt's mask decoder sees only a window of the image embedding around its box (the box
   enlarged by ``decoder_window`` of its longer side on each side), which cuts the decoder's cost
   5-20x for organ- and lesion-sized boxes with masks that agree with the full decoder at IoU
   0.98-1.0 (measured on phantoms). Windows are taken from a fixed tiling, so prompts that share a
   window are decoded in one batch (``a3tune.labels.box_decoder``).
4. **Filters**, pure functions of columns: predicted IoU and SAM's stability score; agreement
   between candidate region and refined mask; then the kept mask is the refined one unless the
   candidate region's boundary is ``prefer_region_contrast`` times sharper (LiteMedSAM outlines the
   whole body poorly, IoU 0.64-0.86, where its region has 0.97-0.99); contrast across the kept
   mask's boundary; optionally stability under box jitter; then mask-level NMS by predicted IoU.
   ``predicted_iou`` and ``stability_score`` are the model's for the box prompt, also where the
   region is kept. The reference filters (area, border, sides) run here, before any cap (and again in
   ``generate_proposals``); use ``BOX_GENERATOR_DEFAULTS`` (``min_side`` 8) so that they keep small lesions.
5. **Slots** (at most ``max_proposals``): the best ``region_slots`` refined masks, then the
   ``large_region_slots`` largest candidate regions themselves, then masks of a sparse box grid
   over the foreground where no candidate lies (``a3tune.labels.region_cues``), largest first
   (``a3tune.labels.box_slots``).

An image without candidate regions (a blank image) gets an empty ``Proposals`` without running the
encoder.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from a3tune.compat import ensure_torchvision
from a3tune.labels.box_decoder import decode_boxes, jittered_boxes
from a3tune.labels.box_params import BoxProposalParams
from a3tune.labels.box_slots import grid_slots, large_region_slots, region_slots
from a3tune.labels.mask_ops import boundary_contrast, fill_holes, greedy_nms, paired_mask_iou
from a3tune.labels.proposal_filters import reference_ok
from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.proposal_types import Proposals
from a3tune.labels.region_cues import box_iou, sparse_box_grid
from a3tune.labels.sam_backends import LoadedSam

ensure_torchvision()  # segment_anything imports torchvision

from segment_anything import SamPredictor  # noqa: E402
from segment_anything.utils.amg import calculate_stability_score  # noqa: E402

# What to merge into the config's params (``ProposalParams.from_dict({**BOX_GENERATOR_DEFAULTS, **yours})``)
# for this generator: the reference's ``min_side`` 12 drops every mask under 14 px wide, which cost
# 12% of the phantom lesions (radius 4-8 px at 128 px: 12-32 px wide at 256) and the cue marker; 8
# (masks from 10 px wide) and 6 kept them all.
BOX_GENERATOR_DEFAULTS = {"generator": "boxes", "min_side": 8}


@dataclasses.dataclass(frozen=True, eq=False)
class Candidates:
    """Model-free candidate regions of one image, as columns of equal length n."""

    masks: np.ndarray  # (n, S, S) bool, holes filled
    boxes: np.ndarray  # (n, 4) float32 tight boxes x0, y0, x1, y1 (x1, y1 exclusive)

    def __len__(self) -> int:
        return len(self.masks)

    def filter(self, keep: np.ndarray) -> Candidates:
        keep = np.asarray(keep)
        return Candidates(self.masks[keep], self.boxes[keep])


# ------------------------------------------------------------------------------------------------
# Candidate regions (no model)


def denoised_grey(image: np.ndarray, sigma: float) -> np.ndarray:
    """Grey levels of an (S, S, 3) uint8 RGB image, Gaussian-smoothed with ``sigma`` px (0: none)."""
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return cv2.GaussianBlur(grey, (0, 0), sigma) if sigma > 0 else grey


def candidate_regions(
    grey: np.ndarray, *, delta: int, max_variation: float, min_area: int, max_area: int
) -> Candidates:
    """Maximally stable extremal regions of a uint8 image, bright and dark, with holes filled."""
    # min_diversity 0: nested regions are all returned, the box NMS below removes near-copies
    mser = cv2.MSER_create(delta=delta, min_area=min_area, max_area=max_area, max_variation=max_variation,
                           min_diversity=0.0)  # fmt: skip
    regions, _ = mser.detectRegions(np.ascontiguousarray(grey))
    size = grey.shape
    masks = np.zeros((len(regions), *size), dtype=bool)
    boxes = np.zeros((len(regions), 4), dtype=np.float32)
    for i, points in enumerate(regions):
        # Fill holes inside the region's box only: outside it is background connected to the
        # image's edge, so the result is the whole-image fill at a fraction of its cost (and the
        # filled region has the same tight box)
        xs, ys = points[:, 0], points[:, 1]
        x0, y0 = xs.min(), ys.min()
        crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
        crop[ys - y0, xs - x0] = True
        masks[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = fill_holes(crop)
        boxes[i] = (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
    return Candidates(masks, boxes)


# ------------------------------------------------------------------------------------------------
# The generator


def prompt_candidates(grey: np.ndarray, bp: BoxProposalParams) -> tuple[Candidates, np.ndarray]:
    """The candidate regions to prompt with, and their boundary contrast (the generator's model-free part)."""
    size = grey.shape[0] * grey.shape[1]
    # Candidate regions: MSER on the denoised image, both polarities, holes filled
    found = candidate_regions(grey, delta=bp.mser_delta, max_variation=bp.mser_max_variation,
                              min_area=bp.min_region_area, max_area=int(bp.max_region_fraction * size))  # fmt: skip
    # One prompt per distinct box: box NMS, strongest boundary first, at most max_candidates
    contrast = boundary_contrast(grey, found.masks, bp.ring_width, bp.ring_gap, found.boxes)
    keep = greedy_nms(box_iou(found.boxes, found.boxes), contrast, bp.candidate_nms)[: bp.max_candidates]
    return found.filter(keep), contrast[keep]


def generate_box_proposals(sam: LoadedSam, image: np.ndarray, params: ProposalParams) -> Proposals:
    """Box-prompt proposals on the (S, S, 3) uint8 working image; registered as generator ``"boxes"``."""
    bp: BoxProposalParams = params.boxes
    size = image.shape[0]
    grey = denoised_grey(image, bp.smooth_sigma)
    # Candidate regions, one per distinct box, with their boundary contrast
    found, contrast = prompt_candidates(grey, bp)
    prompts = np.clip(found.boxes + np.array([-1, -1, 1, 1]) * bp.box_padding, 0, size)
    # Second cue: a sparse box grid over the foreground where no candidate box lies
    grid = sparse_box_grid(grey, tuple(bp.grid_side * 2**k for k in range(bp.grid_scales)),
                           foreground_level=bp.grid_foreground_level, min_foreground=bp.grid_min_foreground,
                           covered=prompts, max_covered_iou=bp.grid_max_covered_iou)  # fmt: skip
    if not len(found):  # no stable region at all (a blank image): nothing to prompt for
        return Proposals.empty(size)
    # Encoder once; each candidate's padded box through the single-mask output
    predictor = SamPredictor(sam.model)
    predictor.set_image(image)
    logits, predicted_iou = decode_boxes(sam, predictor, prompts, window=bp.decoder_window,
                                         batch=params.points_per_batch)  # fmt: skip
    threshold = sam.model.mask_threshold
    refined = (logits > threshold).numpy()
    stability = calculate_stability_score(logits, threshold, params.stability_score_offset).numpy()
    predicted_iou = predicted_iou.numpy()
    # Filter by predicted IoU and SAM's stability score
    keep = (predicted_iou > bp.min_predicted_iou) & (stability >= bp.min_stability)
    # Filter by agreement: the refined mask must be (mostly) the candidate region it was prompted with
    keep &= paired_mask_iou(refined, found.masks) >= bp.min_agreement
    # Keep the candidate region where its boundary is much sharper than the refined mask's (the
    # refined masks' rings are measured only where the filters above kept the prompt)
    refined_contrast = np.zeros(len(refined), dtype=np.float32)
    refined_contrast[keep] = boundary_contrast(grey, refined[keep], bp.ring_width, bp.ring_gap)
    use_region = contrast > bp.prefer_region_contrast * refined_contrast
    masks = np.where(use_region[:, None, None], found.masks, refined)
    # Filter by contrast across the kept mask's boundary (blobs cut out of flat tissue have none)
    keep &= np.where(use_region, contrast, refined_contrast) >= bp.min_contrast
    # Reference filters before de-duplication and the cap, so that no slot goes to a mask they drop
    if bp.reference_filters_first and len(masks):
        keep &= reference_ok(masks, params)
    rows = np.flatnonzero(keep)
    # Filter by stability under box jitter: shrunk and grown boxes must give the same refined mask
    if bp.jitter > 0 and len(rows):
        stable = np.ones(len(rows), dtype=bool)
        for variant in jittered_boxes(prompts[rows], bp.jitter, size):
            other, _ = decode_boxes(sam, predictor, variant, window=bp.decoder_window, batch=params.points_per_batch)
            stable &= paired_mask_iou(refined[rows], (other > threshold).numpy()) >= bp.min_jitter_stability
        rows = rows[stable | use_region[rows]]  # a kept region does not depend on the model's mask
    # The slots: the region cue's best masks, the largest regions themselves, then the grid's masks
    kept = region_slots(masks, predicted_iou, rows, bp)
    big = large_region_slots(found.masks, contrast, masks[kept], params)
    out = [(masks[kept], predicted_iou[kept], stability[kept]), (found.masks[big], predicted_iou[big], stability[big])]
    kept_masks = np.concatenate([masks[kept], found.masks[big]])
    if len(grid) and len(kept_masks) < bp.max_proposals:
        g_logits, g_iou = decode_boxes(sam, predictor, grid, window=bp.grid_window, batch=params.points_per_batch)
        g_masks = (g_logits > threshold).numpy()
        g_stability = calculate_stability_score(g_logits, threshold, params.stability_score_offset).numpy()
        g_iou = g_iou.numpy()
        g = grid_slots(g_masks, g_iou, g_stability, kept_masks, params)
        out.append((g_masks[g], g_iou[g], g_stability[g]))
    return Proposals.from_masks(*(np.concatenate(column) for column in zip(*out)))
