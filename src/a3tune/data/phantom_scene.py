"""Drawing one phantom scan: body, named organs, lesions, cysts and the cue marker, with exact masks.

Pure numpy, no files and no config object: ``draw_scene`` takes the decisions made for one image
(which organ carries the lesion, where the cyst goes, whether the corner marker is shown) and a
seeded generator, and returns the RGB image with the boolean mask of every structure in it.
Coordinates are pixels, x to the right and y down. The anatomy follows the radiological convention
(the patient's right on the image's left), so the liver and the right kidney lie on the image's left.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

# Grey levels (0-255) of the background, the body's soft tissue, bone, cysts and the marker.
BACKGROUND, BODY, SPINE, CYST, MARKER = 6.0, 85.0, 215.0, 20.0, 250.0
# A lesion is this much brighter than its organ (drawn per lesion), so it is bright in every organ.
LESION_CONTRAST = (55.0, 75.0)
# Each organ's grey level moves by up to this much from image to image.
ORGAN_SPREAD = 8.0
# Amplitude of the smooth low-frequency texture inside the body, in grey levels.
TEXTURE = 5.0
# A lesion or cyst keeps this many pixels of its organ around it.
MARGIN = 1
# Correlation length (Gaussian sigma, px) of the grain noise: CT noise is correlated over ~1-2 px
# (its noise power spectrum peaks at mid frequencies), not white.
GRAIN_SIGMA = 0.8
# Correlation length of the parenchymal texture, as a fraction of the image side (2 px at 128 px).
TEXTURE_SCALE = 1 / 64
# Coarse grid cells of the bias field across the image: one smooth bulge or two, no more.
BIAS_CELLS = 3


@dataclasses.dataclass(frozen=True)
class Ellipse:
    """Centre, semi-axes (fractions of the image size) and rotation (degrees)."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float = 0.0


@dataclasses.dataclass(frozen=True)
class OrganSpec:
    display: str  # the name questions and reports use
    intensity: float  # mean grey level
    lobes: tuple[Ellipse, ...]  # the organ is the union of these
    notch: tuple[float, float, float] | None = None  # (dx, dy, r): disc cut out next to the first lobe


# The fixed vocabulary. Shapes differ (two-lobed liver, elongated spleen, round stomach, bean-shaped
# kidneys) and so do grey levels, except the two kidneys: only their side tells them apart.
ORGANS: dict[str, OrganSpec] = {
    "liver": OrganSpec("liver", 140.0, (Ellipse(0.31, 0.45, 0.15, 0.12, -20), Ellipse(0.40, 0.32, 0.09, 0.06, 10))),
    "stomach": OrganSpec("stomach", 60.0, (Ellipse(0.60, 0.33, 0.08, 0.065, 15.0),)),
    "spleen": OrganSpec("spleen", 115.0, (Ellipse(0.79, 0.50, 0.06, 0.11, 20.0),)),
    "right_kidney": OrganSpec("right kidney", 165.0, (Ellipse(0.32, 0.69, 0.065, 0.09, 15.0),), (0.065, 0, 0.025)),
    "left_kidney": OrganSpec("left kidney", 165.0, (Ellipse(0.68, 0.69, 0.065, 0.09, -15.0),), (-0.065, 0, 0.025)),
}
# Depth of the smallest organ (a kidney) stayed >= 0.049 x size in 900 draws at 64-256 px; a
# lesion of radius r needs r + MARGIN of it, which PhantomConfig checks against this bound.
SMALLEST_ROOM = 0.05
BODY_SHAPE = Ellipse(0.5, 0.52, 0.45, 0.35)
SPINE_SHAPE = Ellipse(0.5, 0.76, 0.05, 0.045)


@dataclasses.dataclass(frozen=True)
class Structure:
    kind: str  # body / organ / bone / lesion / cyst / marker
    mask: np.ndarray  # (size, size) bool
    organ: str | None = None  # for a lesion or cyst: the organ it lies in
    radius: int | None = None  # for a lesion or cyst: its larger semi-axis in pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size, 3) uint8, grey replicated into RGB
    structures: dict[str, Structure]  # name -> structure, in drawing order


def ellipse_mask(
    size: int, shape: Ellipse, *, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, dangle: float = 0.0
) -> np.ndarray:
    """Pixels whose centres lie in ``shape`` moved by (dx, dy) px, scaled and turned by ``dangle``."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    theta = np.deg2rad(shape.angle + dangle)
    u, v = xx - (shape.cx * size + dx), yy - (shape.cy * size + dy)
    a, b = shape.ax * size * scale, shape.ay * size * scale
    return _inside(u, v, theta, a, b)


def _inside(u: np.ndarray, v: np.ndarray, theta: float, a: float, b: float) -> np.ndarray:
    """Offsets (u, v) from an ellipse's centre that fall inside it (semi-axes a, b turned by theta)."""
    return ((u * np.cos(theta) + v * np.sin(theta)) / a) ** 2 + ((v * np.cos(theta) - u * np.sin(theta)) / b) ** 2 <= 1


def depth(mask: np.ndarray) -> np.ndarray:
    """For each pixel of ``mask``, the distance to the nearest pixel outside it (0 outside)."""
    # Outside pixels touching the mask (the frame around the image counts as outside).
    padded = np.pad(mask, 1)
    grown = np.zeros_like(padded)
    grown[1:, :] |= padded[:-1, :]
    grown[:-1, :] |= padded[1:, :]
    grown[:, 1:] |= padded[:, :-1]
    grown[:, :-1] |= padded[:, 1:]
    border = np.argwhere(grown & ~padded) - 1
    inside = np.argwhere(mask)
    out = np.zeros(mask.shape)
    if len(inside):
        d2 = ((inside[:, None, :] - border[None, :, :]) ** 2).sum(-1).min(1)
        out[inside[:, 0], inside[:, 1]] = np.sqrt(d2)
    return out


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: a coarse random grid, bilinearly interpolated."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells))
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    rows = np.stack([np.interp(pos, np.arange(cells), coarse[i]) for i in range(cells)])
    return np.stack([np.interp(pos, np.arange(cells), rows[:, j]) for j in range(size)], axis=1)


def _correlated_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise with unit std, correlated over ``sigma`` px (white noise, Gaussian-filtered)."""
    field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-12)


def _place_blob(
    rng: np.random.Generator, host: np.ndarray, radius_range: tuple[int, int], what: str
) -> tuple[np.ndarray, int]:
    """An elliptical blob that fits inside ``host`` with ``MARGIN`` pixels to spare; its radius."""
    room = depth(host)
    largest = int(np.floor(room.max())) - MARGIN
    low, high = radius_range
    if largest < low:
        raise ValueError(f"no room for a {what} of radius {low} px (largest fit {largest} px); lower it or raise size")
    radius = int(rng.integers(low, min(high, largest) + 1))
    centres = np.argwhere(room >= radius + MARGIN)
    cy, cx = centres[rng.integers(len(centres))] + 0.5
    minor = radius * rng.uniform(0.75, 1.0)
    theta = rng.uniform(0.0, np.pi)
    size = host.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    blob = _inside(xx - cx, yy - cy, theta, radius, minor)
    return blob & host, radius


def draw_scene(
    rng: np.random.Generator,
    *,
    size: int,
    organs: tuple[str, ...],
    lesion_organ: str | None,
    cyst_organ: str | None,
    cue: bool,
    lesion_radius: tuple[int, int],
    noise: float,
    jitter: float,
    marker_size: int,
    texture: float = 0.0,
    bias: float = 0.0,
    grain: float = 0.0,
    blur: float = 0.0,
) -> Scene:
    """Draw one scan.

    Args:
        rng: the image's own generator; every random choice of the drawing comes from it.
        size: side of the square image in pixels.
        organs: names (keys of ``ORGANS``) of the organs to draw.
        lesion_organ: organ that gets a bright lesion, or None.
        cyst_organ: organ that gets a dark lesion-sized cyst, or None.
        cue: draw the bright marker square in the top-right corner.
        lesion_radius: (min, max) larger semi-axis of lesions and cysts in pixels.
        noise: standard deviation of the per-pixel noise in grey levels.
        jitter: largest shift of an organ's centre as a fraction of ``size``.
        marker_size: side of the marker square in pixels.
        texture: std (grey levels) of the fine parenchymal texture inside the body, correlated over
            ``TEXTURE_SCALE`` of the image side.
        bias: amplitude of a smooth multiplicative bias field (0.06: intensities vary by up to +-6%
            across the image, like CT cupping or MR coil shading).
        grain: std (grey levels) of correlated noise (Gaussian sigma ``GRAIN_SIGMA`` px), on top of
            the white ``noise``.
        blur: sigma (px) of the Gaussian point spread applied before the noise: edges get
            partial-volume grey levels instead of steps. The masks stay the exact pixel-centre shapes.

    The last four are drawn after everything else, so at 0 they leave the image exactly as without
    them, and the shapes never depend on them.
    """
    structures: dict[str, Structure] = {}
    level = np.full((size, size), BACKGROUND)

    # Body outline, slightly resized per image.
    body = ellipse_mask(size, BODY_SHAPE, scale=rng.uniform(0.96, 1.04))
    structures["body"] = Structure("body", body)
    level[body] = BODY
    # Organs, in vocabulary order; a pixel belongs to the first organ that claims it, inside the body.
    taken = ~ellipse_mask(size, BODY_SHAPE, scale=0.92)
    for name in ORGANS:
        if name not in organs:
            continue
        spec = ORGANS[name]
        dx, dy = rng.uniform(-jitter, jitter, 2) * size
        scale, dangle = rng.uniform(0.92, 1.08), rng.uniform(-10.0, 10.0)
        mask = np.zeros((size, size), bool)
        for lobe in spec.lobes:
            mask |= ellipse_mask(size, lobe, dx=dx, dy=dy, scale=scale, dangle=dangle)
        if spec.notch is not None:
            ndx, ndy, nr = spec.notch
            first = spec.lobes[0]
            mask &= ~ellipse_mask(size, Ellipse(first.cx + ndx, first.cy + ndy, nr, nr), dx=dx, dy=dy, scale=scale)
        mask &= ~taken
        taken |= mask
        structures[name] = Structure("organ", mask)
        level[mask] = spec.intensity + rng.uniform(-ORGAN_SPREAD, ORGAN_SPREAD)
    # Spine: a bright, fixed, unnamed structure that a "find the brightest spot" reader trips over.
    spine = ellipse_mask(size, SPINE_SHAPE, dx=rng.uniform(-1.0, 1.0), scale=rng.uniform(0.95, 1.05)) & ~taken
    structures["spine"] = Structure("bone", spine)
    level[spine] = SPINE

    # Lesion (bright, relative to its organ) and cyst (dark), each inside its organ with a margin.
    if lesion_organ is not None:
        host = structures[lesion_organ].mask
        blob, radius = _place_blob(rng, host, lesion_radius, "lesion")
        level[blob] = level[host & ~blob].mean() + rng.uniform(*LESION_CONTRAST)
        structures["lesion_0"] = Structure("lesion", blob, organ=lesion_organ, radius=radius)
    if cyst_organ is not None:
        host = structures[cyst_organ].mask
        if "lesion_0" in structures:
            host = host & ~structures["lesion_0"].mask
        blob, radius = _place_blob(rng, host, lesion_radius, "cyst")
        level[blob] = CYST
        structures["cyst_0"] = Structure("cyst", blob, organ=cyst_organ, radius=radius)

    # Texture inside the body, noise everywhere.
    level = level + np.where(body, TEXTURE * _smooth_field(rng, size), 0.0)
    white = rng.normal(0.0, noise, (size, size))
    # Scanner realism, drawn last: parenchymal texture, point spread (partial volume), bias, grain.
    if texture > 0:
        level = level + np.where(body, texture * _correlated_noise(rng, size, TEXTURE_SCALE * size), 0.0)
    if blur > 0:
        level = ndimage.gaussian_filter(level, blur, mode="nearest")
    if bias > 0:
        level = level * (1.0 + bias * _smooth_field(rng, size, cells=BIAS_CELLS))
    if grain > 0:
        white = white + grain * _correlated_noise(rng, size, GRAIN_SIGMA)
    level = level + white
    # Cue marker last, flat, so it is the same square in every image that has it.
    if cue:
        marker = np.zeros((size, size), bool)
        edge = max(2, size // 32)
        marker[edge:edge + marker_size, size - edge - marker_size:size - edge] = True
        level[marker] = MARKER
        structures["marker"] = Structure("marker", marker)

    grey = np.clip(np.rint(level), 0, 255).astype(np.uint8)
    return Scene(image=np.repeat(grey[..., None], 3, axis=2), structures=structures)


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """Tight bounding box [x, y, width, height] of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
