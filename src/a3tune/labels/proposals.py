"""SAM proposals for one image, with the reference implementation's parameters and filters.

``generate_proposals`` resizes the image to a square working image (256 px, aspect ratio not
kept, as the reference does), runs a registered generator on it (``"points"``: segment_anything's
``SamAutomaticMaskGenerator`` with a point grid), applies the reference's mask filters, optionally
re-prompts the model with each kept mask's box, and returns the masks in a fixed order as a
``Proposals`` column container. Nothing surviving is a zero-length ``Proposals``, not an error.

Boxes are tight pixel boxes ``[x, y, w, h]`` (``w`` = number of columns the mask spans, as in
``a3tune.data.phantom_scene.bbox_xywh``). segment_anything's own boxes, which the reference filtered,
are one pixel smaller (``w = x1 - x0`` with ``x1`` the last column); the filter parameters are
defined so that their defaults make exactly the reference's decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import torch

from a3tune.compat import ensure_torchvision
from a3tune.labels.box_params import BoxProposalParams
from a3tune.labels.sam_backends import LoadedSam

ensure_torchvision()  # segment_anything imports torchvision

from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402
from segment_anything.utils.amg import calculate_stability_score, remove_small_regions  # noqa: E402
from torchvision.ops import batched_nms  # noqa: E402


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ProposalParams:
    """How proposals are generated and filtered; the defaults are the reference's numbers (§2.1)."""

    generator: str = _field(
        "points", "proposal generator, a key of GENERATORS ('points': SAM point grid; 'boxes': box prompts on "
        "candidate regions, for box-trained SAMs, see a3tune.labels.box_proposals)"
    )
    working_size: int = _field(256, "side of the square working image; the aspect ratio is not kept (reference: 256)")
    channel_order: str = _field("rgb", "'rgb', or 'bgr' to feed SAM reversed channels as the reference's cv2 images")
    points_per_side: int = _field(8, "point grid side in the first crop layer")
    points_per_batch: int = _field(64, "prompts per decoder call; memory only, not results (reference: 128)")
    pred_iou_thresh: float = _field(
        0.5, "keep masks with predicted IoU above this; <= 0 turns it off (points, re-prompting; 'boxes' has its own)"
    )
    stability_score_thresh: float = _field(
        0.5, "keep masks with stability score at or above this; <= 0 turns it off (points, re-prompting; 'boxes' "
        "has its own)"
    )
    stability_score_offset: float = _field(1.0, "logit offset of the stability score (SAM default)")
    box_nms_thresh: float = _field(0.8, "box IoU above which masks of one crop are duplicates")
    crop_n_layers: int = _field(1, "crop layers; layer i has 4**i crops")
    crop_n_points_downscale_factor: int = _field(2, "points per side shrink by this factor in each crop layer")
    crop_nms_thresh: float = _field(0.8, "box IoU above which masks of different crops are duplicates")
    crop_overlap_ratio: float = _field(512 / 1500, "overlap of neighbouring crops (SAM default)")
    min_mask_region_area: int = _field(200, "holes and islands smaller than this (px) are removed; 0 turns it off")
    max_area: int = _field(40000, "keep masks with area below this many px (reference: 40000 of 65536)")
    border_margin: tuple[int, int] = _field(
        (1, 2),
        "drop masks reaching into the first m0 or last m1 rows/columns of the working image; one int for both; "
        "(1, 2) is the reference's x == 0 or x + w > 253 at 256 px; <= 0 turns a side off",
    )
    min_side: int = _field(
        12,
        "drop masks whose box has w - 1 <= min_side or h - 1 <= min_side px: the reference's w <= 12 on SAM's "
        "boxes, whose w is one less than the pixel width",
    )
    reprompt_boxes: bool = _field(
        False, "re-prompt the model with each kept mask's box (single-mask output) and keep the refined mask"
    )
    boxes: BoxProposalParams = dataclasses.field(
        default_factory=BoxProposalParams,
        metadata={"help": "parameters of the 'boxes' generator, a mapping (a3tune.labels.box_params)"},
    )

    def __post_init__(self) -> None:
        margin = self.border_margin
        if isinstance(margin, int) and not isinstance(margin, bool):
            object.__setattr__(self, "border_margin", (margin, margin))
        elif isinstance(margin, (list, tuple)):
            object.__setattr__(self, "border_margin", tuple(margin))
        checks = [
            (self.generator in GENERATORS, f"generator must be one of {sorted(GENERATORS)}, got {self.generator!r}"),
            (self.working_size >= 32, f"working_size must be >= 32, got {self.working_size}"),
            (self.channel_order in ("rgb", "bgr"), f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}"),
            (self.points_per_side >= 1, f"points_per_side must be >= 1, got {self.points_per_side}"),
            (self.points_per_batch >= 1, f"points_per_batch must be >= 1, got {self.points_per_batch}"),
            (self.crop_n_layers >= 0, f"crop_n_layers must be >= 0, got {self.crop_n_layers}"),
            (self.crop_n_points_downscale_factor >= 1, "crop_n_points_downscale_factor must be >= 1"),
            (self.min_mask_region_area >= 0, f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}"),
            (self.max_area >= 1, f"max_area must be >= 1, got {self.max_area}"),
            (
                isinstance(self.border_margin, tuple)
                and len(self.border_margin) == 2
                and all(_is_int(m) for m in self.border_margin),
                f"border_margin must be an int or a pair of ints, got {margin!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"proposal params: {message}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ProposalParams:
        """Build from plain JSON values; unknown keys and wrongly typed values raise ``ValueError``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"proposal params: unknown parameter(s) {unknown}; known: {sorted(fields)}")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in params.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, accepted back by ``from_dict``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Check a JSON value against the field's annotation (a string: ``from __future__ import annotations``)."""
    if kind == "int" and _is_int(value):
        return value
    if kind == "float" and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if kind in ("str", "bool") and type(value).__name__ == kind:
        return value
    if kind == "tuple[int, int]" and (_is_int(value) or isinstance(value, (list, tuple))):
        return value if _is_int(value) else tuple(value)  # checked in __post_init__
    if kind == "BoxProposalParams":
        return value if isinstance(value, BoxProposalParams) else BoxProposalParams.from_dict(value)
    raise ValueError(f"proposal params: {name} must be of type {kind}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# The column container


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


# ------------------------------------------------------------------------------------------------
# Filters: pure functions of columns, each returning the rows to keep


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


def apply_filters(found: Proposals, params: ProposalParams) -> Proposals:
    """The reference's mask filters, in its order (all are per-mask, so the order does not matter)."""
    size = found.masks.shape[-1]
    # Drop large masks (reference: area < 40000)
    found = found.filter(area_below(found.area, params.max_area))
    # Drop empty masks and zero-size boxes (reference: get_crops)
    found = found.filter(box_has_extent(found.bbox_xywh))
    # Drop masks at the image border (reference: x == 0 or y == 0 or x + w > 253 or y + h > 253)
    found = found.filter(away_from_border(found.bbox_xywh, size, params.border_margin))
    # Drop thin and small masks (reference: w <= 12 or h <= 12)
    return found.filter(sides_above(found.bbox_xywh, params.min_side))


# ------------------------------------------------------------------------------------------------
# Generation


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


def generate_box_prompts(sam: LoadedSam, image: np.ndarray, params: ProposalParams) -> Proposals:
    """Box prompts on model-free candidate regions (``a3tune.labels.box_proposals``, which imports this module)."""
    from a3tune.labels.box_proposals import generate_box_proposals

    return generate_box_proposals(sam, image, params)


# name -> generator(sam, working image, params) -> Proposals at the working size
GENERATORS: dict[str, Callable[[LoadedSam, np.ndarray, ProposalParams], Proposals]] = {
    "points": generate_point_grid,
    "boxes": generate_box_prompts,
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


@contextlib.contextmanager
def time_model(model: torch.nn.Module) -> Iterator[Timings]:
    """Time a block, and within it every forward pass of the model's encoder and decoder.

    Forward hooks on ``image_encoder`` count as encoder time, on ``prompt_encoder`` and
    ``mask_decoder`` as decoder time; on CUDA each hook synchronises so the times are real.
    ``Sam.preprocess`` (normalise and pad the encoder input) and ``Sam.postprocess_masks``
    (upscale the decoder's logits to the image) are the rest of ``Sam.forward``; they count as
    encoder and decoder time, timed by wrapping them on the instance for the block.
    The ``Timings`` are complete when the block exits.
    """
    timings = Timings()
    cuda = next(model.parameters()).device.type == "cuda"
    starts: dict[int, float] = {}

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def pre(module: torch.nn.Module, *_: Any) -> None:
        starts[id(module)] = now()

    def post(kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, *_: Any) -> None:
            elapsed = now() - starts.pop(id(module))
            setattr(timings, f"{kind}_s", getattr(timings, f"{kind}_s") + elapsed)
            if kind == "encoder" or module is model.mask_decoder:
                setattr(timings, f"{kind}_calls", getattr(timings, f"{kind}_calls") + 1)

        return hook

    def timed(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            began = now()
            try:
                return method(*args, **kwargs)
            finally:
                setattr(timings, f"{kind}_s", getattr(timings, f"{kind}_s") + now() - began)

        return call

    parts = {"encoder": [model.image_encoder], "decoder": [model.prompt_encoder, model.mask_decoder]}
    handles = []
    for kind, modules in parts.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post(kind)))
    methods = {"preprocess": "encoder", "postprocess_masks": "decoder"}
    for name, kind in methods.items():
        setattr(model, name, timed(kind, getattr(model, name)))
    started = now()
    try:
        yield timings
    finally:
        timings.total_s = now() - started
        for handle in handles:
            handle.remove()
        for name in methods:
            delattr(model, name)  # the instance attribute; the class's method shows again
