"""Head-scoped keys on a grouped-query model (9 query heads sharing 3 key/value heads, as SmolLM2-135M).

Static heads select one query head per key/value group: each selected head must get its own adapted
key, the unselected heads of the same group must keep the base key bitwise, key experts must exist
and route, and the adapter must survive the KV cache, save/load and the attention capture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from a3tune.models.capture import capture_attention
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava
from a3tune.tune.adapter_config import AdapterConfig, LoraSpec, MoeSpec
from a3tune.tune.adapters import apply_adapters, load_adapter, save_adapter
from a3tune.tune.alignment import alignment_loss
from a3tune.tune.moe import MoeKeyLinear, routing

CORPUS = ["what organ is shown in the image", "is there a tumour in the left lung", "liver lung yes no"]
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 8
SELECTED = {0: (0, 4, 8), 1: (2, 3, 7)}  # layer 0: one head per group; layer 1: two in group 0, one in group 2
CONFIG = AdapterConfig(base_model="tiny", qk="moe", heads=SELECTED, lora=LoraSpec(rank=4),
                       moe=MoeSpec(query_experts=2, key_experts=4, rank=4))  # fmt: skip


def _tiny():
    return build_tiny_llava(corpus=CORPUS, text_hidden=HEADS * HEAD_DIM, text_layers=2, text_heads=HEADS, kv_heads=KV_HEADS)


def _batch(lvlm):
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    return encode_batch(lvlm, images, ["what organ is shown", "is there a tumour in the left lung"], ["liver", "yes"])


def _randomise_key_experts(model, layer: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k_proj = model.model.language_model.layers[layer].self_attn.k_proj
    with torch.no_grad():
        k_proj.experts.lora_B.copy_(torch.randn(k_proj.experts.lora_B.shape, generator=gen) * 0.5)


def _head_outputs(model, batch, layer: int) -> torch.Tensor:
    """(B, N, H, D): the attention output of every head of ``layer`` (the input of its o_proj)."""
    seen = {}
    o_proj = model.model.language_model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad(), routing(batch.question_span, batch.image_index):
            model(**batch.inputs)
    finally:
        handle.remove()
    return seen["x"].unflatten(-1, (HEADS, HEAD_DIM))


@pytest.fixture(scope="module")
def adapted():
    lvlm = _tiny()
    summary = apply_adapters(lvlm.model, CONFIG)
    return lvlm, summary


@pytest.mark.parametrize("layer", [0, 1])
def test_selected_heads_see_their_key_experts_and_unselected_heads_do_not(one_thread, adapted, layer):
    lvlm, _ = adapted
    batch = _batch(lvlm)
    _randomise_key_experts(lvlm.model, layer, seed=1)
    before = _head_outputs(lvlm.model, batch, layer)
    _randomise_key_experts(lvlm.model, layer, seed=2)  # only this layer's key experts change
    after = _head_outputs(lvlm.model, batch, layer)
    post_image = batch.post_image
    for head in range(HEADS):
        if head in SELECTED[layer]:
            change = (after[:, :, head] - before[:, :, head]).abs().sum(-1)[post_image]
            assert change.min() > 1e-6, f"layer {layer} head {head}: some post-image row did not change"
        else:
            assert torch.equal(after[:, :, head], before[:, :, head]), f"layer {layer} head {head} changed"


def test_every_adapted_layer_has_key_experts_that_route_and_balance(one_thread, adapted):
    lvlm, summary = adapted
    assert (summary["q_heads_adapted"], summary["k_heads_adapted"]) == (6, 6)
    assert {layer: counts["key_experts"] for layer, counts in summary["per_layer"].items()} == {"0": 4, "1": 4}
    model, batch = lvlm.model, _batch(lvlm)
    keys = [m for m in model.modules() if isinstance(m, MoeKeyLinear)]
    assert [m.key_scope.heads for m in keys] == [SELECTED[0], SELECTED[1]]
    with routing(batch.question_span, batch.image_index) as routed:
        out = model(**batch.inputs, labels=batch.labels)
        balance = routed.balance_loss().mean()
        entropy = routed.entropy()
    assert set(routed.key_routing) == set(keys) and torch.isfinite(balance) and torch.isfinite(entropy)
    (out.loss + balance).backward()
    for module in keys:
        assert module.router.weight.grad is not None and module.router.weight.grad.abs().sum() > 0
        assert module.experts.lora_A.grad is not None
    model.zero_grad(set_to_none=True)


def test_generation_with_scoped_keys_matches_full_forwards(one_thread, adapted):
    """The KV cache holds the extra key heads: a cached greedy decode scores like uncached forwards."""
    lvlm, _ = adapted
    for layer in (0, 1):
        _randomise_key_experts(lvlm.model, layer, seed=3 + layer)
    prompt = encode_batch(lvlm, [np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)],
                          ["what organ is shown"])  # fmt: skip
    with torch.no_grad(), routing(prompt.question_span, prompt.image_index):
        generated = lvlm.model.generate(**prompt.inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True)  # fmt: skip
    sequences = generated.sequences
    n_prompt = prompt.inputs["input_ids"].shape[1]
    for step, scores in enumerate(generated.scores):
        length = n_prompt + step
        ids = sequences[:, :length]  # one unpadded sample: default positions
        inputs = {"pixel_values": prompt.inputs["pixel_values"], "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad(), routing(prompt.question_span, prompt.image_index):
            logits = lvlm.model(**inputs, use_cache=False).logits[:, -1]
        torch.testing.assert_close(scores, logits, atol=1e-4, rtol=1e-4)


def test_save_load_and_capture_on_scoped_keys(one_thread, adapted, tmp_path):
    lvlm, _ = adapted
    batch = _batch(lvlm)
    save_adapter(lvlm.model, CONFIG, tmp_path / "adapter")
    fresh = _tiny()
    load_adapter(fresh.model, tmp_path / "adapter")
    results = []
    for model in (lvlm.model, fresh.model):
        labels = torch.rand(2, 2, batch.image_index.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), routing(batch.question_span, batch.image_index), capture_attention(
            heads=SELECTED, image_index=batch.image_index, labels=labels, row_start=int(batch.image_index[:, -1].min()) + 1
        ) as captured:
            logits = model(**batch.inputs).logits
        loss = alignment_loss(captured, batch.post_image, torch.ones(2, 2, dtype=torch.bool))
        results.append((logits, loss))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.isfinite(results[0][1]).all() and (results[0][1] > 0).all()
