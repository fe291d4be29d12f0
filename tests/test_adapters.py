"""Adapters on the tiny LLaVA: config round trip, what trains, static-head row masks, save/load, merge."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava, load_lvlm
from a3tune.tune.adapter_config import AdapterConfig, LoraSpec, MoeSpec
from a3tune.tune.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapters,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_state_dict,
)
from a3tune.tune.lora import LoraLinear
from a3tune.tune.moe import MoeQueryLinear, routing

CORPUS = ["what organ is shown in the image", "is there a tumour in the left lung", "liver lung yes no"]
HEAD_DIM = 8  # text_hidden 32 / 4 heads


def _tiny():
    return build_tiny_llava(corpus=CORPUS, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2)


def _batch(lvlm):
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    return encode_batch(lvlm, images, ["what organ is shown", "is there a tumour in the left lung"], ["liver", "yes"])


def _loss(model, batch) -> torch.Tensor:
    with routing(batch.question_span, batch.image_index):
        return model(**batch.inputs, labels=batch.labels).loss


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad(), routing(batch.question_span, batch.image_index):
        return model(**batch.inputs).logits


def _randomise_b(model) -> None:
    with torch.no_grad():
        for name, tensor in trainable_state_dict(model).items():
            if "lora_B" in name:
                tensor.normal_(std=0.5)


def test_config_json_round_trip():
    config = AdapterConfig(
        base_model="tiny:0",
        qk="lora",
        lora=LoraSpec(rank=8, alpha=4, targets=("v_proj",)),
        moe=MoeSpec(query_experts=1, key_experts=4, key_top_k=2, reference_key_gates=True),
        heads={1: (2, 0), 0: (3,)},
        extra={"loss": "kl", "lambda": 0.03},
    )
    assert config.heads == {0: (3,), 1: (0, 2)}  # normalised
    assert AdapterConfig.from_json(config.to_json()) == config
    assert AdapterConfig.from_json(AdapterConfig(base_model="x").to_json()) == AdapterConfig(base_model="x")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(qk_mode="moe"), r"unknown keys: \['qk_mode'\]"),
        (lambda r: r["moe"].update(experts=3), r"unknown keys: \['moe.experts'\]"),
        (lambda r: r.pop("base_model"), "no base_model"),
        (lambda r: r.update(qk="dense"), "qk must be one of"),
        (lambda r: r["lora"].update(rank=0), "lora.rank must be a positive integer"),
        (lambda r: r["moe"].update(key_top_k=17), r"moe.key_top_k \(17\) must not exceed moe.key_experts \(16\)"),
        (lambda r: r["moe"].update(dropout=1.0), "moe.dropout must be a probability"),
        (lambda r: r["lora"].update(targets=["q_proj", "v_proj"]), r"must not name \['q_proj'\]"),
        (lambda r: r.update(heads={"0": []}), r"heads\[0\] must be a non-empty list"),
        (lambda r: r.update(heads={"a": [1]}), "layer key 'a' is not an integer"),
    ],
)
def test_config_refuses_bad_json(change, message):
    record = dataclasses.asdict(AdapterConfig(base_model="tiny"))
    change(record)
    with pytest.raises(ValueError, match=message):
        AdapterConfig.from_json(json.dumps(record))


def test_only_adapters_train(one_thread):
    lvlm = _tiny()
    model, batch = lvlm.model, _batch(lvlm)
    summary = apply_adapters(model, AdapterConfig(base_model="tiny"))
    adapter = set(trainable_state_dict(model))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapter
    assert summary["trainable_parameters"] == sum(t.numel() for t in trainable_state_dict(model).values())
    assert not any("base_layer" in name or "vision" in name or "lm_head" in name for name in adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(model, batch).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[name] is None for name in grads if name not in adapter)
    # B starts at zero, so at step 0 only B (of every plain LoRA and every dense query expert) has a gradient.
    for name in adapter:
        if name.endswith("lora_B.weight") or (".q_proj." in name and name.endswith("lora_B")):
            assert grads[name].abs().amax(dim=(-2, -1)).gt(0).all(), name
    optimizer.step()
    optimizer.zero_grad()
    _loss(model, batch).backward()
    for name, p in model.named_parameters():
        if name in adapter and ("lora_A" in name or "router" in name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _q_k(layer) -> tuple[nn.Module, nn.Module]:
    return layer.self_attn.q_proj, layer.self_attn.k_proj


def _effective(module: nn.Module) -> torch.Tensor:
    """(E, out, in) base + delta of every expert (E = 1 for LoRA)."""
    delta = module.delta_weight()
    return module.base_layer.weight + (delta if delta.ndim == 3 else delta[None])


@pytest.mark.parametrize("qk", ["moe", "lora"])
def test_static_heads_leave_unselected_rows_alone(one_thread, qk):
    lvlm = _tiny()  # 4 query heads, 2 key/value heads
    model, batch = lvlm.model, _batch(lvlm)
    base = {name: t.clone() for name, t in model.state_dict().items()}
    summary = apply_adapters(model, AdapterConfig(base_model="tiny", qk=qk, heads={0: (1,), 1: (0, 1)}))
    assert (summary["q_heads_adapted"], summary["k_heads_adapted"], summary["heads"]) == (3, 3, 8)
    experts = (8, 16) if qk == "moe" else (0, 0)
    assert summary["per_layer"] == {
        "0": {"q_heads": 1, "k_heads": 1, "query_experts": experts[0], "key_experts": experts[1]},
        "1": {"q_heads": 2, "k_heads": 2, "query_experts": experts[0], "key_experts": experts[1]},
    }
    layers = model.model.language_model.layers
    # head 1 alone shares its key/value head with head 0: its key is scoped, one head_dim block per selected head
    assert [_q_k(layer)[1].key_scope.heads for layer in layers] == [(1,), (0, 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    selected = {0: [1], 1: [0, 1]}
    for index, layer in enumerate(layers):
        q, k = _q_k(layer)
        for side, module in (("q", q), ("k", k)):
            name = f"model.language_model.layers.{index}.self_attn.{side}_proj.weight"
            assert torch.equal(module.base_layer.weight, base[name])
        rows = torch.zeros(q.base_layer.out_features, dtype=torch.bool)
        for head in selected[index]:
            rows[head * HEAD_DIM : (head + 1) * HEAD_DIM] = True
        effective = _effective(q).detach()
        name = f"model.language_model.layers.{index}.self_attn.q_proj.weight"
        assert torch.equal(effective[:, ~rows], base[name][~rows].expand_as(effective[:, ~rows]))
        assert not torch.equal(effective[:, rows], base[name][rows].expand_as(effective[:, rows]))
        key_delta = k.delta_weight()
        assert key_delta.shape[-2] == len(selected[index]) * HEAD_DIM and key_delta.abs().sum() > 0


def test_adapters_that_would_be_empty_are_refused(one_thread):
    with pytest.raises(ValueError, match="no language-model layer has a selected head"):
        apply_adapters(_tiny().model, AdapterConfig(base_model="tiny", qk="moe", heads={}))
    with pytest.raises(ValueError, match="no trainable parameter"):
        apply_adapters(_tiny().model, AdapterConfig(base_model="tiny", qk="none", lora=LoraSpec(targets=())))


@pytest.mark.parametrize("qk", ["moe", "lora"])
def test_save_and_load_give_identical_logits(one_thread, tmp_path, qk):
    lvlm = _tiny()
    batch = _batch(lvlm)
    config = AdapterConfig(base_model="tiny:0", qk=qk, lora=LoraSpec(rank=4), moe=MoeSpec(query_experts=3, key_experts=4))
    apply_adapters(lvlm.model, config)
    _randomise_b(lvlm.model)
    save_adapter(lvlm.model, config, tmp_path / "adapter")
    fresh = _tiny().model
    assert load_adapter(fresh, tmp_path / "adapter") == config
    assert torch.equal(_logits(fresh, batch), _logits(lvlm.model, batch))


def test_load_refuses_pickles_and_mismatched_keys(one_thread, tmp_path):
    lvlm = _tiny()
    config = AdapterConfig(base_model="tiny:0", lora=LoraSpec(rank=4, targets=("v_proj",)))
    apply_adapters(lvlm.model, config)
    save_adapter(lvlm.model, config, tmp_path / "good")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_NAME).write_text(config.to_json())
    torch.save(trainable_state_dict(lvlm.model), pickled / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_adapter(_tiny().model, pickled)
    (tmp_path / "good" / CONFIG_NAME).write_text(
        dataclasses.replace(config, lora=LoraSpec(rank=4, targets=("o_proj",))).to_json()
    )
    with pytest.raises(ValueError, match=r"missing keys \['model.language_model.layers.0.self_attn.o_proj.lora_A.weight'"):
        load_adapter(_tiny().model, tmp_path / "good")


@pytest.mark.parametrize("qk", ["lora", "none"])
def test_merge_gives_a_standard_checkpoint(one_thread, tmp_path, qk):
    lvlm = build_tiny_llava(corpus=CORPUS, text_hidden=32, text_layers=2, text_heads=4, kv_heads=4)  # row-masked keys
    batch = _batch(lvlm)
    apply_adapters(lvlm.model, AdapterConfig(base_model="tiny:0", qk=qk, lora=LoraSpec(rank=4), heads={1: (2, 3)}))
    _randomise_b(lvlm.model)
    before = _logits(lvlm.model, batch)
    merge_lora(lvlm.model)
    assert not trainable_state_dict(lvlm.model)
    merged = _logits(lvlm.model, batch)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    lvlm.save(tmp_path / "merged")
    torch.testing.assert_close(_logits(load_lvlm(tmp_path / "merged").model, batch), merged, atol=1e-6, rtol=0)


def test_merge_refuses_head_scoped_keys(one_thread):
    model = _tiny().model  # grouped-query attention: static keys are scoped per query head
    apply_adapters(model, AdapterConfig(base_model="tiny", qk="lora", heads={1: (2, 3)}))
    with pytest.raises(ValueError, match="cannot merge head-scoped keys.*layers.1.self_attn.k_proj"):
        merge_lora(model)
    assert isinstance(model.model.language_model.layers[1].self_attn.q_proj, LoraLinear)  # nothing changed


def test_merge_refuses_routed_moe(one_thread):
    model = _tiny().model
    apply_adapters(model, AdapterConfig(base_model="tiny", moe=MoeSpec(query_experts=1)))
    with pytest.raises(ValueError, match="cannot merge routed MoE layers.*k_proj"):
        merge_lora(model)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, MoeQueryLinear)  # nothing changed
