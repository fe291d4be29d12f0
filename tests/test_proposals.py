"""SAM proposals: parameters, the reference filters as pure functions, the generator path, timings."""

from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

from a3tune.data.phantom_scene import ORGANS, draw_scene
from a3tune.labels.box_params import BoxProposalParams
from a3tune.labels.proposal_filters import (
    apply_filters,
    area_below,
    away_from_border,
    box_has_extent,
    first_of_duplicates,
    sides_above,
    sort_order,
)
from a3tune.labels.proposal_params import ProposalParams
from a3tune.labels.proposal_timing import time_model
from a3tune.labels.proposal_types import Proposals, boxes_from_masks
from a3tune.labels.proposals import GENERATORS, generate_proposals, prepare_image, reprompt_with_boxes
from a3tune.labels.sam_backends import build_sam

# Random weights give low scores: with these a tiny SAM proposes something
PERMISSIVE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_mask_region_area": 0, "max_area": 65536,
              "border_margin": -1, "min_side": 0}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _rect(x: int, y: int, w: int, h: int, size: int = 256) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y : y + h, x : x + w] = True
    return mask


def _phantom() -> dict:
    return dict(size=256, organs=tuple(ORGANS), lesion_organ="liver", cyst_organ=None, cue=False,
                lesion_radius=(5, 8), noise=4.0, jitter=0.02, marker_size=6)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def scene():
    return draw_scene(np.random.default_rng(3), **_phantom())


# ------------------------------------------------------------------------------------------------
# Parameters


def test_defaults_are_the_reference_numbers():
    params = ProposalParams()
    assert params.to_dict() == {
        "generator": "points", "working_size": 256, "channel_order": "rgb", "points_per_side": 8,
        "points_per_batch": 64, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.5, "stability_score_offset": 1.0,
        "box_nms_thresh": 0.8, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2, "crop_nms_thresh": 0.8,
        "crop_overlap_ratio": 512 / 1500, "min_mask_region_area": 200, "max_area": 40000, "border_margin": [1, 2],
        "min_side": 12, "reprompt_boxes": False, "boxes": dataclasses.asdict(BoxProposalParams()),
    }  # fmt: skip
    assert all(f.metadata.get("help") for f in dataclasses.fields(ProposalParams))
    assert ProposalParams.from_dict(params.to_dict()) == params


def test_from_dict_checks_names_types_and_values():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['points_per_edge'\]"):
        ProposalParams.from_dict({"points_per_edge": 4})
    with pytest.raises(ValueError, match="points_per_side must be of type int"):
        ProposalParams.from_dict({"points_per_side": "8"})
    with pytest.raises(ValueError, match="reprompt_boxes must be of type bool"):
        ProposalParams.from_dict({"reprompt_boxes": 1})
    with pytest.raises(ValueError, match="channel_order must be 'rgb' or 'bgr'"):
        ProposalParams.from_dict({"channel_order": "grb"})
    with pytest.raises(ValueError, match=r"generator must be one of \['boxes', 'points'\]"):
        ProposalParams.from_dict({"generator": "grid"})
    with pytest.raises(ValueError, match="border_margin must be an int or a pair"):
        ProposalParams.from_dict({"border_margin": [1, 2, 3]})
    assert ProposalParams.from_dict({"border_margin": 3}).border_margin == (3, 3)
    assert ProposalParams.from_dict({"border_margin": [0, 4]}).border_margin == (0, 4)
    assert ProposalParams.from_dict({"pred_iou_thresh": 1}).pred_iou_thresh == 1.0


# ------------------------------------------------------------------------------------------------
# The column container and the filters


def test_proposals_columns_filter_and_empty():
    masks = np.stack([_rect(10, 10, 5, 4), _rect(0, 20, 30, 2), np.zeros((256, 256), bool)])
    found = Proposals.from_masks(masks, [0.9, 0.8, 0.7], [1.0, 0.5, 0.0])
    assert found.bbox_xywh.tolist() == [[10, 10, 5, 4], [0, 20, 30, 2], [0, 0, 0, 0]]
    assert found.area.tolist() == [20, 60, 0]
    assert (found.bbox_xywh.dtype, found.area.dtype, found.predicted_iou.dtype) == (np.int32, np.int64, np.float32)
    picked = found.filter(np.array([2, 0]))
    assert len(picked) == 2 and picked.area.tolist() == [0, 20] and picked.masks[1].sum() == 20
    assert found.filter(np.array([False, True, False])).bbox_xywh.tolist() == [[0, 20, 30, 2]]
    empty = Proposals.empty(64)
    assert len(empty) == 0 and empty.masks.shape == (0, 64, 64) and empty.bbox_xywh.shape == (0, 4)
    assert len(empty.filter(np.zeros(0, bool))) == 0 and boxes_from_masks(empty.masks).shape == (0, 4)
    with pytest.raises(ValueError, match="differ in length"):
        Proposals(masks, found.bbox_xywh, found.area, [0.5], found.stability_score)


def test_each_filter_on_constructed_boxes():
    boxes = np.array([[0, 5, 20, 20], [1, 1, 20, 20], [200, 5, 54, 20], [200, 5, 55, 20], [5, 5, 13, 14],
                      [5, 5, 14, 14], [5, 5, 1, 30], [0, 0, 0, 0]])  # fmt: skip
    assert area_below(np.array([39999, 40000, 0]), 40000).tolist() == [True, False, True]
    assert box_has_extent(boxes).tolist() == [True, True, True, True, True, True, False, False]
    assert away_from_border(boxes, 256, (1, 2)).tolist() == [False, True, True, False, True, True, True, False]
    assert away_from_border(boxes, 256, (-1, -1)).all()
    assert sides_above(boxes, 12).tolist() == [True, True, True, True, False, True, False, False]
    assert sides_above(boxes, -1)[:7].all()


def _reference_keep(mask: np.ndarray) -> bool:
    """The reference's filters, literally, on segment_anything's record (box x1 = last column)."""
    x, y, w, h = box_xyxy_to_xywh(batched_mask_to_box(torch.as_tensor(mask[None]))[0]).tolist()
    if not mask.sum() < 40000:
        return False
    if w == 0 or h == 0:  # get_crops
        return False
    return not (x == 0 or y == 0 or w <= 12 or h <= 12 or x + w > 253 or y + h > 253)  # filter_sam_results


def test_filters_make_exactly_the_reference_decisions():
    rng = np.random.default_rng(0)
    # Rectangles near every border, around 13 px and around 40000 px, plus ellipses
    rects = [(0, 9, 20, 20), (9, 0, 20, 20), (1, 1, 13, 13), (1, 1, 14, 14), (240, 100, 14, 20), (240, 100, 15, 20),
             (100, 241, 20, 13), (100, 240, 20, 14), (20, 20, 200, 200), (20, 20, 199, 201), (5, 5, 1, 1)]  # fmt: skip
    for _ in range(150):
        w, h = rng.integers(1, 30, 2) if rng.random() < 0.7 else rng.integers(150, 254, 2)
        x, y = rng.integers(0, 256 - w + 1), rng.integers(0, 256 - h + 1)
        rects.append((int(x), int(y), int(w), int(h)))
    masks = [_rect(*r) for r in rects]
    yy, xx = np.mgrid[0:256, 0:256]
    for _ in range(40):
        cx, cy, ax, ay = rng.uniform(0, 256, 2).tolist() + rng.uniform(3, 120, 2).tolist()
        masks.append(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1)
    masks.append(np.zeros((256, 256), bool))
    found = Proposals.from_masks(np.stack(masks), np.zeros(len(masks)), np.zeros(len(masks)))
    found = dataclasses.replace(found, predicted_iou=np.arange(len(masks)))  # row numbers ride along
    kept = apply_filters(found, ProposalParams())
    expected = [i for i, m in enumerate(masks) if _reference_keep(m)]
    assert kept.predicted_iou.astype(int).tolist() == expected
    assert 0 < len(expected) < len(masks)


def test_order_is_deterministic_and_duplicates_go():
    a, b, c = _rect(10, 30, 10, 10), _rect(5, 40, 20, 5), _rect(50, 50, 20, 20)
    masks = np.stack([a, b, a, c])
    found = Proposals.from_masks(masks, [0.6, 0.7, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0])
    ordered = found.filter(sort_order(found))
    # Area desc (c: 400), then x asc (b at x=5 before a at x=10), then predicted IoU desc among equal boxes
    assert ordered.predicted_iou.tolist() == pytest.approx([0.5, 0.7, 0.9, 0.6])
    assert first_of_duplicates(ordered.masks).tolist() == [True, True, True, False]
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        shuffled = found.filter(np.array(perm))
        again = shuffled.filter(sort_order(shuffled))
        assert np.array_equal(again.masks, ordered.masks) and np.array_equal(again.predicted_iou, ordered.predicted_iou)


# ------------------------------------------------------------------------------------------------
# The working image


def test_working_image_is_resized_without_keeping_the_aspect_ratio():
    image = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    working = prepare_image(image, 128)
    assert working.shape == (128, 128, 3) and working.dtype == np.uint8
    assert np.array_equal(working, cv2.resize(image, (128, 128), interpolation=cv2.INTER_LINEAR))
    square = image[:256, :256].copy()
    assert np.array_equal(prepare_image(square, 256), square)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        prepare_image(image[..., 0], 128)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        prepare_image(image.astype(np.float32), 128)


def test_generator_gets_the_resized_image_in_the_chosen_channel_order(tiny, monkeypatch):
    seen = []

    def spy(sam, working, params):
        seen.append(working)
        return Proposals.empty(working.shape[0])

    monkeypatch.setitem(GENERATORS, "spy", spy)
    image = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    for order in ("rgb", "bgr"):
        found = generate_proposals(tiny, image, ProposalParams(generator="spy", working_size=96, channel_order=order))
        assert len(found) == 0 and found.masks.shape == (0, 96, 96)
    rgb, bgr = seen
    assert rgb.shape == (96, 96, 3) and np.array_equal(bgr, rgb[..., ::-1]) and not np.array_equal(bgr, rgb)


# ------------------------------------------------------------------------------------------------
# The generator path with a tiny random SAM


def _check_invariants(found: Proposals, size: int) -> None:
    assert found.masks.shape == (len(found), size, size) and found.masks.dtype == bool
    assert np.array_equal(found.area, found.masks.sum(axis=(1, 2)))
    assert np.array_equal(found.bbox_xywh, boxes_from_masks(found.masks))
    assert np.array_equal(sort_order(found), np.arange(len(found)))
    assert first_of_duplicates(found.masks).all()


def test_tiny_sam_runs_the_point_grid_with_lowered_thresholds(tiny, scene):
    found = generate_proposals(tiny, scene.image, ProposalParams.from_dict(PERMISSIVE))
    assert len(found) >= 1
    _check_invariants(found, 256)
    t = found.timings
    assert (t.encoder_calls, t.decoder_calls) == (5, 5)  # the full image and 4 crops, 64 points / batch
    assert t.encoder_s > 0 and t.decoder_s > 0 and t.total_s >= t.model_s and 0 <= t.outside_fraction <= 1


def test_tiny_sam_at_reference_thresholds_gives_zero_proposals_not_an_error(tiny, scene):
    # Random weights: no mask passes; upstream SamAutomaticMaskGenerator raises IndexError here
    found = generate_proposals(tiny, scene.image, ProposalParams())
    assert len(found) == 0 and found.masks.shape == (0, 256, 256) and found.bbox_xywh.shape == (0, 4)
    assert found.timings.encoder_calls == 5


def test_reprompt_boxes_runs_with_the_tiny_sam(tiny, scene):
    params = ProposalParams.from_dict({**PERMISSIVE, "reprompt_boxes": True, "crop_n_layers": 0})
    found = generate_proposals(tiny, scene.image, params)
    assert len(found) >= 1
    _check_invariants(found, 256)
    assert found.timings.encoder_calls == 2  # the point grid's image, then the re-prompt's


def test_time_model_splits_encoder_and_decoder(tiny, scene):
    predictor = SamPredictor(tiny.model)
    with time_model(tiny.model) as t:
        predictor.set_image(scene.image)
        predictor.predict(point_coords=np.array([[100, 100]]), point_labels=np.array([1]))
    assert (t.encoder_calls, t.decoder_calls) == (1, 1) and t.total_s >= t.model_s > 0
    assert not tiny.model.image_encoder._forward_hooks and not tiny.model.mask_decoder._forward_pre_hooks
    # SAM's pre- and post-processing (the rest of Sam.forward) count too, and are unwrapped after the block
    assert "preprocess" not in vars(tiny.model) and "postprocess_masks" not in vars(tiny.model)


def test_time_model_counts_sams_pre_and_postprocessing(tiny, monkeypatch):
    def slow(method):
        def call(*args, **kwargs):
            time.sleep(0.05)
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(type(tiny.model), "preprocess", slow(type(tiny.model).preprocess))
    monkeypatch.setattr(type(tiny.model), "postprocess_masks", slow(type(tiny.model).postprocess_masks))
    low_res = torch.zeros(1, 1, 64, 64)
    with time_model(tiny.model) as t:
        tiny.model.preprocess(torch.zeros(1, 3, 256, 256))
        tiny.model.postprocess_masks(low_res, (256, 256), (256, 256))
    assert t.encoder_s >= 0.05 and t.decoder_s >= 0.05 and t.encoder_calls == t.decoder_calls == 0


# ------------------------------------------------------------------------------------------------
# Re-prompting with boxes: what box-trained models are good at (LiteMedSAM's real weights)


def test_reprompt_turns_box_shaped_masks_into_organs_with_litemedsam(scene):
    sam = build_sam("litemedsam")
    names = ("liver", "spleen", "stomach", "left_kidney")
    truths = [scene.structures[name].mask for name in names]
    boxes = boxes_from_masks(np.stack(truths))
    coarse = Proposals.from_masks(np.stack([_rect(*b) for b in boxes]), np.ones(4), np.ones(4))
    refined = reprompt_with_boxes(sam, scene.image, coarse, ProposalParams())
    assert len(refined) == len(names)
    for name, truth, box in zip(names, truths, coarse.masks):
        ious = [(m & truth).sum() / (m | truth).sum() for m in refined.masks]
        before = (box & truth).sum() / (box | truth).sum()
        assert max(ious) > 0.8 and max(ious) > before, f"{name}: IoU {max(ious):.2f}, box alone {before:.2f}"
