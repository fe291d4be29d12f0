"""``load_lvlm`` never returns partly random weights: every fault of a saved folder fails by name.

A tiny LLaVA is saved once; each case copies the folder, breaks one thing (a tensor renamed,
dropped or reshaped in the safetensors file, in one file or in a shard; config.json rewritten in an
original LLaVA-Med layout; processor files removed) and checks the error names the file and key.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from a3tune.models.lvlm import LLAVA_V15_TEMPLATE, build_tiny_llava, compose_llava, load_lvlm, tiny_vision_config, wrap_lvlm
from a3tune.models.registry import lvlm_from_config, resolve_dtype
from a3tune.models.word_tokenizer import build_word_tokenizer

CORPUS = ["What organ is shown in the image?", "The liver, with a cyst."]
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
# As save_pretrained writes it (transformers renames it to model.language_model.* on load)
KEY = "language_model.model.layers.0.self_attn.q_proj.weight"

# Original LLaVA-Med configs, reduced to the fields that identify them (llava_arch.py's names)
ORIGINAL_CONFIGS = {
    "llava-med-v1.5": {"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                       "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                       "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "image_aspect_ratio": "pad"},
    "llava-med-v1": {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
                     "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_hidden_size": 1024,
                     "mm_use_im_start_end": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("strict") / "model"
    build_tiny_llava(corpus=CORPUS, seed=3).save(folder)
    return folder


def _broken(saved: Path, tmp_path: Path, edit: Callable[[dict], None], file: str = "model.safetensors") -> Path:
    """A copy of ``saved`` whose weights file ``file`` is rewritten after ``edit`` changed its tensors."""
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    tensors = load_file(folder / file)
    edit(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})
    return folder


def test_saved_tiny_model_loads_with_pil_preprocessing(saved):
    built = build_tiny_llava(corpus=CORPUS, seed=3)
    loaded = load_lvlm(saved)
    assert type(loaded.processor.image_processor) is type(built.processor.image_processor)
    assert type(loaded.processor.image_processor).__name__ == "LlavaImageProcessorPil"
    pixels = [lvlm.processor.image_processor(images=[IMAGE], return_tensors="pt")["pixel_values"] for lvlm in (built, loaded)]
    torch.testing.assert_close(pixels[0], pixels[1], atol=0, rtol=0)
    for name, tensor in built.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_tied_head_is_not_reported_missing(tmp_path):
    """With tie_word_embeddings (SmolLM2) lm_head is not saved; the loader ties it, the check accepts it."""
    tokenizer = build_word_tokenizer([*CORPUS, "user assistant system :"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)  # fmt: skip
    model, processor = compose_llava(text, tiny_vision_config(), tokenizer, preprocess="crop",
                                     chat_template=LLAVA_V15_TEMPLATE, seed=0, attn_implementation="sdpa")  # fmt: skip
    wrap_lvlm(model, processor, "tied").save(tmp_path / "tied")
    assert not any("lm_head" in key for key in load_file(tmp_path / "tied" / "model.safetensors"))
    loaded = load_lvlm(tmp_path / "tied")
    assert type(loaded.processor.image_processor).__name__ == "CLIPImageProcessorPil"
    head, embed = loaded.model.lm_head.weight, loaded.model.model.language_model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr() and torch.equal(head, model.lm_head.weight)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.__setitem__(KEY.replace("q_proj", "q_proj_renamed"), t.pop(KEY)),
         ["unexpected", "model.safetensors: " + KEY.replace("q_proj", "q_proj_renamed"), "missing from model.safetensors",
          "layers.0.self_attn.q_proj.weight"]),
        (lambda t: t.pop(KEY), ["missing from model.safetensors (1)", "layers.0.self_attn.q_proj.weight"]),
        (lambda t: t.__setitem__(KEY, torch.zeros(8, 64)),
         ["wrong shape", f"model.safetensors: {KEY} checkpoint [8, 64] vs model [64, 64]"]),
        (lambda t: t.pop("language_model.lm_head.weight"), ["missing from model.safetensors (1): lm_head.weight"]),
    ],
    ids=["renamed", "missing", "wrong_shape", "untied_head_missing"],
)  # fmt: skip
def test_weight_faults_name_file_and_key(saved, tmp_path, edit, expected):
    with pytest.raises(ValueError, match="randomly initialised") as raised:
        load_lvlm(_broken(saved, tmp_path, edit))
    message = str(raised.value)
    assert str(tmp_path / "broken") in message
    for part in expected:
        assert part in message


def test_fault_in_a_shard_names_the_shard(tmp_path):
    folder = tmp_path / "sharded"
    lvlm = build_tiny_llava(corpus=CORPUS, seed=3)
    lvlm.model.save_pretrained(folder, max_shard_size="200KB")
    lvlm.processor.save_pretrained(folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[KEY]
    assert len(set(weight_map.values())) > 1 and load_lvlm(folder).grid == lvlm.grid
    renamed = KEY.replace("q_proj", "q_proj_renamed")
    broken = _broken(folder, tmp_path, lambda t: t.__setitem__(renamed, t.pop(KEY)), file=shard)
    with pytest.raises(ValueError, match="missing from model.safetensors.index.json") as raised:
        load_lvlm(broken)
    assert f"{shard}: {renamed}" in str(raised.value)


@pytest.mark.parametrize("layout", sorted(ORIGINAL_CONFIGS))
def test_original_llava_med_config_points_to_convert_model(saved, tmp_path, layout):
    folder = tmp_path / layout
    shutil.copytree(saved, folder)
    (folder / "config.json").write_text(json.dumps({**ORIGINAL_CONFIGS[layout], "hidden_size": 64}))
    with pytest.raises(ValueError, match="not a Hugging Face Llava checkpoint") as raised:
        load_lvlm(folder)
    message = str(raised.value)
    assert f"a3tune convert_model --format {layout} --source" in message
    assert str(folder) in message and ORIGINAL_CONFIGS[layout]["architectures"][0] in message


def test_hf_config_with_original_fields_is_refused(saved, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(saved, folder)
    config = json.loads((saved / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(ValueError, match=r"original LLaVA fields \['mm_projector_type'\].*a3tune convert_model"):
        load_lvlm(folder)


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        (["model.safetensors"], "no model.safetensors"),
        (["processor_config.json"], "cannot load the processor"),
        (["tokenizer.json", "tokenizer_config.json"], "cannot load the processor"),
        (["chat_template.jinja"], "no chat template"),
    ],
)
def test_missing_files_are_named(saved, tmp_path, remove, match):
    folder = tmp_path / "incomplete"
    shutil.copytree(saved, folder)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_lvlm(folder)


@pytest.mark.parametrize(
    ("name", "device", "dtype"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cuda:1", torch.bfloat16),
        ("auto", torch.device("cpu"), torch.float32),
        ("bf16", "cpu", torch.bfloat16),
        ("fp16", "cpu", torch.float16),
        ("fp32", "cuda", torch.float32),
        ("bfloat16", None, torch.bfloat16),
        (torch.float16, None, torch.float16),
    ],
)
def test_resolve_dtype(name, device, dtype):
    assert resolve_dtype(name, device) is dtype


def test_resolve_dtype_auto_without_device_follows_cuda():
    assert resolve_dtype("auto", None) is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


@pytest.mark.parametrize("name", ["bf17", "int8", "cuda", torch.int64])
def test_resolve_dtype_refuses_unknown(name):
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype(name, "cpu")


def test_lvlm_from_config_applies_dtype(saved):
    assert lvlm_from_config({"path": str(saved), "dtype": "bf16"}).model.dtype is torch.bfloat16
    assert lvlm_from_config({"path": str(saved), "dtype": "auto", "device": "cpu"}).model.dtype is torch.float32
