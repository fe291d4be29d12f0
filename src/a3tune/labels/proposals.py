"""SAM proposals for one image: the working image, the registered generators and ``generate_proposals``.

``generate_proposals`` resizes the image to a square working image (256 px, aspect ratio not
kept, as the reference does), runs a registered generator on it (``"points"``: segment_anything's
``SamAutomaticMaskGenerator`` with a point grid; ``"boxes"``: ``a3tune.labels.box_proposals``),
applies the reference's mask filters (``a3tune.labels.proposal_filters``), optionally re-prompts the
model with each kept mask's box, and returns the masks in a fixed order as a ``Proposals`` column
container (``a3tune.labels.proposal_types``) with the call's ``Timings``
(``a3tune.labels.proposal_timing``). Nothing surviving is a zero-length ``Proposals``, not an error.
The parameters are ``ProposalParams`` (``a3tune.labels.proposal_params``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import cv2
import numpy as np
import torch

from a3tune.compat import ensure_torchvision
from a3tune.labels.box_proposals import generate_box_proposals
from a3tune.labels.proposal_filters import apply_filters, first_of_duplicates, sort_order
from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.proposal_timing import time_model
from a3tune.labels.proposal_types import Proposals
from a3tune.labels.sam_backends import LoadedSam

ensure_torchvision()  # segment_anything imports torchvision

from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402
from segment_anything.utils.amg import calculate_stability_score, remove_small_regions  # noqa: E402
from torchvision.ops import batched_nms  # noqa: E402


def prepare_image(image: np.ndarray, working_size: int, channel_order: str = "rgb") -> np.ndarray:
    """The square working image: (H, W, 3) uint8 RGB resized to working_size x working_size.

    The resize is cv2's bilinear one and does not keep the aspect ratio, as the reference's
    ``cv2.resize(img, (256, 256))``. ``channel_order="bgr"`` reverses the channels, which is what
    the reference fed SAM (``cv2.imread`` gives BGR; SAM expects RGB).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if image.shape[:2] != (working_size, working_size):
        image = cv2.resize(image, (working_size, working_size), interpolation=cv2.INTER_LINEAR)
    if channel_order == "bgr":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


class _AutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """segment_anything's generator, fixed for crops without masks.

    Upstream builds a crop's ``crop_boxes`` with ``torch.tensor([])`` when the crop keeps no mask,
    shape (0,) instead of (0, 4); when no crop keeps a mask, ``box_area`` then raises IndexError.
    """

    def _process_crop(self, *args: Any, **kwargs: Any):
        data = super()._process_crop(*args, **kwargs)
        data["crop_boxes"] = data["crop_boxes"].reshape(-1, 4)
        return data


def generate_point_grid(sam: LoadedSam, image: np.ndarray, params: ProposalParams) -> Proposals:
    """segment_anything's automatic mask generator (point grid, multimask output) on the working image."""
    generator = _AutomaticMaskGenerator(
        sam.model,
        points_per_side=params.points_per_side,
        points_per_batch=params.points_per_batch,
        pred_iou_thresh=params.pred_iou_thresh,
        stability_score_thresh=params.stability_score_thresh,
        stability_score_offset=params.stability_score_offset,
        box_nms_thresh=params.box_nms_thresh,
        crop_n_layers=params.crop_n_layers,
        crop_nms_thresh=params.crop_nms_thresh,
        crop_overlap_ratio=params.crop_overlap_ratio,
        crop_n_points_downscale_factor=params.crop_n_points_downscale_factor,
        min_mask_region_area=params.min_mask_region_area,
        output_mode="binary_mask",
    )
    records = generator.generate(image)
    if not records:
        return Proposals.empty(image.shape[0])
    return Proposals.from_masks(
        np.stack([r["segmentation"] for r in records]),
        np.array([r["predicted_iou"] for r in records]),
        np.array([r["stability_score"] for r in records]),
    )


# name -> generator(sam, working image, params) -> Proposals at the working size
GENERATORS: dict[str, Callable[[LoadedSam, np.ndarray, ProposalParams], Proposals]] = {
    "points": generate_point_grid,
    "boxes": generate_box_proposals,  # box prompts on model-free candidate regions
}


@torch.no_grad()
def reprompt_with_boxes(sam: LoadedSam, image: np.ndarray, found: Proposals, params: ProposalParams) -> Proposals:
    """Each mask replaced by the model's single-mask answer to a prompt with its box.

    The refined masks go through the generator's quality steps again (predicted IoU, stability,
    small-region clean-up, box NMS); the caller applies the reference filters after this.
    """
    size = image.shape[0]
    if not len(found):
        return Proposals.empty(size)
    predictor = SamPredictor(sam.model)
    predictor.set_image(image)
    # Prompt boxes in SAM's convention: x0, y0, last column, last row
    x, y, w, h = found.bbox_xywh.T.astype(np.float64)
    boxes = predictor.transform.apply_boxes(np.stack([x, y, x + w - 1, y + h - 1], axis=1), image.shape[:2])
    logits, ious = [], []
    for start in range(0, len(boxes), params.points_per_batch):
        batch = torch.as_tensor(boxes[start : start + params.points_per_batch], dtype=torch.float32)
        out, iou, _ = predictor.predict_torch(None, None, batch.to(predictor.device), multimask_output=False,
                                              return_logits=True)  # fmt: skip
        logits.append(out[:, 0].cpu())
        ious.append(iou[:, 0].cpu())
    logits_t, iou_t = torch.cat(logits), torch.cat(ious)
    threshold = sam.model.mask_threshold
    stability = calculate_stability_score(logits_t, threshold, params.stability_score_offset)
    # Filter by predicted IoU and stability, as the generator does (a threshold <= 0 is off)
    keep = torch.ones(len(iou_t), dtype=torch.bool)
    if params.pred_iou_thresh > 0.0:
        keep &= iou_t > params.pred_iou_thresh
    if params.stability_score_thresh > 0.0:
        keep &= stability >= params.stability_score_thresh
    masks = (logits_t[keep] > threshold).numpy()
    iou_np, stability_np = iou_t[keep].numpy(), stability[keep].numpy()
    # Remove small holes and islands, as the generator does
    if params.min_mask_region_area > 0:
        masks = np.stack([_clean(m, params.min_mask_region_area) for m in masks]) if len(masks) else masks
    refined = Proposals.from_masks(masks, iou_np, stability_np)
    # Drop boxes overlapping a better one (box NMS by predicted IoU)
    xyxy = torch.as_tensor(refined.bbox_xywh, dtype=torch.float32)
    xyxy[:, 2:] += xyxy[:, :2]
    order = batched_nms(xyxy, torch.as_tensor(refined.predicted_iou), torch.zeros(len(refined)), params.box_nms_thresh)
    return refined.filter(order.numpy())


def _clean(mask: np.ndarray, min_area: int) -> np.ndarray:
    mask, _ = remove_small_regions(mask, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


def generate_proposals(sam: LoadedSam, image: np.ndarray, params: ProposalParams | None = None) -> Proposals:
    """Proposals for one (H, W, 3) uint8 RGB image, at the working size, in a deterministic order.

    The returned ``timings`` split the call's wall time into the model's forward passes and the rest.
    """
    params = params or ProposalParams()
    with time_model(sam.model) as timings:
        # Square working image, channels as configured
        working = prepare_image(image, params.working_size, params.channel_order)
        # Candidate masks from the configured generator
        found = GENERATORS[params.generator](sam, working, params)
        # Reference filters: area, box extent, border, sides
        found = apply_filters(found, params)
        # Optional second pass: refine each mask with a prompt of its box, then filter again
        if params.reprompt_boxes:
            found = apply_filters(reprompt_with_boxes(sam, working, found, params), params)
        # Deterministic order, then drop exact duplicates
        found = found.filter(sort_order(found))
        found = found.filter(first_of_duplicates(found.masks))
    return dataclasses.replace(found, timings=timings)
