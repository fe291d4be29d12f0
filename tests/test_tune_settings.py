"""Tuning presets: every data set x method combination resolves; the reference numbers; overrides; errors."""

from __future__ import annotations

import polars as pl
import pytest

from a3tune.tune.settings import TuneSettings, dataset_presets, method_presets, resolve_settings
from a3tune.tune.tune_stage import on_cue_shuffled_twins


def test_every_preset_combination_is_valid():
    assert dataset_presets() == ["iu_xray", "mimic_cxr", "pathvqa", "phantom", "slake", "vqarad"]
    assert method_presets() == ["a3tune", "all_heads", "dynamic_heads", "lora", "lora_nocue", "no_moe"]
    for dataset in dataset_presets():
        for method in method_presets():
            assert isinstance(resolve_settings(dataset, method), TuneSettings)


@pytest.mark.parametrize(
    ("dataset", "epochs", "lam", "loss", "experts", "top_k", "beta"),
    [
        ("slake", 6, 0.03, "inside", (8, 16), 1, 0.0),
        ("vqarad", 9, 0.06, "kl", (8, 16), 1, 0.0),
        ("pathvqa", 3, 0.02, "inside", (8, 16), 1, 0.0),
        ("iu_xray", 12, 0.08, "inside", (1, 8), 2, 0.01),
        ("mimic_cxr", 12, 0.05, "inside", (1, 8), 2, 0.01),
    ],
)
def test_reference_numbers(dataset, epochs, lam, loss, experts, top_k, beta):
    s = resolve_settings(dataset, "a3tune")
    assert (s.epochs, s.lam, s.loss, s.beta) == (epochs, lam, loss, beta)
    assert (s.moe["query_experts"], s.moe["key_experts"], s.moe["key_top_k"]) == (*experts, top_k)
    assert (s.moe["rank"], s.moe["alpha"], s.lora) == (16, 8, {"rank": 64, "alpha": 16, "dropout": 0.05})
    assert (s.lr, s.warmup, s.weight_decay, s.global_batch, s.heads_top_k) == (2e-4, 0.03, 0.0, 32, 128)
    assert (s.qk, s.heads, s.align) == ("moe", "static", True)
    assert s.grad_accum(world_size=4) == 8  # 4 GPUs x batch 1 x 8 accumulation, as the reference


def test_steps_follow_epochs_and_the_global_batch():
    assert resolve_settings("slake", "a3tune").total_steps(4919) == 923  # 6 epochs of 4 919 samples at 32
    assert resolve_settings("pathvqa", "a3tune").total_steps(19755) == 1853


def test_methods_change_what_they_say():
    lora = resolve_settings("slake", "lora")
    assert (lora.qk, lora.heads, lora.align) == ("lora", "none", False)
    assert resolve_settings("slake", "dynamic_heads").heads == "dynamic"
    assert resolve_settings("slake", "all_heads").heads == "all"
    assert resolve_settings("slake", "no_moe").qk == "lora"


def test_overrides_merge_nested_and_refuse_unknown_keys():
    s = resolve_settings("slake", "a3tune", {"lam": 0.1, "moe": {"key_top_k": 2}, "max_steps": 5})
    assert s.lam == 0.1 and s.moe["key_top_k"] == 2 and s.moe["key_experts"] == 16
    assert s.total_steps(10_000) == 5
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lamda'\]"):
        resolve_settings("slake", "a3tune", {"lamda": 0.1})
    with pytest.raises(ValueError, match="unknown data set preset 'slak'"):
        resolve_settings("slak", "a3tune")
    with pytest.raises(ValueError, match="unknown method"):
        resolve_settings("slake", "magic")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "l2"}, "loss must be one of"),
        ({"global_batch": 3, "micro_batch": 2}, "multiple of micro_batch"),
        ({"micro_batch": 0}, "global_batch >= micro_batch >= 1"),
        ({"zero_stage": 1}, "zero_stage"),
        ({"heads": "none"}, "align: true needs heads"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings("slake", "a3tune", overrides)


def test_grad_accum_needs_a_divisible_global_batch():
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_settings("slake", "a3tune").grad_accum(world_size=3)


def test_lora_nocue_is_plain_lora_on_the_cue_shuffled_twins():
    nocue, lora = resolve_settings("phantom", "lora_nocue"), resolve_settings("phantom", "lora")
    assert nocue.train_images == "cue_shuffled" and lora.train_images == "original"
    assert {**nocue.to_dict(), "train_images": "original"} == lora.to_dict()
    with pytest.raises(ValueError, match="train_images must be one of"):
        resolve_settings("phantom", "lora", {"train_images": "flipped"})


def test_twins_replace_the_images_and_their_absence_is_refused():
    samples = pl.DataFrame({"sample_id": ["a", "b"], "path": ["images/a.png", "images/b.png"],
                            "image_cue_shuffled": ["cue_shuffled/a.png", "cue_shuffled/b.png"]})  # fmt: skip
    assert on_cue_shuffled_twins(samples, "s.parquet")["path"].to_list() == ["cue_shuffled/a.png", "cue_shuffled/b.png"]
    with pytest.raises(ValueError, match="1 of 2 training samples in s.parquet have none"):
        on_cue_shuffled_twins(samples.with_columns(pl.Series("image_cue_shuffled", ["x.png", None])), "s.parquet")
    with pytest.raises(ValueError, match="2 of 2"):
        on_cue_shuffled_twins(samples.drop("image_cue_shuffled"), "s.parquet")
