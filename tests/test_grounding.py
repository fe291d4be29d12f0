"""Attention grounding: shares against eager attention probabilities, and the pointing game, on the
probe's heads and the run's own heads from one forward pass."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from a3tune.models.capture import LayerCapture
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava
from a3tune.score.grounding import grounding_scores, grounding_table, head_subset
from a3tune.score.score_stage import PROBE_GROUNDING_COLUMNS as COLUMNS

CORPUS = ["is there a lesion in the liver", "yes no", "which organ is bright", "the spleen"]


def _expected(attentions, batch, label: torch.Tensor, gt: torch.Tensor, heads: dict[int, list[int]] | None):
    """Per-sample statistics straight from full (B, H, N, N) attention probabilities, in float64."""
    out = []
    for b in range(len(batch.post_image)):
        rows = batch.post_image[b].nonzero()[:, 0]
        image = batch.image_index[b]
        layers = range(len(attentions)) if heads is None else heads
        blocks = [attentions[layer][b, list(range(attentions[layer].shape[1])) if heads is None else heads[layer]]
                  for layer in layers]  # fmt: skip
        a = torch.cat(blocks).double()[:, rows][:, :, image]  # (h, R, n_img)
        on_image = a.sum(dim=(1, 2))
        sample = {"image_share": float((on_image / len(rows)).mean()), "attention_map": a.sum(1).mean(0) / len(rows)}
        for name, m in (("label", label[b].amax(0)), ("gt", gt[b, 0])):
            inside = (a * m.double()).sum(dim=(1, 2)) / on_image
            sample[f"inside_{name}"] = float(inside.mean()) if m.sum() > 0 else None
        out.append(sample)
    return out


@pytest.fixture(scope="module")
def eager_case():
    lvlm = build_tiny_llava(corpus=CORPUS, image_size=56, text_hidden=32, text_heads=4, kv_heads=2, seed=2,
                            attn_implementation="eager")  # fmt: skip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    batch = encode_batch(lvlm, images, ["is there a lesion in the liver", "which organ is bright", "is there a lesion"],
                         ["yes", "the spleen is bright", "no"])  # fmt: skip
    n_img = lvlm.n_image_tokens
    label = torch.from_numpy(rng.random((3, 2, n_img)) > 0.6).float()
    label[2] = 0  # no weak label for the third sample
    gt = torch.zeros(3, 1, n_img)
    gt[0, 0, :5] = 1.0
    gt[1, 0, 3:9] = 0.7
    with torch.no_grad():
        attentions = lvlm.model(**batch.inputs, output_attentions=True).attentions
    return lvlm, batch, label, gt, attentions


def _check(table: pl.DataFrame, expected: list[dict], gt: torch.Tensor, prefix: str = "") -> None:
    """The ``prefix`` columns of ``table`` against ``_expected``'s statistics."""
    assert table.height == len(expected)
    for row, want in zip(table.iter_rows(named=True), expected, strict=True):
        assert row[prefix + "image_share"] == pytest.approx(want["image_share"], abs=1e-5)
        for name in ("inside_label", "inside_gt"):
            assert (row[prefix + name] is None) == (want[name] is None)
            if want[name] is not None:
                assert row[prefix + name] == pytest.approx(want[name], abs=1e-5)
        np.testing.assert_allclose(row[prefix + "attention_map"], want["attention_map"].numpy(), atol=1e-5)
    # The pointing game, from the eager map's peak: sample 2 has no ground-truth mask.
    want_hits = [bool(gt[b, 0, int(w["attention_map"].argmax())] >= 0.5) for b, w in enumerate(expected[:2])]
    assert table[prefix + "pointing_hit"].to_list() == [*want_hits, None]


@pytest.mark.parametrize("heads", [None, {0: [1, 3], 1: [0]}])
def test_shares_match_eager_attention(eager_case, heads, one_thread):
    lvlm, batch, label, gt, attentions = eager_case
    assert len(attentions) == 2 and attentions[0].shape[1] == 4
    table = grounding_scores(lvlm, batch, {"label": label, "gt": gt}, heads)
    _check(table, _expected(attentions, batch, label, gt, heads), gt)
    # Without own heads (the base model) the own_ columns are every head's
    _check(table, _expected(attentions, batch, label, gt, None), gt, prefix="own_")


def test_probe_and_own_heads_from_one_forward_pass(eager_case, one_thread):
    lvlm, batch, label, gt, attentions = eager_case
    maps = {"label": label, "gt": gt}
    probe, own = {0: [1, 3], 1: [0]}, {0: [0, 1], 1: [2]}  # head 1 of layer 0 is in both
    passes = []
    hook = lvlm.model.register_forward_hook(lambda *_: passes.append(1))
    try:
        table = grounding_scores(lvlm, batch, maps, probe, own)
    finally:
        hook.remove()
    assert len(passes) == 1
    assert table.columns == [*COLUMNS, *(f"own_{c}" for c in COLUMNS)]
    _check(table, _expected(attentions, batch, label, gt, probe), gt)
    _check(table, _expected(attentions, batch, label, gt, own), gt, prefix="own_")
    # Other heads, other numbers: an adapter's own heads are not scored on the probe's
    assert not np.allclose(table["own_image_share"].to_numpy(), table["image_share"].to_numpy(), atol=1e-4)
    # Equal sets (in any order) share one table
    same = grounding_scores(lvlm, batch, maps, probe, {1: [0], 0: [3, 1]})
    assert_frame_equal(same.select(f"own_{c}" for c in COLUMNS).rename(lambda c: c[4:]), same.select(COLUMNS))
    assert_frame_equal(same.select(COLUMNS), table.select(COLUMNS))


def test_own_set_of_an_all_heads_adapter_equals_every_head(eager_case, one_thread):
    lvlm, batch, label, gt, _ = eager_case
    maps = {"label": label, "gt": gt}
    table = grounding_scores(lvlm, batch, maps, {0: [1, 3], 1: [0]}, None)
    every = grounding_scores(lvlm, batch, maps, None)
    assert_frame_equal(table.select(f"own_{c}" for c in COLUMNS).rename(lambda c: c[4:]), every.select(COLUMNS))
    assert not np.allclose(table["image_share"].to_numpy(), every["image_share"].to_numpy(), atol=1e-4)


def test_head_subset_keeps_the_named_columns():
    cap = LayerCapture(heads=torch.tensor([0, 2, 3]), image_share=torch.arange(12.0).reshape(1, 3, 4), inside=None,
                       probabilities=torch.arange(6.0).reshape(1, 3, 1, 2), row_start=3)  # fmt: skip
    subset = head_subset({0: cap, 1: cap}, {0: [3, 0], 1: [1], 5: [0]})
    assert list(subset) == [0]  # layer 1 has none of its heads captured, layer 5 is not in the capture
    assert subset[0].heads.tolist() == [0, 3] and subset[0].image_share[0, :, 0].tolist() == [0.0, 8.0]
    assert subset[0].probabilities[0, :, 0].tolist() == [[0.0, 1.0], [4.0, 5.0]] and subset[0].row_start == 3
    assert head_subset({0: cap}, None)[0] is cap


def test_missing_maps_give_nulls(eager_case, one_thread):
    lvlm, batch, _, _, _ = eager_case
    table = grounding_scores(lvlm, batch, {"label": None}, None)
    assert table["inside_label"].is_null().all() and table["inside_gt"].is_null().all()
    assert table["pointing_hit"].is_null().all() and table["image_share"].is_between(0, 1).all()
    with pytest.raises(ValueError, match="unknown name"):
        grounding_scores(lvlm, batch, {"mask": None}, None)


def _capture_from(attention: torch.Tensor, image: torch.Tensor, maps: torch.Tensor, row_start: int) -> LayerCapture:
    """A LayerCapture computed from given (B, h, N, N) probabilities, image positions and (B, c, n_img) maps."""
    on_image = attention[..., image]  # (B, h, N, n_img)
    return LayerCapture(heads=torch.arange(attention.shape[1]), image_share=on_image.sum(-1),
                        inside=torch.einsum("bhtj,bcj->bhct", on_image, maps), probabilities=on_image[:, :, row_start:],
                        row_start=row_start)  # fmt: skip


def test_pointing_game_on_a_constructed_map():
    n, image, row_start = 8, torch.arange(1, 5), 5  # tokens 1..4 are a 2×2 image, rows 5..7 read it
    attention = torch.zeros(3, 1, n, n)
    attention[..., 0] = 1.0  # rows before the image attend to the first token
    peaks = [2, 3, 1]
    for b, peak in enumerate(peaks):
        attention[b, 0, row_start:, :] = 0.0
        attention[b, 0, row_start:, image] = 0.1
        attention[b, 0, row_start:, 1 + peak] = 0.5
        attention[b, 0, row_start:, 0] = 1.0 - attention[b, 0, row_start:, 1:].sum(-1)
    gt = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    post_image = torch.zeros(3, n, dtype=torch.bool)
    post_image[:, row_start:] = True
    table = grounding_table({0: _capture_from(attention, image, gt[:, None], row_start)}, post_image, {"gt": gt})
    assert table["pointing_hit"].to_list() == [True, False, None]  # peak inside, outside, no mask
    assert table["image_share"].to_list() == pytest.approx([0.8] * 3)
    assert table["inside_gt"].to_list()[:2] == pytest.approx([0.6 / 0.8, 0.1 * 2 / 0.8])
    assert table["inside_label"].is_null().all()
    assert [int(np.argmax(m)) for m in table["attention_map"].to_list()] == peaks
