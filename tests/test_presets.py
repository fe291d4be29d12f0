"""Tuning presets per backbone: the reference's v1 and v1.5 numbers, the merge order, and the backbone
read from a model's config (no weights loaded)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config

from a3tune.models.registry import lvlm_from_config
from a3tune.tune.settings import BACKBONES, backbone_of, dataset_presets, method_presets, resolve_settings
from a3tune.tune.tune_stage import resolve_backbone

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_every_preset_resolves_for_every_backbone():
    for backbone in BACKBONES:
        for dataset in dataset_presets():
            for method in method_presets():
                resolve_settings(dataset, method, backbone=backbone)


# The published numbers (reference scripts), written out rather than read from the presets
@pytest.mark.parametrize(
    ("dataset", "backbone", "lam", "loss"),
    [
        ("vqarad", "llava-med-v1", 0.06, "kl"),  # llava-med/.../top_heads/moe_rad.sh: --use_kl True
        ("vqarad", "llava-med-v1.5", 0.09, "inside"),  # llava-med-1.5/.../top_heads/moe_rad.sh: no --use_kl
        ("slake", "llava-med-v1.5", 0.03, "inside"),
        ("pathvqa", "llava-med-v1.5", 0.02, "inside"),
        ("iu_xray", "llava-med-v1", 0.08, "inside"),
        ("iu_xray", "llava-med-v1.5", 0.25, "kl"),
        ("mimic_cxr", "llava-med-v1.5", 0.06, "inside"),
    ],
)
def test_backbone_numbers(dataset, backbone, lam, loss):
    s = resolve_settings(dataset, "a3tune", backbone=backbone)
    assert (s.lam, s.loss) == (lam, loss)


def test_v15_keeps_the_recipe_and_the_default_is_v1():
    for dataset in dataset_presets():
        v1, v15 = resolve_settings(dataset, "a3tune"), resolve_settings(dataset, "a3tune", backbone="llava-med-v1.5")
        assert resolve_settings(dataset, "a3tune", backbone="llava-med-v1") == v1
        # Only λ and the loss variant differ between the reference's v1 and v1.5 scripts
        assert {**v15.to_dict(), "lam": v1.lam, "loss": v1.loss} == v1.to_dict()
    assert resolve_settings("phantom", "a3tune", backbone="llava-med-v1.5") == resolve_settings("phantom", "a3tune")
    s = resolve_settings("vqarad", "a3tune", backbone="llava-med-v1.5")
    assert (s.epochs, s.heads_top_k, s.moe["query_experts"], s.moe["key_experts"], s.moe["key_top_k"], s.beta) == (
        9, 128, 8, 16, 1, 0.0
    )  # fmt: skip


def test_method_and_overrides_win_over_the_backbone_block():
    s = resolve_settings("vqarad", "a3tune", {"lam": 0.2, "moe": {"key_top_k": 2}}, backbone="llava-med-v1.5")
    assert (s.lam, s.loss, s.moe["key_top_k"], s.moe["key_experts"]) == (0.2, "inside", 2, 16)
    assert resolve_settings("vqarad", "a3tune", {"loss": "kl"}, backbone="llava-med-v1.5").loss == "kl"
    assert resolve_settings("vqarad", "lora", backbone="llava-med-v1.5").qk == "lora"


def test_unknown_backbone_raises_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'llava-med-v2'.*llava-med-v1.*llava-med-v1\.5"):
        resolve_settings("vqarad", "a3tune", backbone="llava-med-v2")
    with pytest.raises(ValueError, match="unknown backbone 'mistral'"):
        resolve_backbone("mistral", None)
    mistral = LlavaConfig(text_config=MistralConfig(**SMALL))
    assert resolve_backbone("llava-med-v1", mistral) == "llava-med-v1"  # configured: the model is not asked
    assert resolve_backbone("auto", mistral) == "llava-med-v1.5"


def test_backbone_of_reads_the_language_model():
    assert backbone_of(LlavaConfig(text_config=MistralConfig(**SMALL))) == "llava-med-v1.5"
    assert backbone_of(LlavaConfig(text_config=LlamaConfig(**SMALL))) == "llava-med-v1"
    assert backbone_of(LlamaConfig(**SMALL)) == "llava-med-v1"  # a bare text config is its own text config
    with pytest.raises(ValueError, match=r"'qwen2'.*set tune\.backbone"):
        backbone_of(LlavaConfig(text_config=Qwen2Config(**SMALL)))


def test_the_demo_builders_are_llava_med_v1():
    lvlm = lvlm_from_config({"builder": "tiny", "corpus": ["left lung"], "text_hidden": 32})
    assert resolve_backbone("auto", lvlm.model.config) == "llava-med-v1"
