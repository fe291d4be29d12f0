"""Project working-size masks onto a model's vision-token grid, with the model's own geometry.

Masks live at the SAM working size S×S: the original H×W image squashed to a square. The model sees
the original image through its own preprocessing, which ends in a P×P input cut into a G×G grid of
patches (G = P / patch: 16 for CLIP-224/14, 24 for CLIP-336/14). A label cell (r, c) must cover
the part of the image that token (r, c) sees, so the projection follows the image, not the mask:

    grid cell  ->  region of the P×P input  ->  region of the original image  ->  region of the mask
                      (r·P/G .. (r+1)·P/G)        (preprocess, inverted)          (x·S/W, y·S/H)

Preprocesses (all separable, one affine map per axis from input to original coordinates):

- ``crop``: CLIP-style resize of the shortest side to P, then a centre crop P×P (LLaVA-Med v1,
  Hugging Face ``CLIPImageProcessor``: long side ``int(P·long/short)``, crop offset ``(N-P)//2``);
- ``pad``: pad to a centred square (LLaVA's ``expand2square``, offset ``(L-side)//2``), then resize
  to P (LLaVA v1.5 ``image_aspect_ratio: pad``); padding maps to no mask pixel, so it reads 0;
- ``squash``: resize H×W straight to P×P, the geometry the reference's 256² masks assume; it equals
  the other two only for square images.

Modes:

- ``centre`` reproduces the reference's Pillow nearest arithmetic: P→G nearest picks input pixel
  ``floor((r+0.5)·P/G)``, whose centre is read from the mask by a nearest resize of the squashed
  mask into the model's frame (resized frame for ``crop``, padded square for ``pad``). Pillow's
  double-precision stepping is emulated, ties included, so the result equals the Pillow pipeline
  bit for bit (tests/test_grid.py). For a square image, S=256, P=224, G=16 this is exactly
  ``grid[r, c] = mask[16r+8, 16c+8]``; with G=24 on the reference's 224 intermediate
  (``GridSpec.reference(24)``) the sampled rows/columns are 5, 16, 26, 37, ..., 250, with 143 (not
  the exact 144) at line 13, where Pillow's stepping falls below a tie.
- ``area``: the share of the cell covered by the mask, in [0, 1] (padding counts as uncovered).

P need not be a multiple of G (the reference samples its 24-grid from a 224 image).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import numpy as np

PREPROCESSES = ("crop", "pad", "squash")
MODES = ("centre", "area")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """How labels are projected onto one model's vision-token grid."""

    grid: int = dataclasses.field(default=16, metadata={"help": "G: tokens per side of the vision grid"})
    input_size: int = dataclasses.field(default=224, metadata={"help": "P: side of the model's square input"})
    preprocess: str = dataclasses.field(default="squash", metadata={"help": f"one of {PREPROCESSES}"})
    mode: str = dataclasses.field(default="centre", metadata={"help": f"one of {MODES}"})

    def __post_init__(self) -> None:
        for name in ("grid", "input_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"grid spec: {name} must be a positive integer, got {value!r}")
        if self.preprocess not in PREPROCESSES:
            raise ValueError(f"grid spec: preprocess {self.preprocess!r} is not one of {list(PREPROCESSES)}")
        if self.mode not in MODES:
            raise ValueError(f"grid spec: mode {self.mode!r} is not one of {list(MODES)}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> GridSpec:
        """Build from plain JSON values; unknown keys raise ``ValueError``."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"grid spec: unknown key(s) {unknown}; known: {known}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def reference(cls, grid: int = 16) -> GridSpec:
        """The reference pipeline: 256² mask -> nearest 224 -> centre crop 224 -> nearest G."""
        return cls(grid=grid, input_size=224, preprocess="squash", mode="centre")


def _input_to_original(length: int, other: int, spec: GridSpec) -> tuple[Fraction, Fraction]:
    """(scale, shift) with u = p·scale + shift: input coordinate p (0..P) -> original coordinate u.

    ``length`` is the image's side along this axis, ``other`` the side along the other axis.
    Coordinates are continuous pixel edges: pixel i spans [i, i+1).
    """
    size = spec.input_size
    if spec.preprocess == "squash":
        return Fraction(length, size), Fraction(0)
    if spec.preprocess == "pad":
        side = max(length, other)
        return Fraction(side, size), -Fraction((side - length) // 2)
    # crop: the shortest side becomes P, the other int(P·long/short); then a centre crop of P
    resized = size if length <= other else (size * length) // other
    return Fraction(length, resized), Fraction((resized - size) // 2 * length, resized)


def _area_weights(n_mask: int, length: int, other: int, spec: GridSpec) -> np.ndarray:
    """(G, n_mask) weights: the share of grid line g's interval that falls on mask line i.

    The cell's interval is mapped to mask coordinates; the parts outside the mask (padding) fall on
    no pixel, so a line's weights sum to its share inside the image.
    """
    scale, shift = _input_to_original(length, other, spec)
    to_mask = Fraction(n_mask, length)
    size, g = spec.input_size, spec.grid
    edges = np.array([float((Fraction(r * size, g) * scale + shift) * to_mask) for r in range(g + 1)])
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n_mask, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None)
    return overlap / (hi - lo)


def _pil_nearest_positions(step: float, count: int) -> np.ndarray:
    """Source positions of output pixels 0..count-1 in a Pillow NEAREST resize with scale ``step``.

    Pillow (``ImagingScaleAffine``) starts at ``step * 0.5`` and adds ``step`` once per output pixel
    in double precision, then truncates. Repeated addition drifts below exact ties such as
    3.5 · 256/224 = 4, which Pillow reads as pixel 3; emulating it keeps ties where the reference
    put them (e.g. row 13 of the reference 24-grid samples mask row 143, not 144).
    """
    positions = np.empty(count, dtype=np.float64)
    xo = step * 0.5
    for i in range(count):
        positions[i] = xo
        xo += step
    return positions


def _centre_index(n_mask: int, length: int, other: int, spec: GridSpec) -> np.ndarray:
    """(G,) mask index read by each grid line in ``centre`` mode; out of [0, n_mask) is padding."""
    g, size = spec.grid, spec.input_size
    # Nearest P -> G picks one input pixel per grid line.
    pixel = _pil_nearest_positions(float(Fraction(size, g)), g).astype(np.int64)
    # That pixel's centre in the mask, as Pillow's nearest resize of the squashed mask into the
    # model's frame would read it: the resized frame (crop), or the padded square (pad).
    if spec.preprocess == "crop":
        resized = size if length <= other else (size * length) // other
        step, first, offset = Fraction(n_mask, resized), (resized - size) // 2, Fraction(0)
    elif spec.preprocess == "pad":
        side = max(length, other)
        step, first = Fraction(side * n_mask, size * length), 0
        offset = Fraction((side - length) // 2 * n_mask, length)
    else:
        step, first, offset = Fraction(n_mask, size), 0, Fraction(0)
    positions = _pil_nearest_positions(float(step), first + size)[first + pixel] - float(offset)
    return np.floor(positions).astype(np.int64)


def cell_edges(image_hw: tuple[int, int], spec: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """The grid's cell boundaries in original image coordinates: (y_edges, x_edges), G+1 each.

    Edges may fall outside [0, H] x [0, W] (padding in ``pad`` mode); in ``crop`` mode they span
    only the part of the image the model keeps. Useful for drawing the grid over the image.
    """
    height, width = _check_hw(image_hw)
    lines = [Fraction(r * spec.input_size, spec.grid) for r in range(spec.grid + 1)]
    out = []
    for length, other in ((height, width), (width, height)):
        scale, shift = _input_to_original(length, other, spec)
        out.append(np.array([float(p * scale + shift) for p in lines]))
    return out[0], out[1]


def project_masks(masks: np.ndarray, image_hw: tuple[int, int], spec: GridSpec) -> np.ndarray:
    """Project masks (..., S_h, S_w) at working size onto the grid: (..., G, G) float32.

    ``image_hw`` is the original image's (H, W): it decides the model's geometry. ``centre`` gives
    0/1 values, ``area`` covered fractions in [0, 1].
    """
    masks = np.asarray(masks)
    if masks.ndim < 2 or 0 in masks.shape[-2:]:
        raise ValueError(f"project_masks: masks must have shape (..., S, S), got {masks.shape}")
    height, width = _check_hw(image_hw)
    n_y, n_x = masks.shape[-2:]
    if spec.mode == "centre":
        # Gather the sampled pixels; lines that fall on padding read 0.
        iy = _centre_index(n_y, height, width, spec)
        ix = _centre_index(n_x, width, height, spec)
        vy, vx = (iy >= 0) & (iy < n_y), (ix >= 0) & (ix < n_x)
        picked = masks[..., np.clip(iy, 0, n_y - 1)[:, None], np.clip(ix, 0, n_x - 1)[None, :]]
        return picked.astype(np.float32) * (vy[:, None] & vx[None, :])
    # Area: separable weights, one matrix product per axis.
    wy = _area_weights(n_y, height, width, spec).astype(np.float32)
    wx = _area_weights(n_x, width, height, spec).astype(np.float32)
    out = np.einsum("gi,...ij,hj->...gh", wy, masks.astype(np.float32, copy=False), wx, optimize=True)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)  # clip: float rounding only


def _check_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_hw)
    except (TypeError, ValueError):
        raise ValueError(f"image_hw must be (height, width), got {image_hw!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_hw must be positive, got {image_hw!r}")
    return height, width
