"""Parameters of the ``"boxes"`` proposal generator (``a3tune.labels.box_proposals``).

A dataclass of its own, held by ``ProposalParams.boxes``, so that the point-grid parameters stay
readable; ``ProposalParams.from_dict`` takes them as a nested mapping (``{"boxes": {...}}``) and
rejects unknown keys there too. The defaults were measured on textured phantoms with LiteMedSAM's
real weights (tuning images: phantom seed 1; the bench reports seed 0): each help text says which
measurement a number comes from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from a3tune.params_fields import described_field, json_scalar, known_fields


@dataclasses.dataclass(frozen=True)
class BoxProposalParams:
    """Candidate regions, box prompts and the filters that keep real structures."""

    # Candidate regions (model-free)
    smooth_sigma: float = described_field(
        1.5, "Gaussian sigma (px) of the denoising before candidate regions (1.5 px found every phantom lesion)"
    )
    mser_delta: int = described_field(
        3, "MSER delta: grey-level step over which a region's area change is measured; smaller finds fainter "
        "organs (organ boxes found at box IoU >= 0.7: 0.79 at 8, 0.92 at 5, 0.95 at 3, 0.96 at 2; prompts per "
        "image 23 at 5, 33 at 3, 60 at 2)"
    )
    mser_max_variation: float = described_field(
        1.0, "MSER: largest relative area change over +-delta grey levels (organ boxes found: 0.92 at 1.0, 0.82 at 0.5)"
    )
    min_region_area: int = described_field(40, "smallest candidate region in px (the smallest phantom lesion is ~110 px)")
    max_region_fraction: float = described_field(0.8, "largest candidate region, as a fraction of the image")
    candidate_nms: float = described_field(
        0.85, "box IoU above which two candidates are one prompt (at mser_delta 5: 0.85 gave 24 prompts per image "
        "and lesion boxes at IoU >= 0.85 0.94; 0.7 gave 17 prompts and 0.75)"
    )
    max_candidates: int = described_field(
        64, "most prompts per image, strongest boundary contrast first (phantoms: 33 on average)"
    )
    # Box prompts
    box_padding: int = described_field(
        2, "px added on each side of a candidate's tight box before prompting (LiteMedSAM on padded true boxes, "
        "share of masks at IoU >= 0.75: organs 0.94 / 0.97 / 0.98, lesions 0.91 / 1.00 / 0.94 at 0 / 2 / 4 px)"
    )
    decoder_window: float = described_field(
        0.5,
        "the mask decoder sees only the image embedding within the box enlarged by this fraction of its "
        "longer side on each side, 5-20x cheaper with masks at IoU 0.98-1.0 to the full decoder's "
        "(<= 0: the whole embedding)",
    )
    # Filters
    min_predicted_iou: float = described_field(
        0.7, "keep refined masks with predicted IoU above this (1% of masks matching a structure are lower, "
        "30% of the others)"
    )
    min_stability: float = described_field(
        0.6, "keep refined masks with SAM's stability score at or above this (1% / 25%, as above)"
    )
    min_agreement: float = described_field(
        0.35, "keep refined masks whose IoU with their candidate region is at least this (1% of masks matching a "
        "structure are lower)"
    )
    prefer_region_contrast: float = described_field(
        2.0, "keep the candidate region instead of the refined mask when its boundary contrast is this many times "
        "higher (LiteMedSAM's body masks reach IoU 0.64-0.86, the body's region 0.97-0.99)"
    )
    min_contrast: float = described_field(
        1.5, "keep masks whose boundary contrast (see boundary_contrast) is at least this: structures 3-20, "
        "a blob cut out of flat tissue ~0.2"
    )
    ring_width: int = described_field(3, "width (px) of the rings inside and outside a mask's boundary (contrast filter)")
    ring_gap: int = described_field(2, "px between a mask's boundary and its contrast rings (skips the blurred edge)")
    jitter: float = described_field(
        0.0, "box jitter for the stability filter, a fraction of the box side (0: off; at 0.03 it tripled the "
        "decoder calls and removed no wrong mask the other filters keep; at 0.1 it rejects the body)"
    )
    min_jitter_stability: float = described_field(0.8, "keep refined masks whose IoU with their jittered-box masks is >= this")
    mask_nms: float = described_field(
        0.8, "mask IoU above which two kept masks are duplicates, the higher predicted IoU kept (0.7: 8% fewer "
        "proposals, and a spine fell below IoU 0.75)"
    )

    # Second cue: a sparse box grid over the foreground (a3tune.labels.region_cues), and the output cap
    grid_side: int = described_field(
        48, "side (px at 256) of the smallest grid box; the grid has grid_scales sides, doubling (real MRI, 8 "
        "slices, all prompts' masks: best Dice 0.48 with sides 48 + 96, 0.53 with MSER added)"
    )
    grid_scales: int = described_field(2, "number of grid box sides, grid_side * 2**k (0: no grid)")
    grid_foreground_level: int = described_field(
        20, "grey level (denoised, 0-255) above which a pixel is foreground for the grid (MRI padding is 0)"
    )
    grid_min_foreground: float = described_field(
        0.7, "grid boxes need at least this share of foreground pixels (real MRI, 8 slices: mean best Dice 0.33 / "
        "0.34 / 0.35 and 5.4 / 5.3 / 4.6 s per slice at 0.3 / 0.5 / 0.7)"
    )
    grid_max_covered_iou: float = described_field(
        0.7, "no grid box where a candidate region's prompt box overlaps it at box IoU above this"
    )
    grid_window: float = described_field(
        0.25, "decoder_window for grid prompts: at 0.25 every 48-px grid box fits a 32-token window (real MRI, 8 "
        "slices, 1 thread, loaded machine: decoder 4.5 s / image and mean best Dice 0.31 at 0.25, 5.9 s and 0.32 at 0.5)"
    )
    grid_min_predicted_iou: float = described_field(
        0.5, "keep grid masks with predicted IoU above this (real MRI, 25 slots: mean best Dice 0.342 at 0.5, 0.340 at 0.6)"
    )
    grid_min_stability: float = described_field(0.5, "keep grid masks with stability score at or above this")
    grid_mask_nms: float = described_field(
        0.3, "mask IoU above which a grid mask copies a kept mask; grid masks fill the slots largest first (real "
        "MRI, 24 slices, anatomy level: mean best Dice 0.50 / 0.51 / 0.49 at 0.25 / 0.3 / 0.4; largest first "
        "0.51, best predicted IoU first 0.46): low, so that the few slots tile the image"
    )
    region_slots: int = described_field(
        15, "most proposals from candidate regions, best predicted IoU first (phantoms keep 12.4 on average)"
    )
    large_region_slots: int = described_field(
        2, "proposals taken as the largest candidate regions themselves (area first, boundary contrast >= "
        "min_contrast, no copy of a kept mask): on real MRI (8 slices) brain / grey / white matter best Dice "
        "0.44 / 0.23 / 0.26 at 0, 0.85 / 0.74 / 0.62 at 2 and 3; all structures 0.31 / 0.33 / 0.32 at 0 / 2 / 3"
    )
    reference_filters_first: bool = described_field(
        True, "apply the reference filters (area, border, min side) before mask NMS and the cap; false: only "
        "after them, as before the slots existed (a mask they drop can then suppress its duplicate: 2 more "
        "proposals of 3,507 on the phantom benchmark's 308 images with it true)"
    )
    max_proposals: int = described_field(25, "most proposals per image (the issue's bound); grid masks fill what regions leave")

    def __post_init__(self) -> None:
        checks = [
            (self.smooth_sigma >= 0, f"smooth_sigma must be >= 0, got {self.smooth_sigma}"),
            (self.mser_delta >= 1, f"mser_delta must be >= 1, got {self.mser_delta}"),
            (self.mser_max_variation > 0, f"mser_max_variation must be > 0, got {self.mser_max_variation}"),
            (self.min_region_area >= 1, f"min_region_area must be >= 1, got {self.min_region_area}"),
            (0 < self.max_region_fraction <= 1,
             f"max_region_fraction must be in (0, 1], got {self.max_region_fraction}"),
            (0 < self.candidate_nms <= 1, f"candidate_nms must be in (0, 1], got {self.candidate_nms}"),
            (self.max_candidates >= 0, f"max_candidates must be >= 0, got {self.max_candidates}"),
            (self.box_padding >= 0, f"box_padding must be >= 0, got {self.box_padding}"),
            (self.jitter < 0.5, f"jitter must be < 0.5, got {self.jitter}"),
            (self.ring_width >= 1, f"ring_width must be >= 1, got {self.ring_width}"),
            (self.ring_gap >= 0, f"ring_gap must be >= 0, got {self.ring_gap}"),
            (0 < self.mask_nms <= 1, f"mask_nms must be in (0, 1], got {self.mask_nms}"),
            (self.grid_side >= 2 and self.grid_scales >= 0, "grid_side must be >= 2 and grid_scales >= 0"),
            (0 < self.grid_mask_nms <= 1, f"grid_mask_nms must be in (0, 1], got {self.grid_mask_nms}"),
            (self.max_proposals >= 0 and self.region_slots >= 0, "max_proposals and region_slots must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"box proposal params: {message}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BoxProposalParams:
        """Build from plain JSON values; unknown keys and wrongly typed values raise ``ValueError``."""
        if not isinstance(params, dict):
            raise ValueError(f"proposal params: boxes must be a mapping of box-generator parameters, got {params!r}")
        fields = known_fields(cls, params, "proposal params: unknown boxes parameter(s)")
        return cls(**{k: json_scalar(fields[k].type, v, f"proposal params: boxes.{k}") for k, v in params.items()})
