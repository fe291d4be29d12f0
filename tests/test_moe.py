"""A³MoE layers: query gates from the question, key experts on image tokens only, gating modes,
the balance loss, and routing cached at prefill for decode steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava
from a3tune.tune.adapter_config import AdapterConfig, LoraSpec, MoeSpec
from a3tune.tune.adapters import apply_adapters, trainable_state_dict
from a3tune.tune.lora import LoraLinear
from a3tune.tune.moe import MoeKeyLinear, MoeQueryLinear, checkpoint_context, routing

IN, OUT, N = 8, 12, 10
SPAN = torch.tensor([[2, 5], [4, 8]])
IMAGE = torch.tensor([[0, 1], [1, 2]])


def _base(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _randomise_b(module: nn.Module) -> None:
    """B starts at zero; random B makes every expert's delta visible."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)


def test_query_gates_follow_the_question(one_thread):
    layer = MoeQueryLinear(_base(), MoeSpec(query_experts=4, dropout=0.0))
    _randomise_b(layer)
    x = torch.randn(2, N, IN)
    x[1, :4] = x[0, :4]  # same tokens before the second sample's question
    with routing(SPAN, IMAGE) as state:
        out = layer(x)
    gates = state.query_gates[layer]
    assert out.shape == (2, N, OUT) and gates.shape == (2, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))
    assert not torch.allclose(gates[0], gates[1])
    # By hand: softmax(router(mean over the question)), then W x + Σ_e g_e s B_e A_e x on every token.
    mean = torch.stack([x[b, s:e].mean(0) for b, (s, e) in enumerate(SPAN.tolist())])
    expected_gates = torch.softmax(layer.router(mean), -1)
    torch.testing.assert_close(gates, expected_gates)
    delta = torch.einsum("be,eoi,bni->bno", expected_gates, layer.delta_weight(), x)
    torch.testing.assert_close(out, layer.base_layer(x) + delta, atol=1e-5, rtol=1e-5)


def test_query_layer_needs_routing_inputs(one_thread):
    layer = MoeQueryLinear(_base(), MoeSpec(query_experts=2))
    with pytest.raises(RuntimeError, match="routing inputs missing"):
        layer(torch.randn(1, N, IN))


def test_single_query_expert_is_a_lora(one_thread):
    spec = MoeSpec(query_experts=1, rank=4, alpha=8, dropout=0.0)
    layer = MoeQueryLinear(_base(), spec)
    _randomise_b(layer)
    lora = LoraLinear(_base(), rank=4, alpha=8)
    with torch.no_grad():
        lora.lora_A.weight.copy_(layer.experts.lora_A[0])
        lora.lora_B.weight.copy_(layer.experts.lora_B[0])
    x = torch.randn(2, N, IN)
    assert layer.router is None
    torch.testing.assert_close(layer(x), lora(x))  # no routing block needed
    merged = layer.merge()
    torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=1e-5)


def _key_layer(biases: list[float], top_k: int, reference: bool, seed: int = 0) -> MoeKeyLinear:
    """A key layer whose router ignores the token: p = softmax(biases) everywhere."""
    spec = MoeSpec(key_experts=len(biases), key_top_k=top_k, reference_key_gates=reference, dropout=0.0)
    layer = MoeKeyLinear(_base(seed), spec)
    _randomise_b(layer)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor(biases))
    return layer


def _expert_delta(layer: MoeKeyLinear, x: torch.Tensor, expert: int) -> torch.Tensor:
    return x @ layer.delta_weight()[expert].T


def test_key_experts_only_at_image_positions(one_thread):
    layer = _key_layer([0.0, 1.0, 2.0], top_k=1, reference=False)
    x = torch.randn(2, N, IN)
    with routing(SPAN, IMAGE):
        out = layer(x)
    base = layer.base_layer(x)
    image = torch.zeros(2, N, dtype=torch.bool)
    image[torch.arange(2)[:, None], IMAGE] = True
    assert torch.equal(out[~image], base[~image])  # bitwise W x
    assert not torch.allclose(out[image], base[image])


@pytest.mark.parametrize("reference", [False, True])
def test_key_gates_are_straight_through_unless_reference(one_thread, reference):
    """DESIGN §4.4: a chosen expert's output enters with weight 1; the router's gradient is that of
    Σ_chosen p_e·E_e(x). The reference: ungated, only the highest chosen index, no router gradient."""
    biases = [0.0, 1.0, 2.0]
    layer = _key_layer(biases, top_k=2, reference=reference)
    x = torch.randn(2, N, IN)
    with routing(SPAN, IMAGE):
        out = layer(x)
    image_x = x[torch.arange(2)[:, None], IMAGE]
    chosen = [2] if reference else [2, 1]  # top-2 of the biases; the reference keeps the highest index only
    expected = layer.base_layer(image_x) + sum(_expert_delta(layer, image_x, e) for e in chosen)
    torch.testing.assert_close(out[torch.arange(2)[:, None], IMAGE], expected, atol=1e-5, rtol=1e-5)

    out.sum().backward()
    if reference:
        assert layer.router.bias.grad is None or not layer.router.bias.grad.any()
        return
    bias = torch.tensor(biases, requires_grad=True)
    p = torch.softmax(bias, -1)
    sums = torch.stack([_expert_delta(layer, image_x, e).sum() for e in range(3)]).detach()
    (p[1] * sums[1] + p[2] * sums[2]).backward()
    torch.testing.assert_close(layer.router.bias.grad, bias.grad, atol=1e-4, rtol=1e-4)
    assert bias.grad.abs().sum() > 0


def test_balance_loss_and_entropy_by_hand(one_thread):
    # Layer 1: p = (1/4, 3/4), top-1 picks expert 1; layer 2: p = (3/4, 1/4), picks expert 0.
    first = _key_layer([0.0, math.log(3)], top_k=1, reference=False)
    second = _key_layer([math.log(3), 0.0], top_k=1, reference=False, seed=1)
    x = torch.randn(2, N, IN)
    with routing(SPAN, IMAGE) as state:
        first(x)
        second(x)
        loss, entropy = state.balance_loss(), state.entropy()
    # Means over both layers × image tokens: p̄ = (1/2, 1/2), c̄ = (1/2, 1/2) -> 1/2 (per-layer sums would give 3/4).
    torch.testing.assert_close(loss, torch.full((2,), 0.5))
    torch.testing.assert_close(entropy, torch.tensor(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))


def test_balance_loss_needs_key_routing(one_thread):
    with routing(SPAN, IMAGE) as state, pytest.raises(RuntimeError, match="no MoE key layer"):
        state.balance_loss()


def test_checkpoint_recompute_routes_like_the_forward(one_thread):
    layer = _key_layer([0.0, 1.0, 2.0], top_k=1, reference=False)
    x = torch.randn(2, N, IN, requires_grad=True)
    with routing(SPAN, IMAGE):
        out = checkpoint(layer, x, use_reentrant=False, context_fn=checkpoint_context)
        plain = checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()  # the recompute runs after the block: it needs the forward's routing state
    with pytest.raises(RuntimeError, match="routing inputs missing"):
        plain.sum().backward()


CORPUS = ["what organ is shown in the image", "is there a tumour in the left lung", "liver lung yes no"]


@pytest.fixture
def tiny_moe():
    lvlm = build_tiny_llava(corpus=CORPUS, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2)
    apply_adapters(lvlm.model, AdapterConfig(base_model="tiny", lora=LoraSpec(targets=()), moe=MoeSpec(key_top_k=2)))
    with torch.no_grad():
        for name, tensor in trainable_state_dict(lvlm.model).items():
            if "lora_B" in name:
                tensor.normal_(std=1.0)  # large enough that wrong decode gates show (~1e-3)
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    batch = encode_batch(lvlm, images, ["what organ is shown", "is there a tumour in the left lung"], padding_side="left")
    return lvlm, batch


def test_decode_step_reuses_prefill_routing(one_thread, tiny_moe):
    lvlm, batch = tiny_moe
    model, inputs = lvlm.model, batch.inputs
    with torch.no_grad(), routing(batch.question_span, batch.image_index):
        prefill = model(**inputs, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        positions = inputs["position_ids"][:, -1:] + 1
        step = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=prefill.past_key_values)
        full = model(
            input_ids=torch.cat([inputs["input_ids"], token], 1),
            attention_mask=mask,
            position_ids=torch.cat([inputs["position_ids"], positions], 1),
            pixel_values=inputs["pixel_values"],
        )
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-6, rtol=0)


def test_generate_with_beams(one_thread, tiny_moe):
    lvlm, batch = tiny_moe
    with torch.no_grad(), routing(batch.question_span, batch.image_index):
        out = lvlm.model.generate(**batch.inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > batch.inputs["input_ids"].shape[1]
