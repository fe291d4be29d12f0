"""The proposal stage's parameters: ``ProposalParams``, checked on construction and read from JSON.

Kept apart from the generators so that the modules those take (the ``"boxes"`` generator in
``a3tune.labels.box_proposals``, the filters in ``a3tune.labels.proposal_filters``) can import the
parameters without importing the generators. ``ProposalParams.from_dict`` rejects unknown keys and
wrongly typed values; ``boxes`` holds the box generator's own parameters
(``a3tune.labels.box_params``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from a3tune.labels.box_params import BoxProposalParams
from a3tune.params_fields import described_field, is_int, json_scalar, known_fields


@dataclasses.dataclass(frozen=True)
class ProposalParams:
    """How proposals are generated and filtered; the defaults are the reference's numbers (§2.1)."""

    generator: str = described_field(
        "points", "proposal generator, a key of GENERATORS ('points': SAM point grid; 'boxes': box prompts on "
        "candidate regions, for box-trained SAMs, see a3tune.labels.box_proposals)"
    )
    working_size: int = described_field(256, "side of the square working image; the aspect ratio is not kept (reference: 256)")
    channel_order: str = described_field("rgb", "'rgb', or 'bgr' to feed SAM reversed channels as the reference's cv2 images")
    points_per_side: int = described_field(8, "point grid side in the first crop layer")
    points_per_batch: int = described_field(64, "prompts per decoder call; memory only, not results (reference: 128)")
    pred_iou_thresh: float = described_field(
        0.5, "keep masks with predicted IoU above this; <= 0 turns it off (points, re-prompting; 'boxes' has its own)"
    )
    stability_score_thresh: float = described_field(
        0.5, "keep masks with stability score at or above this; <= 0 turns it off (points, re-prompting; 'boxes' "
        "has its own)"
    )
    stability_score_offset: float = described_field(1.0, "logit offset of the stability score (SAM default)")
    box_nms_thresh: float = described_field(0.8, "box IoU above which masks of one crop are duplicates")
    crop_n_layers: int = described_field(1, "crop layers; layer i has 4**i crops")
    crop_n_points_downscale_factor: int = described_field(2, "points per side shrink by this factor in each crop layer")
    crop_nms_thresh: float = described_field(0.8, "box IoU above which masks of different crops are duplicates")
    crop_overlap_ratio: float = described_field(512 / 1500, "overlap of neighbouring crops (SAM default)")
    min_mask_region_area: int = described_field(200, "holes and islands smaller than this (px) are removed; 0 turns it off")
    max_area: int = described_field(40000, "keep masks with area below this many px (reference: 40000 of 65536)")
    border_margin: tuple[int, int] = described_field(
        (1, 2),
        "drop masks reaching into the first m0 or last m1 rows/columns of the working image; one int for both; "
        "(1, 2) is the reference's x == 0 or x + w > 253 at 256 px; <= 0 turns a side off",
    )
    min_side: int = described_field(
        12,
        "drop masks whose box has w - 1 <= min_side or h - 1 <= min_side px: the reference's w <= 12 on SAM's "
        "boxes, whose w is one less than the pixel width",
    )
    reprompt_boxes: bool = described_field(
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
        from a3tune.labels.proposals import GENERATORS  # here, not at the top: that module imports this one

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
                and all(is_int(m) for m in self.border_margin),
                f"border_margin must be an int or a pair of ints, got {margin!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"proposal params: {message}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ProposalParams:
        """Build from plain JSON values; unknown keys and wrongly typed values raise ``ValueError``."""
        fields = known_fields(cls, params, "proposal params: unknown parameter(s)")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in params.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, accepted back by ``from_dict``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Check a JSON value against the field's annotation (a string: ``from __future__ import annotations``)."""
    if kind == "tuple[int, int]" and (is_int(value) or isinstance(value, (list, tuple))):
        return value if is_int(value) else tuple(value)  # checked in __post_init__
    if kind == "BoxProposalParams":
        return value if isinstance(value, BoxProposalParams) else BoxProposalParams.from_dict(value)
    return json_scalar(kind, value, f"proposal params: {name}")
