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
   window are decoded in one batch.
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
   over the foreground where no candidate lies (``a3tune.labels.region_cues``), largest first.

An image without candidate regions (a blank image) gets an empty ``Proposals`` without running the
encoder.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from a3tune.compat import ensure_torchvision
from a3tune.labels.box_params import BoxProposalParams
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

# Window sides (in embedding tokens) for the mask decoder, smallest first; a window of side s is
# placed on a grid of stride s / 4, so any needed extent up to 3/4 s fits one.
WINDOW_SIDES = (8, 16, 32, 64)
# Logit given to pixels outside a prompt's decoder window (certainly background)
OUTSIDE_LOGIT = -1e4


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


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background pixel not 4-connected to the edge set, as
    ``scipy.ndimage.binary_fill_holes`` does; a flood fill from a one-pixel frame, ~10x faster."""
    framed = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    framed[1:-1, 1:-1] = mask
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` boxes (exclusive ends) of non-empty (n, H, W) masks, as float32."""
    cols, rows = masks.any(axis=1), masks.any(axis=2)
    x0, y0 = cols.argmax(axis=1), rows.argmax(axis=1)
    x1 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    y1 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32).reshape(-1, 4)


def greedy_nms(overlap: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Indices kept by greedy NMS: best score first, dropping rows overlapping a kept one above ``thresh``.

    ``overlap`` is any (n, n) similarity (box or mask IoU); ties keep the earlier row.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    for i in order:
        if not kept or overlap[i, kept].max() <= thresh:
            kept.append(int(i))
    return np.array(kept, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Filters: pure functions of columns


def paired_mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for two (n, H, W) mask stacks; two empty masks give 0."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return inter / np.maximum(union, 1)


def mask_iou_matrix(masks: np.ndarray) -> np.ndarray:
    """IoU of every pair of (n, H, W) masks: (n, n)."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1.0)


def boundary_contrast(
    grey: np.ndarray, masks: np.ndarray, width: int, gap: int, boxes: np.ndarray | None = None
) -> np.ndarray:
    """Contrast across each mask's boundary, in units of the noise next to it.

    ``|mean(inner) - mean(outer)| / sqrt((var(inner) + var(outer)) / 2 + 1)``, where inner and
    outer are rings ``width`` px wide, ``gap`` px inside and outside the mask's boundary (the gap
    skips the blurred edge itself, so a boundary one or two pixels off still measures the step).
    A real structure has a step at its boundary; a box-shaped blob cut out of flat tissue has
    none (~0). An empty mask, or one without enough ring pixels, gives 0. ``boxes``: the masks'
    tight boxes when the caller has them (saves a scan of every mask).
    """
    grey = grey.astype(np.float32)
    reach = gap + width

    def disc(radius: int) -> np.ndarray:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))

    out = np.zeros(len(masks), dtype=np.float32)
    size = grey.shape
    boxes = (tight_boxes(masks) if boxes is None else boxes).astype(np.int64)
    for i, (mask, (bx0, by0, bx1, by1)) in enumerate(zip(masks, boxes)):
        if not mask[by0:by1, bx0:bx1].any():
            continue
        # Work inside the mask's box grown by the rings' reach; outside the image is outside the mask
        y0, y1 = max(by0 - reach - 1, 0), min(by1 + reach + 1, size[0])
        x0, x1 = max(bx0 - reach - 1, 0), min(bx1 + reach + 1, size[1])
        crop = mask[y0:y1, x0:x1].astype(np.uint8)

        def erode(radius: int) -> np.ndarray:
            if radius == 0:
                return crop.astype(bool)
            return cv2.erode(crop, disc(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)

        def dilate(radius: int) -> np.ndarray:
            if radius == 0:
                return crop.astype(bool)
            return cv2.dilate(crop, disc(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)

        values = grey[y0:y1, x0:x1]
        a, b = values[erode(gap) & ~erode(reach)], values[dilate(reach) & ~dilate(gap)]
        if len(a) < 2 or len(b) < 2:
            continue
        out[i] = abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2 + 1.0)
    return out


def jittered_boxes(boxes: np.ndarray, fraction: float, size: int) -> list[np.ndarray]:
    """Each xyxy box shrunk and grown by ``fraction`` of its sides on every side, clipped to the image."""
    wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    grow = np.array([-1, -1, 1, 1], dtype=np.float32) * fraction
    return [np.clip(boxes + sign * grow * wh, 0, size) for sign in (-1.0, 1.0)]


# ------------------------------------------------------------------------------------------------
# The model: one encoder pass, windowed box decoding


def decoder_windows(token_boxes: np.ndarray, grid: int, margin: float) -> np.ndarray:
    """For each box in embedding-token coordinates, a window ``(side, row0, col0)`` of the embedding.

    The window holds the box enlarged by ``margin`` of its longer side (plus one token) on each
    side; its side is the smallest of ``WINDOW_SIDES`` (capped at ``grid``) whose grid of offsets
    (stride side / 4) has a window holding that extent. ``margin <= 0`` gives the whole embedding.
    """
    out = np.zeros((len(token_boxes), 3), dtype=np.int64)
    sides = sorted({min(s, grid) for s in WINDOW_SIDES} | {grid})
    for i, (x0, y0, x1, y1) in enumerate(token_boxes):
        if margin <= 0:
            out[i] = (grid, 0, 0)
            continue
        pad = margin * max(x1 - x0, y1 - y0) + 1.0
        lo = np.floor(np.array([y0, x0]) - pad).clip(0, grid)
        hi = np.ceil(np.array([y1, x1]) + pad).clip(0, grid)
        for side in sides:
            stride = max(side // 4, 1)
            start = np.minimum(lo // stride * stride, grid - side)
            if (hi <= start + side).all():
                out[i] = (side, *start.astype(np.int64))
                break
    return out


@torch.no_grad()
def decode_boxes(
    sam: LoadedSam, predictor: SamPredictor, boxes: np.ndarray, *, window: float, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits (n, S, S) at the working size and predicted IoU (n,) for xyxy boxes.

    ``predictor`` holds the image embedding (``set_image`` was called). Prompts sharing a decoder
    window go through the mask decoder together, ``batch`` at a time.
    """
    model = sam.model
    size = predictor.original_size
    n = len(boxes)
    logits = torch.full((n, 1, *size), OUTSIDE_LOGIT)
    iou = torch.zeros(n)
    if n == 0:
        return logits[:, 0], iou
    # Prompt boxes in SAM's convention (last column and row, not exclusive ends), at the model's input size
    corners = boxes.astype(np.float64) - np.array([0, 0, 1, 1])
    model_boxes = predictor.transform.apply_boxes(corners, size)
    features = predictor.features
    grid = features.shape[-1]
    tokens_per_px = grid / model.image_encoder.img_size
    windows = decoder_windows(model_boxes * tokens_per_px, grid, window)
    dense_pe = model.prompt_encoder.get_dense_pe()
    sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(model_boxes, dtype=torch.float32,
                                         device=features.device), masks=None)  # fmt: skip
    low_res = 4 * grid  # the decoder upscales the embedding 4x
    for key in np.unique(windows, axis=0):
        side, r0, c0 = (int(v) for v in key)
        rows = np.flatnonzero((windows == key).all(axis=1))
        crop = np.s_[:, :, r0 : r0 + side, c0 : c0 + side]
        # Crop before indexing: box prompts' dense embeddings are one vector expanded over the
        # whole embedding, and indexing first would copy that full (n, C, 64, 64) block
        dense_window = dense[crop]
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            masks, scores = model.mask_decoder(
                image_embeddings=features[crop],
                image_pe=dense_pe[crop],
                sparse_prompt_embeddings=sparse[part],
                dense_prompt_embeddings=dense_window[part],
                multimask_output=False,
            )
            # Paste the window into a full low-resolution canvas, then resize as SAM does
            canvas = torch.full((len(part), 1, low_res, low_res), OUTSIDE_LOGIT, device=masks.device)
            canvas[:, :, 4 * r0 : 4 * (r0 + side), 4 * c0 : 4 * (c0 + side)] = masks
            logits[part] = model.postprocess_masks(canvas, predictor.input_size, size).cpu()
            iou[part] = scores[:, 0].cpu()
    return logits[:, 0], iou


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
    # Mask NMS: of masks overlapping above mask_nms, keep the one with the higher predicted IoU; the
    # region cue's best region_slots first
    kept = rows[greedy_nms(mask_iou_matrix(masks[rows]), predicted_iou[rows], bp.mask_nms)] if len(rows) else rows
    kept = kept[: min(bp.region_slots, bp.max_proposals)]
    out = [(masks[kept], predicted_iou[kept], stability[kept])]
    # The largest candidate regions themselves (tissue classes whose refined masks are poor), no copies
    big = np.flatnonzero(reference_ok(found.masks, params) & (contrast >= bp.min_contrast))
    big = big[np.argsort(-found.masks[big].sum(axis=(1, 2)), kind="stable")]
    kept_masks = masks[kept]
    for i in big[: 4 * bp.large_region_slots]:
        if len(kept_masks) >= min(len(kept) + bp.large_region_slots, bp.max_proposals):
            break
        overlap = mask_iou_matrix(np.concatenate([kept_masks, found.masks[i : i + 1]]))[-1, :-1]
        if not len(overlap) or overlap.max() <= bp.mask_nms:
            kept_masks = np.concatenate([kept_masks, found.masks[i : i + 1]])
            out.append((found.masks[i : i + 1], predicted_iou[i : i + 1], stability[i : i + 1]))
    # The grid's prompts fill the remaining slots: model filters, reference filters, no copy of a kept mask
    if len(grid) and len(kept_masks) < bp.max_proposals:
        g_logits, g_iou = decode_boxes(sam, predictor, grid, window=bp.grid_window, batch=params.points_per_batch)
        g_masks = (g_logits > threshold).numpy()
        g_stability = calculate_stability_score(g_logits, threshold, params.stability_score_offset).numpy()
        g_iou = g_iou.numpy()
        ok = (g_iou > bp.grid_min_predicted_iou) & (g_stability >= bp.grid_min_stability)
        ok[ok] &= reference_ok(g_masks[ok], params)
        g = np.flatnonzero(ok)
        if len(g) and len(kept_masks):
            both = mask_iou_matrix(np.concatenate([kept_masks, g_masks[g]]))
            g = g[both[len(kept_masks) :, : len(kept_masks)].max(axis=1) <= bp.grid_mask_nms]
        # Largest first, so that the few slots tile the foreground before they go to its small pieces
        g = g[greedy_nms(mask_iou_matrix(g_masks[g]), g_masks[g].sum(axis=(1, 2)), bp.grid_mask_nms)] if len(g) else g
        g = g[: bp.max_proposals - len(kept_masks)]
        out.append((g_masks[g], g_iou[g], g_stability[g]))
    return Proposals.from_masks(*(np.concatenate(column) for column in zip(*out)))
