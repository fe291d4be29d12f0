"""PAI and VCD: the attention amplification, the contrast formulas against hand-made forwards, generation."""

from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest
import torch

from a3tune.models.lvlm import build_tiny_llava
from a3tune.score.baselines import (
    amplification,
    diffusion_noise,
    image_free_inputs,
    pai_attention_forward,
    pai_processor,
    vcd_processor,
)
from a3tune.score.generation import DecodeSettings, generate_answers, prompt_batch

CORPUS = ["is there a lesion in the liver", "yes no", "which organ is bright", "the spleen"]
QUESTIONS = ["is there a lesion in the liver", "which organ is bright"]
GREEDY = DecodeSettings(num_beams=1, max_new_tokens=4)


@pytest.fixture(scope="module")
def case():
    lvlm = build_tiny_llava(corpus=CORPUS, image_size=56, text_hidden=32, text_layers=3, text_heads=4, kv_heads=2, seed=4)
    with torch.no_grad():
        lvlm.model.lm_head.weight.mul_(30.0)  # peaked next-token distributions, so the plausibility cutoff bites
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8) for i in range(2)]
    return lvlm, images, prompt_batch(lvlm, images, QUESTIONS)


def _last_logits(lvlm, inputs: dict, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits of a full forward (no cache) of left-padded ``inputs`` followed by ``tokens``."""
    inputs = dict(inputs)
    if tokens is not None:
        last = inputs["position_ids"][:, -1:]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
        inputs["position_ids"] = torch.cat([inputs["position_ids"], last + torch.arange(1, tokens.shape[1] + 1)], dim=1)
    with torch.no_grad():
        return lvlm.model(**inputs).logits[:, -1].float()


# ------------------------------------------------------------------------------------------------
# PAI


def test_amplification_scales_the_last_rows_image_attention(one_thread):
    """One attention call with one-hot values: the output rows are the probabilities themselves."""
    n, heads, image = 6, 2, torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    query, key = torch.randn(1, heads, n, 4), torch.randn(1, 1, n, 4)
    value = torch.eye(n).expand(1, 1, n, n)
    module = types.SimpleNamespace(layer_idx=1, num_key_value_groups=heads, is_causal=True)
    probs = {}
    for alpha in (0.0, 0.5):
        with amplification(image, alpha=alpha, layers_from=1):
            probs[alpha] = pai_attention_forward(module, query, key, value, None)[0].transpose(1, 2)  # (1, H, n, n)
    logits = (query @ key.transpose(-1, -2)) / 2.0  # head_dim 4
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    plain = logits.masked_fill(~causal, -math.inf).softmax(-1)
    torch.testing.assert_close(probs[0.0], plain)
    torch.testing.assert_close(probs[0.5][:, :, :-1], plain[:, :, :-1])  # only the last query row changes
    # Last row: p'_j ∝ p_j·exp(α|z_j|) on the image columns, p_j elsewhere.
    boost = torch.ones(heads, n)
    boost[:, image[0]] = torch.exp(0.5 * logits[0, :, -1, image[0]].abs())
    expected = plain[0, :, -1] * boost
    torch.testing.assert_close(probs[0.5][0, :, -1], expected / expected.sum(-1, keepdim=True))
    assert bool((probs[0.5][0, :, -1, image[0]].sum(-1) > plain[0, :, -1, image[0]].sum(-1)).all())
    # A layer below layers_from is plain attention.
    with amplification(image, alpha=0.5, layers_from=2):
        torch.testing.assert_close(pai_attention_forward(module, query, key, value, None)[0].transpose(1, 2), plain)


def test_pai_neutral_settings_leave_the_logits_and_answers(case, one_thread):
    lvlm, images, batch = case
    plain = _last_logits(lvlm, batch.inputs)
    processor = pai_processor(lvlm, batch, alpha=0.0, gamma=1.0, layers_from=0)
    with processor:
        amplified = _last_logits(lvlm, batch.inputs)  # eager softmax in every layer, nothing amplified
    torch.testing.assert_close(amplified, plain, atol=1e-5, rtol=1e-5)
    assert processor(batch.inputs["input_ids"], plain) is plain
    with pai_processor(lvlm, batch, alpha=5.0, layers_from=1):
        assert (_last_logits(lvlm, batch.inputs) - plain).abs().max() > 1e-3  # the random model's logits are small
    assert lvlm.model.config.get_text_config()._attn_implementation == "sdpa"  # restored
    neutral = functools.partial(pai_processor, lvlm, alpha=0.0, gamma=1.0, layers_from=0)
    assert generate_answers(lvlm, images, QUESTIONS, GREEDY, logits_processors=[neutral]) == \
        generate_answers(lvlm, images, QUESTIONS, GREEDY)  # fmt: skip


def test_pai_guidance_against_the_image_free_prompt(case, one_thread):
    lvlm, _, batch = case
    gamma = 1.1
    free = image_free_inputs(lvlm, batch)
    assert not bool((free["input_ids"] == lvlm.image_token_id).any())
    assert free["attention_mask"].sum(1).tolist() == (batch.inputs["attention_mask"].sum(1) - lvlm.n_image_tokens).tolist()
    processor = pai_processor(lvlm, batch, gamma=gamma)
    ids = batch.inputs["input_ids"]
    scores = torch.randn(2, lvlm.model.config.text_config.vocab_size)
    for step in range(3):  # the prefill, then two decode steps through the contrast pass's cache
        generated = ids[:, batch.inputs["input_ids"].shape[1] :]
        image_free = _last_logits(lvlm, free, generated if step else None)
        expected = gamma * scores.log_softmax(-1) - (gamma - 1) * image_free.log_softmax(-1)
        torch.testing.assert_close(processor(ids, scores), expected, atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, torch.tensor([[5 + step], [7]])], dim=1)
    with pytest.raises(ValueError, match="num_beams=1"):
        pai_processor(lvlm, batch)(ids.repeat_interleave(2, 0)[:, : batch.inputs["input_ids"].shape[1]], scores.repeat(2, 1))


def test_pai_generates(case, one_thread):
    lvlm, images, _ = case
    answers = generate_answers(lvlm, images, QUESTIONS, GREEDY, logits_processors=[functools.partial(pai_processor, lvlm)])
    assert len(answers) == 2 and lvlm.model.config.get_text_config()._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------
# VCD


def _vcd_alpha_bar(t: int) -> float:
    """VCD's add_diffusion_noise, from its published constants: 1000 steps, betas = sigmoid(linspace(-6, 6, 1000))
    * (0.5e-2 - 1e-5) + 1e-5, alphas_prod = cumprod(1 - betas), and step t uses alphas_prod[t] (through t)."""
    product = 1.0
    for s in range(t + 1):
        x = -6 + 12 * s / 999
        product *= 1 - (1 / (1 + math.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5)
    return product


def test_diffusion_noise_is_vcds():
    x = torch.randn(2, 3, 8, 8)
    noised = diffusion_noise(x, 500, seed=3)
    torch.testing.assert_close(noised, diffusion_noise(x, 500, seed=3))
    assert not torch.allclose(noised, diffusion_noise(x, 500, seed=4))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0, 1, 500, 999):
        a = _vcd_alpha_bar(t)
        expected = (math.sqrt(a) * x.double() + math.sqrt(1 - a) * noise).float()
        torch.testing.assert_close(diffusion_noise(x, t, seed=3), expected)
    # step 0 already adds one step of noise (beta_0 = sigmoid(-6)·4.99e-3 + 1e-5 ≈ 2.234e-5); VCD's default step
    # 500 leaves alpha_bar ≈ 0.745 (the product over steps before 500 only would miss beta_500)
    assert _vcd_alpha_bar(0) == pytest.approx(1 - 2.2338e-5, abs=1e-9)
    assert _vcd_alpha_bar(500) == pytest.approx(0.7448, abs=1e-4)
    with pytest.raises(ValueError, match="noise_step"):
        diffusion_noise(x, 1000)


def test_vcd_contrast_with_the_noised_image(case, one_thread):
    lvlm, _, batch = case
    alpha, beta = 1.0, 0.1
    processor = vcd_processor(lvlm, batch, alpha=alpha, beta=beta, noise_step=500, seed=0)
    noised_inputs = {**batch.inputs, "pixel_values": diffusion_noise(batch.inputs["pixel_values"], 500, seed=0)}
    ids = batch.inputs["input_ids"]
    for step in range(3):
        generated = ids[:, batch.inputs["input_ids"].shape[1] :] if step else None
        clean, noised = _last_logits(lvlm, batch.inputs, generated), _last_logits(lvlm, noised_inputs, generated)
        probs = clean.softmax(-1)
        plausible = probs >= beta * probs.max(-1, keepdim=True).values
        expected = torch.where(plausible, (1 + alpha) * clean - alpha * noised, -math.inf)
        torch.testing.assert_close(processor(ids, clean), expected, atol=1e-5, rtol=1e-5)
        assert 1 <= int(plausible.sum(-1).min()) and int(plausible.sum(-1).max()) < probs.shape[-1]
        ids = torch.cat([ids, torch.tensor([[10 + step], [9]])], dim=1)


def test_vcd_without_noise_or_contrast_is_plain_greedy(case, one_thread):
    lvlm, images, _ = case
    plain = generate_answers(lvlm, images, QUESTIONS, GREEDY)
    # α = 0: (1+α)·l(v) − α·l(v') = l(v) on the plausible tokens, which hold the argmax.
    same = functools.partial(vcd_processor, lvlm, alpha=0.0)
    assert generate_answers(lvlm, images, QUESTIONS, GREEDY, logits_processors=[same]) == plain
    sampled = generate_answers(lvlm, images, QUESTIONS, DecodeSettings(num_beams=1, max_new_tokens=4, do_sample=True),
                               logits_processors=[functools.partial(vcd_processor, lvlm)])  # fmt: skip
    assert len(sampled) == 2
