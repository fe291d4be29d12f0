"""convert_model on tiny checkpoints in the original LLaVA-Med layouts (tests/fixtures_llava_med.py).

The converted model is checked against an independent forward written the original way: the CLIP
tower's hidden state at layer -2 without CLS, the projector, the image features spliced into the
text embeddings at the image token, then the language model as its own transformers class loaded
with the original tensors; and its pixels against expand2square + CLIP preprocessing on PIL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from a3tune.cli import main
from a3tune.models.convert.converter import convert_model
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import load_lvlm
from tests.fixtures_llava_med import write_tower, write_v1, write_v15

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
QUESTION, ANSWER = "Is there a lesion in the liver?", "yes"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("originals")
    tower_state = write_tower(root / "clip")
    v15_target = write_v15(root / "v15", tower_state)
    v1_target = write_v1(root / "v1-delta", root / "llama")
    convert_model("llava-med-v1.5", root / "v15", root / "v15-hf", vision_tower=root / "clip", progress=False)
    convert_model("llava-med-v1", root / "v1-delta", root / "v1-hf", base=root / "llama", vision_tower=root / "clip",
                  max_shard_size="64KB", progress=False)  # fmt: skip
    return {"root": root, "tower": tower_state, "v15": v15_target, "v1": v1_target}


def _image() -> PIL.Image.Image:
    rng = np.random.default_rng(3)
    return PIL.Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8))  # wider than tall


def _expand2square(image: PIL.Image.Image, colour: tuple[int, ...]) -> PIL.Image.Image:
    width, height = image.size
    side = max(width, height)
    square = PIL.Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _clip_pixels(image: PIL.Image.Image, side: int) -> torch.Tensor:
    """CLIPImageProcessor's steps on PIL: bicubic resize of the short side, centre crop, scale, normalise."""
    width, height = image.size
    scale = side / min(width, height)
    resized = image.resize((round(width * scale), round(height * scale)), PIL.Image.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    cropped = np.asarray(resized.crop((left, top, left + side, top + side)), np.float32) / 255.0
    return torch.from_numpy(((cropped - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())[None]


def _original_forward(folder: Path, target: dict, tower: dict, ids: torch.Tensor, image_id: int, pixels, fmt: str):
    """Logits of the original architecture: tower -> projector -> splice at the image -> language model."""
    original = json.loads((folder / "config.json").read_text())
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(folder.parent / "clip"))
    vision.load_state_dict(tower)
    features = vision(pixels, output_hidden_states=True).hidden_states[original["mm_vision_select_layer"]][:, 1:]
    if fmt == "v15":
        hidden = torch.nn.functional.linear(features, target["model.mm_projector.0.weight"], target["model.mm_projector.0.bias"])
        features = torch.nn.functional.linear(torch.nn.functional.gelu(hidden), target["model.mm_projector.2.weight"],
                                              target["model.mm_projector.2.bias"])  # fmt: skip
    else:
        features = torch.nn.functional.linear(features, target["model.mm_projector.weight"], target["model.mm_projector.bias"])
    fields = {k: v for k, v in original.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")}
    fields["pad_token_id"] = None
    lm_class, cfg_class = (MistralForCausalLM, MistralConfig) if fmt == "v15" else (LlamaForCausalLM, LlamaConfig)
    lm = lm_class(cfg_class(**fields))
    lm.load_state_dict({k: v for k, v in target.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))})
    at = torch.nonzero(ids == image_id).flatten()
    embed = lm.get_input_embeddings()
    spliced = torch.cat([embed(ids[: at[0]]), features[0], embed(ids[at[-1] + 1 :])])[None]
    return lm(inputs_embeds=spliced).logits


@pytest.mark.parametrize("fmt", ["v15", "v1"])
def test_converted_logits_equal_the_original_forward(originals, fmt):
    folder = originals["root"] / ("v15" if fmt == "v15" else "v1-delta")
    lvlm = load_lvlm(originals["root"] / f"{fmt}-hf")
    image = _image()
    batch = encode_batch(lvlm, [image], [QUESTION], [ANSWER])
    side = lvlm.input_size
    if fmt == "v15":
        assert lvlm.preprocess == "pad"
        expected_pixels = _clip_pixels(_expand2square(image, tuple(int(x * 255) for x in CLIP_MEAN)), side)
    else:
        assert lvlm.preprocess == "crop"
        expected_pixels = _clip_pixels(image, side)
    assert torch.equal(batch.inputs["pixel_values"], expected_pixels)
    with torch.no_grad():
        ours = lvlm.model(**batch.inputs).logits
        theirs = _original_forward(folder, originals[fmt], originals["tower"], batch.inputs["input_ids"][0],
                                   lvlm.image_token_id, expected_pixels, fmt)  # fmt: skip
    vocab = theirs.shape[-1]
    assert ours.shape[1] == theirs.shape[1]
    assert (ours[..., :vocab] - theirs).abs().max().item() < 1e-5
    assert theirs.std() > 0.1  # a live network, not a near-constant one


def test_v1_delta_plus_base_equals_the_target(originals):
    lvlm = load_lvlm(originals["root"] / "v1-hf")
    state = lvlm.model.state_dict()
    target = originals["v1"]
    assert torch.equal(state["model.language_model.embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"], target["lm_head.weight"])
    for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(state[f"model.language_model.layers.1.{key}"], target[f"model.layers.1.{key}"])
    assert torch.equal(state["model.multi_modal_projector.linear_2.weight"], torch.eye(lvlm.model.config.text_config.hidden_size))
    assert lvlm.model.config.text_config.vocab_size == target["model.embed_tokens.weight"].shape[0]
    # bos 0 / eos 1 in the delta's config are fixed from the tokenizer
    assert (lvlm.model.config.text_config.bos_token_id, lvlm.model.config.text_config.eos_token_id) == (1, 2)
    tokens = lvlm.processor.tokenizer.convert_ids_to_tokens(encode_batch(lvlm, [_image()], [QUESTION]).inputs["input_ids"][0])
    at = tokens.index("<im_patch>")
    assert tokens[at - 1] == "<im_start>" and tokens[at + lvlm.n_image_tokens] == "<im_end>"


def test_output_folder_is_a_standard_llava_checkpoint(originals):
    out = originals["root"] / "v1-hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)  # 64KB shards: streamed in several
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja", "generation_config.json",
                 "provenance.json"):
        assert (out / name).is_file(), name
    v15 = originals["root"] / "v15-hf"
    lvlm = load_lvlm(v15)
    assert lvlm.processor.tokenizer.convert_tokens_to_ids("<image>") == lvlm.image_token_id
    assert lvlm.image_token_id == originals["v15"]["model.embed_tokens.weight"].shape[0]  # one row added
    assert lvlm.model.generation_config.suppress_tokens == [lvlm.image_token_id]
    assert lvlm.processor.chat_template and "ASSISTANT" in lvlm.processor.chat_template
    text = lvlm.model.config.text_config
    assert (text.model_type, text.num_key_value_heads, text.sliding_window) == ("mistral", 2, 4096)
    assert text.rope_parameters["rope_theta"] == 1e6
    provenance = json.loads((v15 / "provenance.json").read_text())
    assert provenance["stage"] == "convert_model"
    assert provenance["params"]["format"] == "llava-med-v1.5" and provenance["params"]["embedding_rows_added"] == 1
    assert set(provenance["inputs"]) == {"source", "vision_tower"}


def _copy_with(originals, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "v15"
    shutil.copytree(originals["root"] / "v15", folder)
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"] = {k: v for k, v in meta["weight_map"].items() if k in tensors or not v.startswith("model-00001")}
    meta["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index.write_text(json.dumps(meta))
    return folder


def test_renamed_tensor_fails_naming_file_and_key(originals, tmp_path):
    def rename(tensors):
        tensors["model.embed_tokenz.weight"] = tensors.pop("model.embed_tokens.weight")

    folder = _copy_with(originals, tmp_path, rename)
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors: model\.embed_tokenz\.weight"):
        convert_model("llava-med-v1.5", folder, tmp_path / "out", vision_tower=originals["root"] / "clip", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_and_misshapen_tensors_fail(originals, tmp_path):
    folder = _copy_with(originals, tmp_path, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match=r"model\.language_model\.embed_tokens\.weight"):
        convert_model("llava-med-v1.5", folder, tmp_path / "out", vision_tower=originals["root"] / "clip", progress=False)
    shutil.rmtree(folder)
    folder = _copy_with(originals, tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"safetensors: model\.norm\.weight: shape \(3,\)"):
        convert_model("llava-med-v1.5", folder, tmp_path / "out", vision_tower=originals["root"] / "clip", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_layout_and_arguments_are_refused(originals, tmp_path):
    root = originals["root"]
    with pytest.raises(ValueError, match="not the llava-med-v1 layout"):
        convert_model("llava-med-v1", root / "v15", tmp_path / "o", base=root / "llama", vision_tower=root / "clip")
    with pytest.raises(ValueError, match="--base"):
        convert_model("llava-med-v1", root / "v1-delta", tmp_path / "o", vision_tower=root / "clip")
    with pytest.raises(ValueError, match="unknown format"):
        convert_model("llava-2", root / "v15", tmp_path / "o")
    with pytest.raises(ValueError, match="--vision-tower"):
        convert_model("llava-med-v1", root / "v1-delta", tmp_path / "o", base=root / "v1-delta")


def test_delta_over_a_wrong_base_fails(originals, tmp_path):
    with pytest.raises(ValueError, match="delta and base disagree|has no delta|has no base"):
        convert_model("llava-med-v1", originals["root"] / "v1-delta", tmp_path / "o", base=originals["root"] / "v15",
                      vision_tower=originals["root"] / "clip", progress=False)  # fmt: skip


def test_cli_converts_and_reports_errors_in_one_line(originals, tmp_path, capsys):
    root = originals["root"]
    args = ["convert_model", "--format", "llava-med-v1.5", "--source", str(root / "v15"),
            "--vision-tower", str(root / "clip"), "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    assert load_lvlm(tmp_path / "m").grid == 4
    assert main(["convert_model", "--format", "llava-med-v1", "--source", str(root / "v15"), "--out", str(tmp_path / "x"),
                 "--base", str(root / "llama"), "--vision-tower", str(root / "clip")]) == 2  # fmt: skip
    assert "not the llava-med-v1 layout" in capsys.readouterr().err


def test_cli_registers_the_converter_without_loading_torch():
    import subprocess
    import sys

    from a3tune.models.convert import command, converter

    assert command.FORMAT_NAMES == converter.FORMATS
    code = "import sys, a3tune.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
