"""bench/intensity_classes.py: the multi-level Otsu cuts, and a class component that only the opening separates."""

from __future__ import annotations

import numpy as np
from conftest import bench_module


def _disc(cy: int, cx: int, r: float, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_multi_otsu_cuts_fall_between_the_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(mean, 6, 3000) for mean in (50, 120, 200)]).clip(0, 255)
    low, high = bench_module("intensity_classes").multi_otsu(values, 3)
    assert 50 < low < 120 < high < 200
    # Every mode is one class: at most a few tail samples (beyond 3.3 sd) fall on the wrong side of a cut
    labels = np.digitize(values, [low, high])
    assert (labels == np.repeat([0, 1, 2], 3000)).mean() > 0.995


def test_opening_separates_a_nucleus_bridged_to_a_ribbon_of_its_class():
    """A grey disc inside white tissue, joined by a 2-px grey bridge to a grey ribbon along the edge."""
    body = _disc(64, 64, 58)
    ribbon = body & ~_disc(64, 64, 52)
    nucleus = _disc(64, 64, 12)
    bridge = np.zeros_like(body)
    bridge[63:65, 64:120] = True
    dark = _disc(30, 64, 6)  # a third tissue, so that three classes are three levels
    grey = np.zeros((128, 128), np.uint8)
    grey[body] = 200
    grey[ribbon | nucleus | bridge] = 120
    grey[dark] = 60
    classes = bench_module("intensity_classes").class_components

    def best_iou(masks: np.ndarray) -> float:
        inter = (masks & nucleus).sum(axis=(1, 2))
        return float((inter / (masks | nucleus).sum(axis=(1, 2))).max()) if len(masks) else 0.0

    assert best_iou(classes(grey, classes=(3,), radii=(0,))) < 0.5  # the nucleus is part of the ribbon's component
    assert best_iou(classes(grey, classes=(3,), radii=(0, 2))) > 0.9
    assert classes(np.zeros((64, 64), np.uint8)).shape == (0, 64, 64)
