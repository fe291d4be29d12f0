"""The "boxes" proposal generator: parameters, candidate regions, every filter, windowed decoding, end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from a3tune.labels import box_decoder, mask_ops
from a3tune.labels import box_proposals as bx
from a3tune.labels.box_params import BoxProposalParams
from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.proposal_types import Proposals
from a3tune.labels.proposals import GENERATORS, generate_proposals, prepare_image
from a3tune.labels.region_cues import box_iou, sparse_box_grid
from a3tune.labels.sam_backends import build_sam

SIZE = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def _ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1


def _scene(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A body with a bright organ (holding a bright lesion) and a dark organ, with noise and soft edges."""
    import cv2

    masks = {
        "body": _ellipse(128, 130, 110, 88),
        "bright_organ": _ellipse(88, 118, 36, 28),
        "dark_organ": _ellipse(176, 112, 24, 22),
        "lesion": _ellipse(80, 116, 8, 7),
    }
    level = np.full((SIZE, SIZE), 8.0)
    for name, value in (("body", 90.0), ("bright_organ", 150.0), ("dark_organ", 45.0), ("lesion", 225.0)):
        level[masks[name]] = value
    level = cv2.GaussianBlur(level, (0, 0), 0.8) + np.random.default_rng(seed).normal(0, 4, level.shape)
    grey = np.clip(np.rint(level), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), masks


@pytest.fixture(scope="module")
def lite():
    return build_sam("litemedsam")


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def found(lite, scene):
    return generate_proposals(lite, scene[0], ProposalParams.from_dict(bx.BOX_GENERATOR_DEFAULTS))


@pytest.fixture(scope="module")
def found_regions(lite, scene):
    """The candidate-region cue alone (no box grid): what the filters below act on."""
    return generate_proposals(lite, scene[0], _params())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _params(**boxes) -> ProposalParams:
    """The generator's defaults with these box parameters; the box grid and the large-region slots off unless given."""
    return ProposalParams.from_dict({**bx.BOX_GENERATOR_DEFAULTS, "boxes": {"grid_scales": 0, "large_region_slots": 0,
                                                                            **boxes}})  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Parameters


def test_params_nest_round_trip_and_reject_unknown_keys():
    assert "boxes" in GENERATORS
    params = ProposalParams.from_dict({"generator": "boxes", "boxes": {"jitter": 0.05, "mser_delta": 4}})
    assert params.boxes == BoxProposalParams(jitter=0.05, mser_delta=4)
    assert ProposalParams.from_dict(params.to_dict()) == params
    assert ProposalParams().boxes == BoxProposalParams()
    assert all(f.metadata.get("help") for f in dataclasses.fields(BoxProposalParams))
    with pytest.raises(ValueError, match=r"unknown boxes parameter\(s\) \['mser_detla'\]"):
        ProposalParams.from_dict({"boxes": {"mser_detla": 4}})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['mser_delta'\]"):
        ProposalParams.from_dict({"mser_delta": 4})  # box parameters live under "boxes"
    with pytest.raises(ValueError, match="boxes.mser_delta must be of type int"):
        ProposalParams.from_dict({"boxes": {"mser_delta": 4.5}})
    assert ProposalParams.from_dict({"boxes": {"reference_filters_first": False}}).boxes.reference_filters_first is False
    with pytest.raises(ValueError, match="boxes.reference_filters_first must be of type bool"):
        ProposalParams.from_dict({"boxes": {"reference_filters_first": 0}})
    with pytest.raises(ValueError, match="boxes must be a mapping"):
        ProposalParams.from_dict({"boxes": [1]})
    with pytest.raises(ValueError, match="candidate_nms must be in"):
        ProposalParams.from_dict({"boxes": {"candidate_nms": 0}})


# ------------------------------------------------------------------------------------------------
# Candidate regions and the pure functions


def test_candidate_regions_find_every_structure_of_the_constructed_scene(scene):
    image, masks = scene
    grey = bx.denoised_grey(image, 1.5)
    found = bx.candidate_regions(grey, delta=5, max_variation=1.0, min_area=40, max_area=int(0.8 * SIZE * SIZE))
    assert found.masks.shape[1:] == (SIZE, SIZE) and found.boxes.shape == (len(found), 4)
    for name, mask in masks.items():
        # Holes are filled: the organ's region holds its lesion
        assert max(_iou(mask, m) for m in found.masks) >= 0.8, name
    assert len(bx.candidate_regions(np.full((SIZE, SIZE), 90, np.uint8), delta=5, max_variation=1.0, min_area=40,
                                    max_area=50000)) == 0  # fmt: skip


def test_fill_holes_equals_scipy_on_shapes_with_holes_and_diagonal_gaps():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8], ring[3:6, 3:6] = True, False
    diagonal = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)  # a hole sealed only diagonally
    shapes = [ring, diagonal, np.ones((3, 4), bool), np.zeros((2, 2), bool)]
    shapes += [rng.random((int(h), int(w))) < 0.6 for h, w in rng.integers(1, 30, size=(200, 2))]
    for shape in shapes:
        assert (mask_ops.fill_holes(shape) == ndimage.binary_fill_holes(shape)).all()


def test_tight_boxes_box_iou_and_greedy_nms():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 7, 0] = True
    assert mask_ops.tight_boxes(masks).tolist() == [[2, 1, 6, 3], [0, 7, 1, 8]]
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], np.float32)
    iou = bx.box_iou(boxes, boxes)
    assert np.allclose(np.diag(iou), 1) and iou[0, 1] == pytest.approx(100 / 110) and iou[0, 2] == 0
    # Best score first; the second box overlaps the first above 0.85 and goes
    assert mask_ops.greedy_nms(iou, np.array([0.9, 0.8, 0.1]), 0.85).tolist() == [0, 2]
    assert mask_ops.greedy_nms(iou, np.array([0.5, 0.8, 0.1]), 0.85).tolist() == [1, 2]
    assert mask_ops.greedy_nms(iou, np.array([0.5, 0.8, 0.1]), 0.95).tolist() == [1, 0, 2]
    assert mask_ops.greedy_nms(np.zeros((0, 0)), np.zeros(0), 0.5).tolist() == []


def test_mask_ious():
    a = np.zeros((3, 4, 4), bool)
    a[0, :2] = True
    a[1, :, :2] = True
    b = a.copy()
    b[1] = False
    assert mask_ops.paired_mask_iou(a, b).tolist() == [1.0, 0.0, 0.0]  # two empty masks: 0
    matrix = mask_ops.mask_iou_matrix(a)
    assert matrix[0, 1] == pytest.approx(4 / 12) and matrix[0, 0] == 1 and matrix[2, 2] == 0
    assert np.array_equal(mask_ops.mask_iou_matrix(a[:1], a[1:]), matrix[:1, 1:])  # one set against another


def test_boundary_contrast_separates_structures_from_blobs():
    rng = np.random.default_rng(0)
    grey = 90 + rng.normal(0, 5, (SIZE, SIZE))
    disc = _ellipse(100, 100, 20, 20)
    grey[disc] += 40
    blob = np.zeros((SIZE, SIZE), bool)
    blob[160:200, 150:200] = True  # a box cut out of flat tissue
    off_by_one = _ellipse(100, 100, 21, 21)  # the disc, one pixel too wide
    contrast = mask_ops.boundary_contrast(grey, np.stack([disc, blob, off_by_one, np.zeros_like(disc)]), width=3, gap=2)
    assert contrast[0] > 5 and contrast[2] > 5  # the gap skips the edge itself
    assert contrast[1] < 0.5 and contrast[3] == 0
    # Against the image border: outside the image counts as outside, the ring there is just empty
    corner = np.zeros((SIZE, SIZE), bool)
    corner[:30, :30] = True
    assert mask_ops.boundary_contrast(grey, corner[None], width=3, gap=2)[0] < 0.5


def test_jittered_boxes_shrink_and_grow_within_the_image():
    small, large = box_decoder.jittered_boxes(np.array([[10, 20, 110, 70], [0, 0, 256, 256]], np.float32), 0.1, SIZE)
    assert small[0].tolist() == [20, 25, 100, 65] and large[0].tolist() == [0, 15, 120, 75]
    assert large[1].tolist() == [0, 0, 256, 256]


def test_decoder_windows_hold_their_boxes():
    boxes = np.array([[10, 10, 14, 13], [30, 2, 40, 20], [0, 0, 60, 60], [60, 60, 63, 64]], np.float32)
    windows = box_decoder.decoder_windows(boxes, 64, 0.5)
    for (x0, y0, x1, y1), (side, r0, c0) in zip(boxes, windows):
        assert side in box_decoder.WINDOW_SIDES and 0 <= r0 <= 64 - side and 0 <= c0 <= 64 - side
        assert r0 <= y0 and y1 <= r0 + side and c0 <= x0 and x1 <= c0 + side
    assert windows[0, 0] == 16 and windows[2].tolist() == [64, 0, 0]
    assert (box_decoder.decoder_windows(boxes, 64, 0.0) == [64, 0, 0]).all()  # whole embedding
    assert (box_decoder.decoder_windows(boxes[:1] / 4, 16, 0.5)[:, 0] <= 16).all()  # a 16-token embedding (tiny SAM)


# ------------------------------------------------------------------------------------------------
# The model part (LiteMedSAM, real weights)


def test_windowed_decoder_agrees_with_the_full_one(lite, scene):
    image, masks = scene
    predictor = SamPredictor(lite.model)
    predictor.set_image(image)
    boxes = mask_ops.tight_boxes(np.stack(list(masks.values())))
    windowed, iou_w = box_decoder.decode_boxes(lite, predictor, boxes, window=0.5, batch=2)
    full, iou_f = box_decoder.decode_boxes(lite, predictor, boxes, window=0.0, batch=8)
    assert windowed.shape == (4, SIZE, SIZE) and iou_w.shape == (4,)
    for w, f in zip(windowed > 0, full > 0):
        assert _iou(w, f) > 0.95
    assert torch.allclose(iou_w, iou_f, atol=0.05)


def test_generator_finds_the_constructed_structures(found, scene):
    _, masks = scene
    for name, mask in masks.items():
        assert max(_iou(mask, m) for m in found.masks) >= 0.8, name
    assert len(found) <= BoxProposalParams().max_proposals
    assert found.timings.encoder_calls == 1 and found.timings.decoder_calls >= 1
    assert (found.predicted_iou > 0.5).all() and (found.stability_score >= 0.5).all()


def test_blank_image_gives_zero_proposals_without_running_the_encoder(lite):
    found = generate_proposals(lite, np.full((300, 200, 3), 77, np.uint8), ProposalParams(generator="boxes"))
    assert len(found) == 0 and found.masks.shape == (0, SIZE, SIZE) and found.bbox_xywh.shape == (0, 4)
    assert found.timings.encoder_calls == 0


@pytest.mark.parametrize(
    ("params", "left"),
    [
        ({"generator": "boxes", "boxes": {"min_predicted_iou": 0.999}}, 0),  # predicted IoU
        ({"generator": "boxes", "boxes": {"min_stability": 0.9999}}, 0),  # SAM's stability score
        ({"generator": "boxes", "boxes": {"min_agreement": 1.0}}, 0),  # candidate vs refined mask
        ({"generator": "boxes", "boxes": {"min_contrast": 1e6}}, 0),  # boundary contrast
        # Box jitter (judges the model's masks, so none of the candidate regions is kept instead)
        ({"generator": "boxes", "boxes": {"jitter": 0.2, "min_jitter_stability": 1.01, "prefer_region_contrast": 1e9}},
         0),
        ({"generator": "boxes", "boxes": {"max_candidates": 0}}, 0),  # prompt budget
        ({"generator": "boxes", "boxes": {"mask_nms": 0.01}}, 2),  # mask NMS: only disjoint masks stay
    ],
)
def test_each_filter_removes_what_it_should(lite, scene, found_regions, params, left):
    params.setdefault("min_side", 6)
    params["boxes"].update(grid_scales=0, large_region_slots=0)  # the region path's filters alone
    fewer = generate_proposals(lite, scene[0], ProposalParams.from_dict(params))
    assert len(fewer) <= left < len(found_regions)


def test_regions_replace_refined_masks_only_where_their_boundary_is_sharper(lite, scene, found_regions):
    image, _ = scene
    grey = bx.denoised_grey(image, 1.5)
    regions, contrast = bx.prompt_candidates(grey, BoxProposalParams())
    assert len(contrast) == len(regions) and (bx.box_iou(regions.boxes, regions.boxes)[np.triu_indices(len(regions), 1)]
                                              <= 0.85).all()  # fmt: skip
    always = generate_proposals(lite, image, _params(prefer_region_contrast=0.0))
    never = generate_proposals(lite, image, _params(prefer_region_contrast=1e9))
    assert len(always) and all(any((m == r).all() for r in regions.masks) for m in always.masks)
    assert not any(any((m == r).all() for r in regions.masks) for m in never.masks)
    assert len(found_regions) == len(never)


def test_jitter_keeps_stable_structures(lite, scene, found_regions):
    jittered = generate_proposals(lite, scene[0], _params(jitter=0.03, min_jitter_stability=0.8))
    assert len(jittered) >= len(found_regions) - 1
    assert jittered.timings.decoder_calls > found_regions.timings.decoder_calls


def test_runs_on_the_original_sam_architecture():
    """Tiny SAM (16-token embedding, random weights): the path works, windows capped at the grid."""
    tiny = build_sam("tiny", seed=0)
    image, _ = _scene()
    filters_off = {"min_predicted_iou": -1.0, "min_stability": 0.0, "min_agreement": 0.0, "min_contrast": 0.0}
    params = {"generator": "boxes", "max_area": SIZE * SIZE, "border_margin": -1, "min_side": 0, "boxes": filters_off}
    found = generate_proposals(tiny, prepare_image(image, SIZE), ProposalParams.from_dict(params))
    assert found.masks.shape[1:] == (SIZE, SIZE) and found.timings.encoder_calls == 1


def test_sparse_box_grid_covers_a_structure_without_an_edge_of_its_own():
    # A 48-px patch of "cortex" inside a flat ribbon: no intensity step marks it, so only a grid box can
    # hold it; the zero padding gets no box, and a place a candidate box already covers gets none either
    grey = np.zeros((256, 256), np.uint8)
    grey[48:208, 24:232] = 120
    boxes = sparse_box_grid(grey, (48, 96), foreground_level=20, min_foreground=0.3)
    assert len(boxes) and (boxes[:, 2:] - boxes[:, :2] > 0).all()
    inside = grey > 20
    for x0, y0, x1, y1 in boxes.astype(int):
        assert inside[y0:y1, x0:x1].mean() >= 0.3
    patch = np.array([[72, 96, 120, 144]], np.float32)  # the structure's tight box
    assert box_iou(patch, boxes).max() == 1.0
    assert box_iou(patch, sparse_box_grid(grey, (48,), foreground_level=20, min_foreground=0.3,
                                          covered=patch, max_covered_iou=0.7)).max() <= 0.7  # fmt: skip
    assert len(sparse_box_grid(np.zeros((256, 256), np.uint8), (48,), foreground_level=20, min_foreground=0.3)) == 0


def test_large_region_slots_keep_the_largest_candidate_region(lite, scene):
    # Every model mask filtered out: what is left is the largest candidate region itself (the body)
    image, masks = scene
    found = generate_proposals(lite, image, _params(min_predicted_iou=0.999, large_region_slots=1))
    regions, _ = bx.prompt_candidates(bx.denoised_grey(image, 1.5), BoxProposalParams())
    assert len(found) == 1 and any((found.masks[0] == r).all() for r in regions.masks)
    assert len(generate_proposals(lite, image, _params(min_predicted_iou=0.999))) == 0


def test_grid_slots_go_to_the_largest_grid_masks_first(lite, scene):
    # Grid masks alone (no region or large-region slots): the slots fill largest first, so a smaller
    # cap keeps a prefix of the larger cap's masks
    working = prepare_image(scene[0], 256)

    def grid_only(cap: int) -> Proposals:
        return bx.generate_box_proposals(lite, working, _params(region_slots=0, grid_scales=2, max_proposals=cap))

    every, first = grid_only(100), grid_only(3)
    assert len(every) > 3 and (np.diff(every.area) <= 0).all()
    assert np.array_equal(first.masks, every.masks[:3])
