"""A model-free baseline for the proposal benchmark: connected components of multi-level intensity classes.

The foreground (grey level above ``foreground_level`` after the generator's denoising) is split into
``n`` classes by multi-level Otsu thresholds (the cuts that maximise the between-class variance of
the grey-level histogram, found exhaustively on ``bins`` bins), for each ``n`` in ``classes``. Each
class is opened with discs of the given ``radii`` (0: not opened), which cuts the thin bridges
between, say, a deep nucleus and the cortex of the same tissue class, and split into connected
components; each component of at least ``min_area`` px, holes filled, is a proposal. Near-copies
(mask IoU above 0.95) are dropped, the larger kept.

Unlike MSER (the box generator's candidate regions), a class component needs no grey-level step
around it: a band of intermediate grey levels between two brighter and darker tissues is one, which
is what a low-contrast structure next to both looks like. No cap: this row shows what intensity alone
finds, at the count it needs.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

from a3tune.labels.mask_ops import fill_holes, greedy_nms, mask_iou_matrix


def multi_otsu(values: np.ndarray, n_classes: int, bins: int = 64) -> list[float]:
    """The ``n_classes - 1`` grey-level cuts (ascending, on 0-256) maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0, 256))
    weight = np.concatenate([[0.0], np.cumsum(hist / max(hist.sum(), 1))])
    moment = np.concatenate([[0.0], np.cumsum(hist / max(hist.sum(), 1) * (np.arange(bins) + 0.5))])
    best, cuts = -1.0, ()
    for inner in itertools.combinations(range(1, bins), n_classes - 1):
        bounds = (0, *inner, bins)
        spread = 0.0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            w = weight[hi] - weight[lo]
            if w > 0:
                spread += (moment[hi] - moment[lo]) ** 2 / w
        if spread > best:
            best, cuts = spread, inner
    return [float(edges[c]) for c in cuts]


def class_components(
    grey: np.ndarray,
    *,
    classes: tuple[int, ...] = (3, 4),
    radii: tuple[int, ...] = (0, 2, 4),
    foreground_level: int = 20,
    min_area: int = 40,
    max_fraction: float = 0.8,
) -> np.ndarray:
    """(n, H, W) bool masks: the components of every intensity class of a uint8 image (see the module)."""
    values = grey[grey > foreground_level]
    masks = []
    for n in classes if values.size else ():
        bounds = [foreground_level, *multi_otsu(values, n), 256]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            band = ((grey > lo) & (grey <= hi)).astype(np.uint8)
            for radius in radii:
                disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
                opened = cv2.morphologyEx(band, cv2.MORPH_OPEN, disc) if radius else band
                count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=4)
                for i in range(1, count):
                    if min_area <= stats[i, cv2.CC_STAT_AREA] <= max_fraction * grey.size:
                        masks.append(fill_holes(labels == i))
    if not masks:
        return np.zeros((0, *grey.shape), dtype=bool)
    out = np.stack(masks)
    return out[greedy_nms(mask_iou_matrix(out), out.sum(axis=(1, 2)), 0.95)]
