"""Tiny checkpoints in the original LLaVA-Med layouts, with the exact key names and config fields.

- ``write_tower``: a CLIP folder as the hub's ``openai/clip-vit-large-patch14[-336]`` is laid out
  (a full CLIPModel: config.json with vision_config, weights with text_model.* too,
  preprocessor_config.json), only tiny.
- ``write_v15``: ``llava_mistral`` (flat Mistral fields with GQA, rope θ, sliding window; the
  ``mlp2x_gelu`` projector at ``model.mm_projector.{0,2}``; the tower inside at
  ``model.vision_tower.vision_tower.vision_model.*``), two safetensors shards with an index, and a
  sentencepiece ``tokenizer.model`` with no tokenizer.json, processor or chat template.
- ``write_v1``: a LLaMA base in HF format (pickled, with the ``rotary_emb.inv_freq`` buffers old
  checkpoints carry) and a delta folder (``llava``, ``LlavaLlamaForCausalLM``, vocabulary + 4
  tokens, one-Linear projector, bos 0 / eos 1 as some copies say), pickled in two shards.
Each returns the tensors the original code would run with (``target``), for independent checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from tests.fixtures_spm import write_spm_tokenizer

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
             patch_size=14, projection_dim=16)  # fmt: skip
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
LLAVA_FIELDS = {"mm_vision_select_layer": -2, "mm_hidden_size": TOWER["hidden_size"], "use_mm_proj": True}


def _seeded_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's weights, redrawn from a seed at a scale that keeps activations lively."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.2).to(v.dtype) for k, v in module.state_dict().items()}


def write_tower(folder: Path, seed: int = 0, image_size: int = TOWER["image_size"]) -> dict[str, torch.Tensor]:
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(vision_config={**TOWER, "image_size": image_size}, text_config=text, projection_dim=16)  # fmt: skip
    model = CLIPModel(config)
    state = _seeded_state(model, seed)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    side = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side).save_pretrained(folder)
    return {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], pickled: bool) -> None:
    keys = list(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    stem, ext = ("pytorch_model", "bin") if pickled else ("model", "safetensors")
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = f"{stem}-{i:05d}-of-00002.{ext}"
        shard = {k: tensors[k].contiguous() for k in part}
        torch.save(shard, folder / name) if pickled else save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}  # fmt: skip
    (folder / f"{stem}.{ext}.index.json" if pickled else folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _text_fields(config) -> dict:
    fields = {k: getattr(config, k) for k in (*TEXT, "num_key_value_heads", "hidden_act", "max_position_embeddings",
                                              "rms_norm_eps", "vocab_size")}  # fmt: skip
    fields["rope_theta"] = config.rope_parameters["rope_theta"]
    return fields


def write_v15(folder: Path, tower: dict[str, torch.Tensor], seed: int = 1, sizes: dict | None = None) -> dict[str, torch.Tensor]:
    """``sizes`` overrides the language model's TEXT sizes (the conversion benchmark's ~1 GB model)."""
    folder.mkdir(parents=True)
    vocab = write_spm_tokenizer(folder)
    sizes = {**TEXT, **(sizes or {})}
    text = MistralConfig(vocab_size=vocab, num_key_value_heads=2, rope_theta=1e6, sliding_window=4096, **sizes)
    target = _seeded_state(MistralForCausalLM(text), seed)
    gen = torch.Generator().manual_seed(seed + 100)
    hidden = sizes["hidden_size"]
    target["model.mm_projector.0.weight"] = torch.randn(hidden, TOWER["hidden_size"], generator=gen) * 0.2
    target["model.mm_projector.0.bias"] = torch.randn(hidden, generator=gen) * 0.2
    target["model.mm_projector.2.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.2
    target["model.mm_projector.2.bias"] = torch.randn(hidden, generator=gen) * 0.2
    for key, value in tower.items():
        target[f"model.vision_tower.vision_tower.vision_model.{key}"] = value
    # transformers 4.3x saved CLIP's position ids with the tower; the converter drops the buffer
    patches = tower["embeddings.position_embedding.weight"].shape[0] - 1
    target["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(patches + 1)[None]
    _save_sharded(folder, target, pickled=False)
    config = {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", **_text_fields(text),
              "sliding_window": 4096, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
              **LLAVA_FIELDS}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return target


def write_v1(delta_dir: Path, base_dir: Path, seed: int = 2) -> dict[str, torch.Tensor]:
    """A LLaMA base and a LLaVA-Med v1 delta; returns the target (delta + base) weights.

    Values are multiples of 1/64 below 4 in magnitude, so target - base and back are exact in fp32.
    """
    delta_dir.mkdir(parents=True)
    base_dir.mkdir(parents=True)
    vocab = write_spm_tokenizer(delta_dir, llava_v1_tokens=True)
    base_vocab = vocab - 4
    write_spm_tokenizer(base_dir)
    grid = lambda t: torch.round(t * 64) / 64  # noqa: E731
    base_text = LlamaConfig(vocab_size=base_vocab, **TEXT)
    base = {k: grid(v) for k, v in _seeded_state(LlamaForCausalLM(base_text), seed).items()}
    target = {k: grid(v) for k, v in _seeded_state(LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TEXT)), seed + 1).items()}
    delta = {}
    for key, value in target.items():
        b = base[key]
        delta[key] = value.clone()
        delta[key][tuple(slice(0, n) for n in b.shape)] -= b
    gen = torch.Generator().manual_seed(seed + 2)
    for name, shape in (("weight", (TEXT["hidden_size"], TOWER["hidden_size"])), ("bias", (TEXT["hidden_size"],))):
        target[f"model.mm_projector.{name}"] = delta[f"model.mm_projector.{name}"] = grid(torch.randn(shape, generator=gen) * 0.2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    for layer in range(TEXT["num_hidden_layers"]):
        base[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
        delta[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    torch.save(base, base_dir / "pytorch_model.bin")
    (base_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      **_text_fields(base_text)}))  # fmt: skip
    _save_sharded(delta_dir, delta, pickled=True)
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **_text_fields(base_text),
              "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
              "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_use_im_start_end": True, **LLAVA_FIELDS}  # fmt: skip
    (delta_dir / "config.json").write_text(json.dumps(config, indent=2))
    return target
