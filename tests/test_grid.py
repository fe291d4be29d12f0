"""Grid projection: hand-computed cells, the reference's Pillow pipeline, area bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from a3tune.labels.grid import GridSpec, cell_edges, project_masks

S = 256
RNG = np.random.default_rng(0)


def _left(frac: float = 0.5) -> np.ndarray:
    """A working-size mask covering the left ``frac`` of the (squashed) image."""
    mask = np.zeros((S, S), dtype=bool)
    mask[:, : round(S * frac)] = True
    return mask


def _top(frac: float = 0.5) -> np.ndarray:
    return _left(frac).T.copy()


def _cols(values: list[int], g: int = 16) -> np.ndarray:
    """A G×G grid whose columns ``values`` are 1 (every row)."""
    grid = np.zeros((g, g), dtype=np.float32)
    grid[:, values] = 1.0
    return grid


def _project(mask, hw, preprocess, mode="centre", g=16, p=224):
    return project_masks(mask, hw, GridSpec(grid=g, input_size=p, preprocess=preprocess, mode=mode))


# -- Pillow implementations of the pipelines, applied to the squashed mask -------------------------


def _pil_nearest(mask: np.ndarray, size_wh: tuple[int, int]) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255).resize(size_wh, Image.NEAREST)


def _pil_reference(mask: np.ndarray, g: int) -> np.ndarray:
    """The reference (v1 train.py): nearest 256 -> 224, centre crop 224, nearest 224 -> G."""
    image = _pil_nearest(mask, (224, 224)).crop((0, 0, 224, 224))
    return np.asarray(image.resize((g, g), Image.NEAREST)) > 0


def _pil_crop(mask: np.ndarray, hw: tuple[int, int], p: int, g: int) -> np.ndarray:
    """CLIPImageProcessor geometry on the mask: shortest side to P, centre crop, nearest to G."""
    h, w = hw
    nw, nh = (p, p * h // w) if w <= h else (p * w // h, p)
    left, top = (nw - p) // 2, (nh - p) // 2
    image = _pil_nearest(mask, (nw, nh)).crop((left, top, left + p, top + p))
    return np.asarray(image.resize((g, g), Image.NEAREST)) > 0


def _pil_pad(mask: np.ndarray, hw: tuple[int, int], p: int, g: int) -> np.ndarray:
    """expand2square on the mask (sizes chosen so the padding is whole mask pixels), then resize."""
    h, w = hw
    side = max(h, w)
    ph, pw, oy, ox = side * S // h, side * S // w, (side - h) // 2 * S // h, (side - w) // 2 * S // w
    assert (side * S) % h == 0 and (side * S) % w == 0  # whole mask pixels, or Pillow cannot pad
    assert oy * h == (side - h) // 2 * S and ox * w == (side - w) // 2 * S
    canvas = np.zeros((ph, pw), dtype=bool)
    canvas[oy : oy + S, ox : ox + S] = mask
    image = _pil_nearest(canvas, (p, p)).resize((g, g), Image.NEAREST)
    return np.asarray(image) > 0


# -- GridSpec ---------------------------------------------------------------------------------------


def test_spec_from_dict_round_trip_and_unknown_keys():
    spec = GridSpec.from_dict({"grid": 24, "input_size": 336, "preprocess": "pad", "mode": "area"})
    assert GridSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown key.*patch"):
        GridSpec.from_dict({"grid": 24, "patch": 14})


@pytest.mark.parametrize(
    "params, match",
    [({"preprocess": "letterbox"}, "preprocess"), ({"mode": "max"}, "mode"), ({"grid": 0}, "grid"),
     ({"input_size": 224.0}, "input_size"), ({"grid": True}, "grid")],
)  # fmt: skip
def test_spec_rejects_bad_values(params, match):
    with pytest.raises(ValueError, match=match):
        GridSpec.from_dict(params)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        project_masks(np.zeros(5, dtype=bool), (10, 10), GridSpec())
    with pytest.raises(ValueError, match="image_hw"):
        project_masks(np.zeros((S, S), dtype=bool), (0, 10), GridSpec())
    with pytest.raises(ValueError, match="image_hw"):
        project_masks(np.zeros((S, S), dtype=bool), (10,), GridSpec())


# -- the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preprocess", ["squash", "crop", "pad"])
@pytest.mark.parametrize("hw", [(256, 256), (512, 512), (100, 100)])
def test_reference_identity_16(preprocess, hw):
    """Square image, S=256, P=224, G=16: grid[r, c] = mask[16r+8, 16c+8], whatever the preprocess."""
    masks = RNG.random((3, S, S)) < 0.5
    grid = _project(masks, hw, preprocess)
    assert grid.dtype == np.float32 and grid.shape == (3, 16, 16)
    np.testing.assert_array_equal(grid, masks[:, 8::16, 8::16].astype(np.float32))


@pytest.mark.parametrize("g", [16, 24])
def test_reference_agrees_with_pillow(g):
    masks = RNG.random((6, S, S)) < 0.5
    grid = project_masks(masks, (S, S), GridSpec.reference(g))
    for mask, got in zip(masks, grid):
        np.testing.assert_array_equal(got > 0, _pil_reference(mask, g))


def test_reference_24_sampled_lines():
    """Which mask column each of the 24 columns reads, with Pillow as the judge."""
    index = np.tile(np.arange(S, dtype=np.int32), (S, 1))
    image = Image.fromarray(index, mode="I").resize((224, 224), Image.NEAREST).resize((24, 24), Image.NEAREST)
    pil = np.asarray(image)[0]
    ours = []
    for c in range(24):
        onehot = np.zeros((S, S), dtype=bool)
        onehot[:, pil[c]] = True
        ours.append(project_masks(onehot, (S, S), GridSpec.reference(24))[0].argmax())
        assert project_masks(onehot, (S, S), GridSpec.reference(24))[0].sum() == 1
    np.testing.assert_array_equal(ours, np.arange(24))
    assert list(pil[:4]) == [5, 16, 26, 37] and pil[-1] == 250
    assert pil[13] == 143  # Pillow's stepping falls below the exact tie 144


@pytest.mark.parametrize("hw", [(200, 100), (100, 200), (300, 200), (123, 457), (640, 480)])
@pytest.mark.parametrize("g, p", [(16, 224), (24, 336)])
def test_crop_agrees_with_pillow(hw, g, p):
    masks = RNG.random((3, S, S)) < 0.5
    for mask, got in zip(masks, _project(masks, hw, "crop", g=g, p=p)):
        np.testing.assert_array_equal(got > 0, _pil_crop(mask, hw, p, g))


@pytest.mark.parametrize("hw", [(200, 100), (100, 200), (300, 200), (256, 256)])
@pytest.mark.parametrize("g, p", [(16, 224), (24, 336)])
def test_pad_agrees_with_pillow(hw, g, p):
    masks = RNG.random((3, S, S)) < 0.5
    for mask, got in zip(masks, _project(masks, hw, "pad", g=g, p=p)):
        np.testing.assert_array_equal(got > 0, _pil_pad(mask, hw, p, g))


# -- hand-computed cells: a 200×100 (H×W) image, G=16, P=224 ----------------------------------------
#
# squash: cell c reads mask column 16c+8.
# pad: square 200, 50 px of padding left and right -> the image spans input columns [56, 168),
#      i.e. cells 4..11; its left half is [56, 112), cells 4..7.
# crop: width 100 -> 224, height 200 -> 448, crop rows [112, 336) = image rows [50, 150).


@pytest.mark.parametrize("mode", ["centre", "area"])
@pytest.mark.parametrize(
    "preprocess, expected",
    [("squash", _cols(list(range(8)))), ("pad", _cols([4, 5, 6, 7])), ("crop", _cols(list(range(8))))],
)
def test_left_half_of_a_tall_image(preprocess, mode, expected):
    np.testing.assert_array_equal(_project(_left(), (200, 100), preprocess, mode), expected)


@pytest.mark.parametrize("mode", ["centre", "area"])
def test_pad_rows_are_zero(mode):
    """A 100×200 (H×W) image: 50 px of padding above and below -> rows 0..3 and 12..15 are 0."""
    grid = _project(np.ones((S, S), dtype=bool), (100, 200), "pad", mode)
    np.testing.assert_array_equal(grid, _cols(list(range(4, 12))).T)


@pytest.mark.parametrize("mode", ["centre", "area"])
def test_crop_drops_what_the_model_never_sees(mode):
    # The top quarter of the image (rows < 50) is cropped away: nothing of it may appear.
    assert _project(_top(0.25), (200, 100), "crop", mode).sum() == 0
    # The top half (rows < 100) is input rows [0, 112): cells 0..7.
    np.testing.assert_array_equal(_project(_top(0.5), (200, 100), "crop", mode), _cols(list(range(8))).T)
    # Squash keeps the top quarter: rows 0..3 (centre rows 8, 24, 40, 56 < 64).
    np.testing.assert_array_equal(_project(_top(0.25), (200, 100), "squash", mode), _cols([0, 1, 2, 3]).T)


def test_area_fractions_by_hand():
    # squash: mask columns < 100; cell 6 spans columns [96, 112): 4/16 covered; centre reads 104.
    mask = np.zeros((S, S), dtype=bool)
    mask[:, :100] = True
    area = _project(mask, (200, 100), "squash", "area")
    np.testing.assert_allclose(area[0], [1, 1, 1, 1, 1, 1, 0.25] + [0] * 9, atol=1e-6)
    assert _project(mask, (200, 100), "squash", "centre")[0, 6] == 0
    # pad: mask columns < 16 = image x < 6.25 = input [56, 63): cell 4 ([56, 70)) is half covered.
    mask = np.zeros((S, S), dtype=bool)
    mask[:, :16] = True
    area = _project(mask, (200, 100), "pad", "area")
    np.testing.assert_allclose(area[0], [0, 0, 0, 0, 0.5] + [0] * 11, atol=1e-6)
    assert np.all(area == area[0])


def test_area_sums_equal_covered_fraction():
    mask = RNG.random((S, S)) < 0.3
    for g, p in [(16, 224), (24, 336), (7, 100)]:
        # squash: every cell is the same share of the image
        assert _project(mask, (200, 100), "squash", "area", g, p).mean() == pytest.approx(mask.mean(), abs=1e-5)
        # pad: the image is (200·100) / 200² of the square, the rest is uncovered padding
        assert _project(mask, (200, 100), "pad", "area", g, p).mean() == pytest.approx(mask.mean() / 2, abs=1e-5)
        # crop: only image rows [50, 150) = mask rows [64, 192) are seen
        assert _project(mask, (200, 100), "crop", "area", g, p).mean() == pytest.approx(mask[64:192].mean(), abs=1e-5)
    area = _project(mask, (200, 100), "pad", "area", 24, 336)
    assert area.min() >= 0 and area.max() <= 1


def test_leading_axes_and_rectangular_masks():
    masks = RNG.random((2, 3, S, S)) < 0.5
    for mode in ("centre", "area"):
        spec = GridSpec(grid=24, input_size=336, preprocess="crop", mode=mode)
        batched = project_masks(masks, (300, 200), spec)
        assert batched.shape == (2, 3, 24, 24)
        np.testing.assert_array_equal(batched[1, 2], project_masks(masks[1, 2], (300, 200), spec))
    # A mask at another working size gives the same area grid when it is an exact upsampling.
    small = RNG.random((64, 32)) < 0.5
    big = small.repeat(4, axis=0).repeat(8, axis=1)
    spec = GridSpec(grid=16, input_size=224, preprocess="pad", mode="area")
    expected = project_masks(big, (200, 100), spec)
    np.testing.assert_allclose(project_masks(small, (200, 100), spec), expected, atol=1e-6)


def test_cell_edges_follow_the_geometry():
    y, x = cell_edges((200, 100), GridSpec(preprocess="pad"))
    assert (y[0], y[-1], x[0], x[-1]) == (0, 200, -50, 150)
    y, x = cell_edges((200, 100), GridSpec(preprocess="crop"))
    assert (y[0], y[-1], x[0], x[-1]) == (50, 150, 0, 100)
    y, x = cell_edges((200, 100), GridSpec(grid=24, input_size=336, preprocess="squash"))
    assert len(y) == len(x) == 25 and (y[-1], x[-1]) == (200, 100)
