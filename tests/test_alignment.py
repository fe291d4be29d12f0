"""The attention-alignment loss: hand-computed cases, the reference computation on full attention
tensors (static subsets, all heads, dynamic top-K), zero for unlabelled samples, the clamps, the
dynamic selection, and the tiny LLaVA end to end against eager attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from a3tune.models.capture import LayerCapture, capture_attention, enable_capture
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava
from a3tune.tune.alignment import VARIANTS, alignment_loss, select_dynamic

EPS = 1e-8

# ------------------------------------------------------------------------------------------------
# Hand-computed case: 1 sample, N = 8, image tokens at positions 1-4, post-image rows 5-7,
# 2 layers x 2 heads, 3 label maps of the 4 image tokens (the third empty).

HAND_ROWS = {  # (layer, head) -> image-column probabilities of rows 5, 6, 7
    (0, 0): [[0.2, 0.1, 0.1, 0.0], [0.1, 0.0, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0]],
    (0, 1): [[0.1, 0.0, 0.0, 0.1], [0.0, 0.1, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]],
    (1, 0): [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]],
    (1, 1): [[0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]],
}
# Sum over all four heads: M[5] = [.4, .2, .2, .2], M[6] = [.1, .1, .1, .1], M[7] = [.25, .25, 0, 0].
HAND_MAPS = [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
HAND_ROW_START = 3  # the probability block also holds rows 3-4, which are not post-image rows


def _hand_captures() -> dict[int, LayerCapture]:
    maps = torch.tensor(HAND_MAPS, dtype=torch.float64)
    captured = {}
    for layer in (0, 1):
        p = torch.full((2, 8, 4), 0.2, dtype=torch.float64)  # rows 0-4: 0.8 on the image, must not count
        for head in (0, 1):
            p[head, 5:] = torch.tensor(HAND_ROWS[layer, head], dtype=torch.float64)
        captured[layer] = LayerCapture(
            heads=torch.tensor([0, 1]),
            image_share=p.sum(-1)[None],
            inside=torch.einsum("htj,kj->hkt", p, maps)[None],
            probabilities=p[None, :, HAND_ROW_START:],
            row_start=HAND_ROW_START,
        )
    return captured


def _hand_loss(variant: str, selection=None) -> float:
    post = torch.tensor([[False] * 5 + [True] * 3])
    valid = torch.tensor([[True, True, False]])
    labels = torch.tensor([HAND_MAPS], dtype=torch.float64)
    loss = alignment_loss(_hand_captures(), post, valid, variant=variant, selection=selection, labels=labels, eps=EPS)
    assert loss.shape == (1,)
    return loss.item()


def test_inside_variant_by_hand():
    # a_0 (map [1,1,0,0]) per row: .6/1 = .6, .2/.4 = .5, .5/.5 = 1 -> (1-a)^2 = .16, .25, 0
    # a_1 (map [0,0,1,1]) per row: .4, .5, 0                         -> .36, .25, 1
    # L = (.16 + .25 + 0)/3 + (.36 + .25 + 1)/3 = 2.02/3; the empty third map does not count
    assert _hand_loss("inside") == pytest.approx(0.6733333333333333, rel=1e-12)


def test_kl_variant_by_hand():
    # P per row: [.4,.2,.2,.2], [.25]*4, [.5,.5,0,0]; Q_0 = [.5,.5,0,0], Q_1 = [0,0,.5,.5]
    # KL(Q_0||P): .5 ln(.5/.4) + .5 ln(.5/.2) = .5 ln 3.125 = .5697171, ln 2 = .6931472, 0
    # KL(Q_1||P): ln 2.5 = .9162907, ln 2 = .6931472, and with P = 0 clamped to 1e-8: ln(.5/1e-8) = ln 5e7 = 17.7275336
    # L = 1.2628643/3 + 19.3369715/3 = .4209548 + 6.4456572 = 6.8666120
    assert _hand_loss("kl") == pytest.approx(6.8666120, rel=1e-7)


@pytest.mark.parametrize(
    "variant, expected",
    [
        # layer 0 only: M[5] = [.3,.1,.1,.1], M[6] = [.1,.1,0,0], M[7] = [.25,.25,0,0]
        # inside: a_0 = 2/3, 1, 1 -> 1/9, 0, 0; a_1 = 1/3, 0, 0 -> 4/9, 1, 1; L = (1/9)/3 + (22/9)/3 = 23/27
        ("inside", 0.8518518518518519),
        # kl: Q_0: .5 ln 3 = .5493061, 0, 0; Q_1: ln 3 = 1.0986123, then ln 5e7 = 17.7275336 twice
        # L = .5493061/3 + 36.5536794/3 = .1831020 + 12.1845598 = 12.3676618
        ("kl", 12.3676618),
    ],
)
def test_selection_masks_heads_by_hand(variant, expected):
    selection = {0: torch.tensor([[True, True]]), 1: torch.tensor([[False, False]])}
    assert _hand_loss(variant, selection) == pytest.approx(expected, rel=1e-7)


# ------------------------------------------------------------------------------------------------
# Against the reference computation on full attention tensors

B, L, H, N, N_IMG = 3, 3, 4, 14, 4
IMAGE_START = [2, 3, 2]  # image tokens at IMAGE_START[b] .. + 3
POST_END = [14, 12, 10]  # post-image rows IMAGE_START[b] + 4 .. POST_END[b] (the rest: padding)


def _random_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, H, N, N, generator=gen, dtype=torch.float64) * 3
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, -math.inf).softmax(-1)
    image_index = torch.stack([torch.arange(N_IMG) + s for s in IMAGE_START])
    post = torch.zeros(B, N, dtype=torch.bool)
    for b, (start, end) in enumerate(zip(IMAGE_START, POST_END)):
        post[b, start + N_IMG : end] = True
    labels = (torch.rand(B, 3, N_IMG, generator=gen) > 0.4).double() * torch.rand(B, 3, N_IMG, generator=gen, dtype=torch.float64)
    labels[0, 1] = 0.0  # an empty map
    labels[1, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a map on a single token
    labels[2, 2] = torch.tensor([0.0, 0.5, 1.0, 0.0])
    row_start = int(image_index[:, -1].min()) + 1
    return attention, image_index, post, labels, labels.sum(-1) > 0, row_start


def _captures_from(attention, image_index, labels, heads, row_start) -> dict[int, LayerCapture]:
    """What the capture gives for ``heads`` (layer -> head list; None = all) of attention (B, L, H, N, N)."""
    heads = heads if heads is not None else {layer: list(range(attention.shape[2])) for layer in range(attention.shape[1])}
    captured = {}
    for layer, layer_heads in heads.items():
        index = torch.tensor(layer_heads)
        columns = image_index[:, None, None, :].expand(-1, len(layer_heads), attention.shape[3], -1)
        on_image = attention[:, layer, index].gather(-1, columns)  # (B, h, N, n_img)
        captured[layer] = LayerCapture(
            heads=index,
            image_share=on_image.sum(-1),
            inside=torch.einsum("bhtj,bkj->bhkt", on_image, labels),
            probabilities=on_image[:, :, row_start:],
            row_start=row_start,
        )
    return captured


def _reference_loss(attention, image_index, post, labels, valid, selected, variant) -> torch.Tensor:
    """Sample by sample as the reference: M = Σ_selected A[l, h, R, I]; per real map ℓ_k; summed."""
    losses = []
    for b in range(attention.shape[0]):
        rows = post[b].nonzero()[:, 0]
        m_sum = attention[b][selected[b]][:, rows][:, :, image_index[b]].sum(0)  # (|R|, n_img)
        total = attention.new_zeros(())
        for k in valid[b].nonzero()[:, 0]:
            m = labels[b, k]
            if variant == "inside":
                a = (m_sum @ m) / m_sum.sum(1)
                total = total + ((1 - a) ** 2).mean()
            else:
                p = m_sum / m_sum.sum(1, keepdim=True)
                q = m / m.sum()
                on = q > 0
                total = total + (q[on] * (q[on].log() - p[:, on].clamp_min(EPS).log())).sum(1).mean()
        losses.append(total)
    return torch.stack(losses)


def _reference_top_k(attention, image_index, post, k) -> torch.Tensor:
    """(B, L, H) bool: per sample, the k heads with the largest mean image share over its post-image rows."""
    selected = torch.zeros(attention.shape[:3], dtype=torch.bool)
    for b in range(attention.shape[0]):
        rows = post[b].nonzero()[:, 0]
        ratio = (attention[b][:, :, rows][..., image_index[b]].sum((-1, -2)) / len(rows)).flatten().tolist()
        for c in sorted(range(len(ratio)), key=lambda c: -ratio[c])[:k]:
            selected[b].view(-1)[c] = True
    return selected


STATIC = {0: [1, 3], 2: [2, 0]}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["static", "all", "dynamic"])
def test_equals_reference_on_full_attention(variant, mode):
    attention, image_index, post, labels, valid, row_start = _random_case()
    heads = STATIC if mode == "static" else None
    captured = _captures_from(attention, image_index, labels, heads, row_start)
    selection = None
    if mode == "static":
        selected = torch.zeros(B, L, H, dtype=torch.bool)
        for layer, layer_heads in STATIC.items():
            selected[:, layer, layer_heads] = True
    elif mode == "all":
        selected = torch.ones(B, L, H, dtype=torch.bool)
    else:
        selected = _reference_top_k(attention, image_index, post, k=5)
        selection = select_dynamic(captured, post, k=5)
        assert torch.equal(torch.stack([selection[layer] for layer in range(L)], dim=1), selected)
    ours = alignment_loss(captured, post, valid, variant=variant, selection=selection, labels=labels)
    expected = _reference_loss(attention, image_index, post, labels, valid, selected, variant)
    assert ours.shape == (B,) and (expected > 0).all()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Unlabelled samples, empty rows, clamps, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_unlabelled_sample_is_zero_with_finite_zero_gradients(variant):
    attention, image_index, post, labels, valid, row_start = _random_case()
    attention.requires_grad_(True)
    labels[1] = 0.0
    valid = labels.sum(-1) > 0
    captured = _captures_from(attention, image_index, labels, None, row_start)
    loss = alignment_loss(captured, post, valid, variant=variant, labels=labels)
    assert loss[1].item() == 0.0 and (loss[[0, 2]] > 0).all()
    loss.sum().backward()
    grad = attention.grad
    assert torch.isfinite(grad).all() and (grad[1] == 0).all() and (grad[0] != 0).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_row_without_image_attention_gives_no_nan(variant):
    attention, image_index, post, labels, valid, row_start = _random_case()
    for b, start in enumerate(IMAGE_START):  # the first post-image row of each sample ignores the image
        row = attention[b, :, :, start + N_IMG]
        row[..., image_index[b]] = 0.0
        row /= row.sum(-1, keepdim=True)
    attention.requires_grad_(True)
    captured = _captures_from(attention, image_index, labels, None, row_start)
    loss = alignment_loss(captured, post, valid, variant=variant, labels=labels)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(attention.grad).all()


def test_sample_without_post_image_rows_is_zero():
    attention, image_index, post, labels, valid, row_start = _random_case()
    post[2] = False
    captured = _captures_from(attention, image_index, labels, None, row_start)
    for variant in VARIANTS:
        loss = alignment_loss(captured, post, valid, variant=variant, labels=labels)
        assert loss[2].item() == 0.0 and torch.isfinite(loss).all()


def test_kl_clamps_a_zero_probability_under_the_mask_at_eps():
    # One head, one row with P = [1, 0] on two image tokens, Q = [.5, .5]: KL = .5 ln(.5/1) + .5 ln(.5/eps)
    block = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)  # (B=1, h=1, rows=1, n_img=2)
    cap = LayerCapture(torch.tensor([0]), block.sum(-1), None, block, row_start=0)
    labels = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    for eps in (1e-8, 1e-4):
        loss = alignment_loss({0: cap}, torch.tensor([[True]]), torch.tensor([[True]]), variant="kl", labels=labels, eps=eps)
        assert loss.item() == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / eps), rel=1e-12)


def test_errors_name_what_is_missing():
    attention, image_index, post, labels, valid, row_start = _random_case()
    captured = _captures_from(attention, image_index, labels, None, row_start)
    no_probabilities = {layer: LayerCapture(c.heads, c.image_share, c.inside, None, 0) for layer, c in captured.items()}
    no_inside = {layer: LayerCapture(c.heads, c.image_share, None, c.probabilities, c.row_start) for layer, c in captured.items()}
    with pytest.raises(ValueError, match="probabilities=True"):
        alignment_loss(no_probabilities, post, valid, variant="kl", labels=labels)
    with pytest.raises(ValueError, match="needs the label maps"):
        alignment_loss(captured, post, valid, variant="kl")
    with pytest.raises(ValueError, match="pass labels="):
        alignment_loss(no_inside, post, valid)
    with pytest.raises(ValueError, match="variant must be one of"):
        alignment_loss(captured, post, valid, variant="mse")
    late = {layer: LayerCapture(c.heads, c.image_share, c.inside, c.probabilities[:, :, 1:], row_start + 1)
            for layer, c in captured.items()}  # fmt: skip
    with pytest.raises(ValueError, match="captured from row 7 on, after some post-image rows"):
        alignment_loss(late, post, valid, variant="kl", labels=labels)
    with pytest.raises(ValueError, match="selection covers layers"):
        alignment_loss(captured, post, valid, selection={0: torch.ones(B, H, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------------
# Dynamic selection


def _selection_case() -> tuple[dict[int, LayerCapture], torch.Tensor]:
    """Two samples; layer 0 heads [0, 1], layer 3 heads [2, 0] (capture order is not head order).

    Mean image share over the post-image rows (rows 0-1 carry 1.0 and must be ignored):
    sample 0: (0,0) .2, (0,1) .6, (3,2) .6, (3,0) .6 -> top 2 = (0,1), (3,0): ties go to the lower layer, then head
    sample 1: (0,0) .1, (0,1) .3, (3,2) .9, (3,0) .05 -> top 2 = (3,2), (0,1)
    """
    post = torch.tensor([[False, False, True, True], [False, True, True, True]])

    def share(*per_head):  # per head: the post-image rows' values, after the ignored rows
        return torch.tensor([[1.0] * (4 - len(v)) + v for v in per_head], dtype=torch.float64)

    layer0 = torch.stack([share([0.1, 0.3], [0.6, 0.6]), share([0.1, 0.1, 0.1], [0.2, 0.3, 0.4])])
    layer3 = torch.stack([share([0.6, 0.6], [0.6, 0.6]), share([0.8, 0.9, 1.0], [0.05, 0.05, 0.05])])
    captured = {}
    for layer, heads, values in ((0, [0, 1], layer0), (3, [2, 0], layer3)):
        values.requires_grad_(True)
        inside = torch.stack([values * 0.5, values * 0.25], dim=2)  # (B, h, k=2, N)
        captured[layer] = LayerCapture(torch.tensor(heads), values, inside, None, 0)
    return captured, post


def test_select_dynamic_picks_the_top_k_per_sample():
    captured, post = _selection_case()
    selection = select_dynamic(captured, post, k=2)
    assert selection[0].tolist() == [[False, True], [False, True]]
    assert selection[3].tolist() == [[False, True], [True, False]]  # columns: heads 2, 0
    for k in range(1, 5):
        chosen = select_dynamic(captured, post, k=k)
        assert (chosen[0].sum(1) + chosen[3].sum(1)).tolist() == [k, k]
    assert select_dynamic(captured, post, k=1)[0].tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="k must be"):
        select_dynamic(captured, post, k=5)


def test_select_dynamic_is_not_differentiated():
    captured, post = _selection_case()
    selection = select_dynamic(captured, post, k=2)
    assert not any(s.requires_grad for s in selection.values())
    loss = alignment_loss(captured, post, torch.ones(2, 2, dtype=torch.bool), selection=selection)
    loss.sum().backward()
    for layer, cap in captured.items():
        grad = cap.image_share.grad.abs().sum(-1)  # (B, h)
        assert (grad[~selection[layer]] == 0).all() and (grad[selection[layer]] > 0).all()


# ------------------------------------------------------------------------------------------------
# End to end on the tiny LLaVA

CORPUS = ["is there a lesion in the liver", "yes no", "which organ is bright", "the spleen"]


@pytest.fixture(scope="module")
def tiny_batch():
    lvlm = build_tiny_llava(corpus=CORPUS, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2)
    torch.manual_seed(0)
    for layer in lvlm.model.model.language_model.layers:  # far from uniform attention, so heads rank clearly apart
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.nn.init.normal_(proj.weight, std=0.3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48 + 8 * i, 56, 3), dtype=np.uint8) for i in range(2)]
    batch = encode_batch(lvlm, images, ["is there a lesion in the liver", "which organ is bright"], ["yes", "the spleen"])
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(2, 3, lvlm.n_image_tokens, generator=gen) > 0.6).float()
    labels[0, 2] = 0.0
    labels[1, 1:] = 0.0
    return lvlm, batch, labels


def test_end_to_end_gradients_and_equality_with_eager(one_thread, tiny_batch):
    lvlm, batch, labels = tiny_batch
    assert (batch.inputs["attention_mask"] == 0).any()  # the batch is padded
    valid = labels.sum(-1) > 0
    row_start = int(batch.image_index[:, -1].min()) + 1
    model = lvlm.model
    enable_capture(model)
    model.zero_grad()
    with capture_attention(heads="all", image_index=batch.image_index, labels=labels, probabilities=True,
                           row_start=row_start) as captured:  # fmt: skip
        model(**batch.inputs)
    selection = select_dynamic(captured, batch.post_image, k=3)
    ours = {
        (variant, dynamic): alignment_loss(
            captured, batch.post_image, valid, variant=variant, labels=labels, selection=selection if dynamic else None
        )
        for variant in VARIANTS
        for dynamic in (False, True)
    }
    sum(loss.sum() for loss in ours.values()).backward()
    for proj in ("q_proj", "k_proj"):
        grad = getattr(model.model.language_model.layers[1].self_attn, proj).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any()

    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa", "": "sdpa"})
    with torch.no_grad():
        attention = torch.stack(model(**batch.inputs, output_attentions=True).attentions, dim=1).double()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa", "": "sdpa"})
    everything = torch.ones(attention.shape[:3], dtype=torch.bool)
    top = _reference_top_k(attention, batch.image_index, batch.post_image, k=3)
    assert torch.equal(torch.stack([selection[layer] for layer in sorted(selection)], dim=1), top)
    for (variant, dynamic), loss in ours.items():
        expected = _reference_loss(attention, batch.image_index, batch.post_image, labels.double(), valid,
                                   top if dynamic else everything, variant)  # fmt: skip
        assert (expected > 0).all()
        torch.testing.assert_close(loss.detach().double(), expected, rtol=0, atol=1e-5)
