"""Attention capture: the indicator-channel SDPA call equals what eager probabilities give."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers  # lazy: its model classes are reached after a3tune.models.capture made them importable
from torch.nn.attention import SDPBackend

from a3tune.models import capture as capture_module
from a3tune.models.capture import (
    CAPTURE_ATTENTION,
    LayerCapture,
    capture_attention,
    capture_implementation,
    checkpoint_context,
    enable_capture,
)

IMAGE_TOKEN = 63
GRID = 4  # 32-px image, 8-px patches
N_IMG = GRID * GRID
PREFIX, SUFFIX = 3, 6
HEADS = 4
LAYERS = 2
TOL = 1e-5


def _text_config(kv_heads: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def _sharpen(layers: torch.nn.ModuleList) -> None:
    """Larger Q/K weights than the 0.02 init, so attention is far from uniform and errors would show."""
    for layer in layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.weight, std=0.3)
        torch.nn.init.normal_(layer.self_attn.k_proj.weight, std=0.3)


def _llava(kv_heads: int) -> transformers.LlavaForConditionalGeneration:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = _text_config(kv_heads)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    _sharpen(model.model.language_model.layers)
    return model


@pytest.fixture(scope="module", params=[HEADS, 2], ids=["mha", "gqa"])
def llava(request) -> transformers.LlavaForConditionalGeneration:
    return _llava(request.param)


def _batch(padding: str) -> dict[str, torch.Tensor]:
    """Two samples [prefix, image block, suffix]; the second has 3 fewer suffix tokens, padded on ``padding``."""
    gen = torch.Generator().manual_seed(1)
    rows, masks, image_index = [], [], []
    length = PREFIX + N_IMG + SUFFIX
    for suffix in (SUFFIX, SUFFIX - 3):
        text = torch.randint(1, IMAGE_TOKEN, (PREFIX + suffix,), generator=gen)
        ids = torch.cat([text[:PREFIX], torch.full((N_IMG,), IMAGE_TOKEN), text[PREFIX:]])
        pad = length - len(ids)
        zeros, ones = torch.zeros(pad, dtype=torch.long), torch.ones(len(ids), dtype=torch.long)
        left = padding == "left"
        rows.append(torch.cat([zeros, ids] if left else [ids, zeros]))
        masks.append(torch.cat([zeros, ones] if left else [ones, zeros]))
        image_index.append(torch.arange(N_IMG) + PREFIX + (pad if left else 0))
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.stack(masks),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=gen),
        "image_index": torch.stack(image_index),
        "labels": (torch.rand(2, 3, N_IMG, generator=gen) > 0.5).float() * torch.rand(2, 3, N_IMG, generator=gen),
    }


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: batch[name] for name in ("input_ids", "attention_mask", "pixel_values")}


def _row_start(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["image_index"][:, -1].min()) + 1


def _eager_attentions(model, batch) -> tuple[torch.Tensor, ...]:
    model.set_attn_implementation("eager")
    return model(**_inputs(batch), output_attentions=True).attentions


def _from_probabilities(attention: torch.Tensor, heads: torch.Tensor, batch, row_start: int):
    """(image share, inside, probability block) from eager (B, H, N, N) probabilities."""
    columns = batch["image_index"][:, None, None, :].expand(-1, attention.shape[1], attention.shape[2], -1)
    on_image = attention.gather(-1, columns)[:, heads]  # (B, h, N, n_img)
    inside = torch.einsum("bhtj,bkj->bhkt", on_image, batch["labels"])
    return on_image.sum(-1), inside, on_image[:, :, row_start:]


def _captured(model, batch, heads, probabilities: bool = True) -> dict[int, LayerCapture]:
    enable_capture(model)
    with capture_attention(
        heads=heads,
        image_index=batch["image_index"],
        labels=batch["labels"],
        probabilities=probabilities,
        row_start=_row_start(batch),
    ) as captured:
        model(**_inputs(batch))
    return captured


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("heads", ["all", {0: [2], 1: [3, 0]}], ids=["all", "subset"])
def test_capture_equals_eager(one_thread, llava, padding, heads):
    batch = _batch(padding)
    row_start = _row_start(batch)
    valid = batch["attention_mask"].bool()[:, None, :].clone()  # (B, 1, N) query rows that are real tokens
    valid[..., :row_start] = False  # the capture computes the rows from row_start on
    with torch.no_grad():
        captured = _captured(llava, batch, heads)
        attentions = _eager_attentions(llava, batch)
    expected_layers = range(LAYERS) if heads == "all" else heads.keys()
    assert sorted(captured) == sorted(expected_layers)
    for layer, capture in captured.items():
        expected_heads = list(range(HEADS)) if heads == "all" else heads[layer]
        assert capture.heads.tolist() == expected_heads
        share, inside, block = _from_probabilities(attentions[layer], capture.heads, batch, row_start)
        assert capture.image_share.shape == (2, len(expected_heads), valid.shape[-1])
        assert capture.inside.shape == (2, len(expected_heads), 3, valid.shape[-1])
        assert capture.probabilities.shape == block.shape and capture.row_start == row_start
        assert (capture.image_share - share).abs()[valid.expand_as(share)].max() <= TOL
        assert (capture.inside - inside).abs()[valid[:, :, None].expand_as(inside)].max() <= TOL
        block_valid = valid[:, :, row_start:, None].expand_as(block)
        assert (capture.probabilities - block).abs()[block_valid].max() <= TOL
        assert not capture.image_share[..., :row_start].any() and not capture.inside[..., :row_start].any()


FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_a_fused_kernel_accepts_the_capture_call(one_thread, llava, monkeypatch, padding):
    """DESIGN §4.2: with the post-image rows only, an explicit boolean mask and value channels padded
    to the head dim, a fused SDPA backend takes the call (torch raises if none of them does)."""
    batch = _batch("right" if padding == "none" else padding)
    if padding == "none":  # one unpadded sample: the layer has no mask, the capture writes the causal one
        batch = {name: value[:1] for name, value in batch.items()}
    with torch.no_grad():
        default = _captured(llava, batch, "all")
        monkeypatch.setattr(capture_module, "CAPTURE_SDPA_BACKENDS", FUSED)
        fused = _captured(llava, batch, "all")
    for layer, cap in default.items():
        torch.testing.assert_close(fused[layer].image_share, cap.image_share, rtol=0, atol=1e-6)
        torch.testing.assert_close(fused[layer].inside, cap.inside, rtol=0, atol=1e-6)


def test_bf16_statistics_are_close_to_fp32(one_thread):
    """The capture runs in the model's dtype: in bf16 (float32 accumulation, bf16 output) the
    inside-mass loss of random post-image rows stays within 1 % of the float32 computation."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, length, rows, head_dim, n_img = 2, 4, 300, 60, 64, 144
    q = torch.randn(batch, heads, rows, head_dim, generator=gen)
    k = torch.randn(batch, heads, length, head_dim, generator=gen)
    image_index = (torch.arange(n_img) + 20).expand(batch, -1)
    labels = (torch.rand(batch, 3, n_img, generator=gen) > 0.6).float()
    channels = capture_module._indicator_values(image_index, labels, length)
    mask = capture_module._row_mask(None, length - rows, length, True, q.device)
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        sums = capture_module._indicator_attention(q.to(dtype), k.to(dtype), channels, mask, head_dim**-0.5)
        losses.append(((1 - sums[..., 1:] / sums[..., :1].clamp_min(1e-8)) ** 2).mean())
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2, losses


def test_logits_equal_sdpa(one_thread, llava):
    batch = _batch("left")
    with torch.no_grad():
        llava.set_attn_implementation("sdpa")
        reference = llava(**_inputs(batch)).logits
        enable_capture(llava)
        outside = llava(**_inputs(batch)).logits
        with capture_attention(heads="all", image_index=batch["image_index"], labels=batch["labels"]) as captured:
            inside = llava(**_inputs(batch)).logits
    assert captured and llava.config.text_config._attn_implementation == CAPTURE_ATTENTION
    assert llava.config.vision_config._attn_implementation == "sdpa"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(outside[valid], reference[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(inside[valid], reference[valid], rtol=0, atol=1e-6)


def _alignment_loss(share: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inside-mass loss over the valid rows (share, inside: (B, h, N) and (B, h, k, N); valid: (B, N))."""
    ratio = inside / share[:, :, None].clamp_min(1e-8)
    return ((1 - ratio) ** 2).transpose(1, 3)[valid].mean()


def _kl_loss(block: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(label ‖ attention renormalised over the image) for block (B, h, R, n_img) of valid rows (B, R)."""
    attention = block / block.sum(-1, keepdim=True)
    target = labels / labels.sum(-1, keepdim=True)  # (B, k, n_img)
    target = target[:, None, :, None]  # (B, 1, k, 1, n_img)
    kl = target * (target.clamp_min(1e-12).log() - attention[:, :, None].clamp_min(1e-12).log())
    return kl.sum(-1).permute(0, 3, 1, 2)[valid].mean()


def _qk_grads(model) -> list[torch.Tensor]:
    layers = model.model.language_model.layers
    return [p.grad.clone() for layer in layers for p in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_gradients_equal_eager(one_thread, llava, padding):
    """Inside-mass and KL losses from the capture backprop to Q/K exactly as from eager probabilities."""
    batch = _batch(padding)
    heads = {0: [1, 3], 1: [0]}
    valid = batch["attention_mask"].bool()
    row_start = _row_start(batch)
    valid[:, :row_start] = False  # post-image rows, as the loss uses them

    llava.zero_grad()
    captured = _captured(llava, batch, heads)
    kl_rows = valid[:, row_start:]
    loss = sum(
        _alignment_loss(c.image_share, c.inside, valid) + _kl_loss(c.probabilities, batch["labels"], kl_rows)
        for c in captured.values()
    )
    loss.backward()
    ours = _qk_grads(llava)

    llava.zero_grad()
    attentions = _eager_attentions(llava, batch)
    reference = 0
    for layer, layer_heads in heads.items():
        share, inside, block = _from_probabilities(attentions[layer], torch.tensor(layer_heads), batch, row_start)
        reference = reference + _alignment_loss(share, inside, valid)
        reference = reference + _kl_loss(block, batch["labels"], kl_rows)
    reference.backward()
    assert any(g.abs().sum() > 0 for g in ours)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-7)
    for got, want in zip(ours, _qk_grads(llava), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_recompute_captures_like_its_forward(one_thread):
    """Backward after the block, on another thread (as CUDA's autograd workers do): same gradients."""
    model = _llava(2)
    batch = _batch("right")
    heads = {0: [1, 3], 1: [0]}
    valid = batch["attention_mask"].bool()

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        captured = _captured(model, batch, heads, probabilities=False)
        loss = sum(_alignment_loss(c.image_share, c.inside, valid) for c in captured.values())
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
        return loss, _qk_grads(model)

    reference, reference_grads = loss_and_grads()
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": checkpoint_context})
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_nothing_captured_outside_a_block_and_no_nesting(one_thread):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(_text_config(2), attn_implementation=CAPTURE_ATTENTION).eval()
    enable_capture(model)  # a plain causal LM: no sub-configs
    ids = torch.randint(1, 60, (1, 12))
    image_index = torch.arange(2, 6)[None]
    with torch.no_grad():
        with capture_attention(heads={1: [0]}, image_index=image_index) as captured:
            model(ids)
            with pytest.raises(RuntimeError, match="nested"):
                with capture_attention(heads="all", image_index=image_index):
                    pass
        assert list(captured) == [1] and captured[1].inside is None and captured[1].probabilities is None
        first = captured[1].image_share
        model(ids)  # outside: plain SDPA, the finished block's dict is untouched
        assert captured[1].image_share is first and list(captured) == [1]

        # A thread starts with an empty context: its forward captures nothing into this block.
        with capture_attention(heads="all", image_index=image_index) as captured:
            thread = threading.Thread(target=model, args=(ids,))
            thread.start()
            thread.join()
        assert captured == {}


def test_capture_implementation_and_argument_errors(one_thread):
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = _text_config(HEADS)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    implementation = capture_implementation()
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation=implementation)
    assert model.config.text_config._attn_implementation == CAPTURE_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"

    image_index = torch.arange(4)[None]
    with pytest.raises(ValueError, match="heads must be"):
        with capture_attention(heads="some", image_index=image_index):
            pass
    with pytest.raises(ValueError, match="labels must be"):
        with capture_attention(heads="all", image_index=image_index, labels=torch.ones(1, 2, 5)):
            pass
    with pytest.raises(ValueError, match="image_index must be"):
        with capture_attention(heads="all", image_index=image_index.float()):
            pass
    lm = transformers.LlamaForCausalLM._from_config(_text_config(HEADS), attn_implementation=CAPTURE_ATTENTION)
    with pytest.raises(ValueError, match="has 4 heads"), capture_attention(heads={0: [4]}, image_index=image_index):
        lm(torch.randint(1, 60, (1, 8)))
