"""The CLIP scorer of prompt-aware refinement: local loading (BiomedCLIP layout), masked crops,
query templates and top-k selection. Tiny random models built from configs; no hub access."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: never call the hub

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from a3tune.labels.clip_scorer import (
    ClipScorer,
    build_query,
    import_open_clip,
    load_clip,
    load_clip_named,
    mask_bbox,
    masked_crop,
    select_top_k,
)
from a3tune.labels.clip_text_tower import BERT_BASE, BUILTIN_TEXT_CONFIGS, bert_config_from_shapes

open_clip = import_open_clip()  # after a3tune.compat.ensure_torchvision()

HUB_BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "medical", "image", "imgaing", "of", "abdomen", "ct", "lesion",
         "is", "there", "a", "in", "the", "liver", "spleen", "which", "organ", "contains", "?", "."]  # fmt: skip
# The BiomedCLIP hub config, shrunk: timm ViT (timm's own tiny test_vit) + Hugging Face BERT tower.
BIOMEDCLIP_CFG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"hf_model_name": HUB_BERT, "hf_tokenizer_name": HUB_BERT, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}  # fmt: skip
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _write_text_tower(folder):
    """What a local copy needs besides the hub repository: the BERT config (+ the tokenizer files)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(folder)  # fmt: skip


@pytest.fixture(scope="module")
def biomedclip_dir(tmp_path_factory):
    """A BiomedCLIP-layout folder: open_clip_config.json naming the hub BERT, .bin weights, tokenizer
    files and the BERT's config.json side by side."""
    folder = tmp_path_factory.mktemp("biomedclip")
    _write_text_tower(folder)
    (folder / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CFG))
    model_cfg = json.loads(json.dumps(BIOMEDCLIP_CFG["model_cfg"]))
    model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_model_pretrained=False)
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**model_cfg)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


# BiomedCLIP's hub folder ships no config.json: the tower gets a built-in BERT config whose sizes come
# from the weights. Here a small BERT with BERT-base's 12 heads (the one size no tensor shows), of
# width 4, and sizes unlike BERT-base's, so that each must be read from the checkpoint.
HUB_BERT_SIZES = {"vocab_size": len(WORDS), "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 12,
                  "intermediate_size": 40, "max_position_embeddings": 40, "type_vocab_size": 2}  # fmt: skip
OLD_HUB_BERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"
BIN = "open_clip_pytorch_model.bin"


def _write_bert_config(folder, **overrides):
    from transformers import BertConfig

    BertConfig(**{**HUB_BERT_SIZES, **overrides}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """BiomedCLIP's hub layout: open_clip_config.json naming the hub BERT, .bin weights and the
    tokenizer files (a tokenizer_config.json that names no tokenizer class); no config.json."""
    folder = tmp_path_factory.mktemp("biomedclip_hub")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 32}))
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CFG))
    model_cfg = json.loads(json.dumps(BIOMEDCLIP_CFG["model_cfg"]))
    bert = _write_bert_config(tmp_path_factory.mktemp("bert_config"))
    model_cfg["text_cfg"].update(hf_model_name=str(bert), hf_model_pretrained=False)
    torch.manual_seed(2)
    torch.save(open_clip.CustomTextCLIP(**model_cfg).state_dict(), folder / BIN)
    return folder


def _image_and_masks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    masks = np.zeros((4, 64, 64), bool)
    masks[0, 4:20, 6:30] = True
    masks[1, 30:60, 30:62] = True
    masks[2, 10:12, 40:50] = True
    return image, masks  # mask 3 is empty


# --- loading --------------------------------------------------------------------------------------


def test_biomedclip_layout_loads_offline_and_scores(biomedclip_dir):
    scorer = load_clip(biomedclip_dir)
    # The weights are the checkpoint's, not a random init
    saved = torch.load(biomedclip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    for name, value in scorer.model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name
    # The text tower's tokenizer is the local WordPiece vocabulary
    ids = scorer.tokenizer(["Medical imgaing of abdomen CT."])[0].tolist()
    assert ids[:8] == [WORDS.index(w) for w in ("[CLS]", "medical", "imgaing", "of", "abdomen", "ct", ".", "[SEP]")]
    image, masks = _image_and_masks()
    scores = scorer.score(image, masks, "Medical imgaing of abdomen CT.Is there a lesion in the liver?")
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert np.all(np.abs(scores[:3]) <= 100.0 + 1e-3) and scores[3] == -np.inf  # empty mask
    # Batching does not change a crop's score
    alone = scorer.score(image, masks[1:2], "Medical imgaing of abdomen CT.Is there a lesion in the liver?")
    np.testing.assert_allclose(alone[0], scores[1], rtol=1e-4, atol=1e-3)


def test_biomedclip_text_tower_in_another_folder(biomedclip_dir, tmp_path):
    model_dir = tmp_path / "clip"
    model_dir.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy(biomedclip_dir / name, model_dir / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files in " + str(model_dir)):
        load_clip(model_dir)
    _write_text_tower(tmp_path / "bert")
    image, masks = _image_and_masks()
    query = "Medical image of pathology.Which organ contains the lesion?"
    got = load_clip(model_dir, text_model_dir=tmp_path / "bert").score(image, masks, query)
    np.testing.assert_allclose(got, load_clip(biomedclip_dir).score(image, masks, query), rtol=1e-5)


def _legacy_bin(state, folder):
    torch.save(state, folder / BIN, _use_new_zipfile_serialization=False)  # cannot be memory-mapped


def _wrapped_bin(state, folder):
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, folder / BIN)


def _safetensors(state, folder):
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    (folder / BIN).unlink()


# How the weights are stored: the built-in config's sizes are read from each.
WEIGHT_FORMATS = {
    "bin": lambda state, folder: None,
    "legacy bin": _legacy_bin,
    "wrapped bin": _wrapped_bin,
    "safetensors": _safetensors,
}


@pytest.mark.parametrize("weights_format", list(WEIGHT_FORMATS))
def test_biomedclip_hub_layout_loads_with_builtin_text_config(hub_dir, tmp_path, weights_format):
    folder = shutil.copytree(hub_dir, tmp_path / "hub")
    state = torch.load(folder / BIN, weights_only=True)
    WEIGHT_FORMATS[weights_format](state, folder)
    scorer = load_clip(folder)
    weights = "open_clip_model.safetensors" if weights_format == "safetensors" else BIN
    assert scorer.text_config.startswith(f"built-in {HUB_BERT} (sizes from {weights}: vocab_size {len(WORDS)}")
    config = scorer.model.text.config
    assert {k: getattr(config, k) for k in HUB_BERT_SIZES} == HUB_BERT_SIZES  # 12 heads built in, the rest read
    assert (config.model_type, config.hidden_act, config.layer_norm_eps, config.pad_token_id) == ("bert", "gelu", 1e-12, 0)
    model_state = scorer.model.state_dict()
    assert all(torch.equal(model_state[name], value) for name, value in state.items() if name in model_state)
    ids = scorer.tokenizer(["Medical imgaing of abdomen CT."])[0].tolist()
    assert ids[:8] == [WORDS.index(w) for w in ("[CLS]", "medical", "imgaing", "of", "abdomen", "ct", ".", "[SEP]")]
    image, masks = _image_and_masks()
    scores = scorer.score(image, masks, "Medical imgaing of abdomen CT.Is there a lesion in the liver?")
    assert np.all(np.isfinite(scores[:3])) and scores[3] == -np.inf
    assert not os.path.exists(scorer.tokenizer.tokenizer.name_or_path)  # the temporary folder is gone


def test_folder_config_json_wins_over_builtin(hub_dir, tmp_path):
    image, masks = _image_and_masks()
    query = "Medical image of abdomen. Which organ contains the lesion?"
    builtin = load_clip(hub_dir)
    # The same sizes in the folder's config.json: the same weights give the same numbers
    same = _write_bert_config(shutil.copytree(hub_dir, tmp_path / "same"))
    explicit = load_clip(same)
    assert explicit.text_config == str(same / "config.json")
    np.testing.assert_allclose(explicit.score(image, masks, query), builtin.score(image, masks, query), rtol=1e-6)
    # A config.json that differs from the built-in one (4 heads) is the one used
    other = _write_bert_config(shutil.copytree(hub_dir, tmp_path / "other"), num_attention_heads=4)
    scorer = load_clip(other)
    assert scorer.text_config == str(other / "config.json") and scorer.model.text.config.num_attention_heads == 4
    assert not np.allclose(scorer.score(image, masks, query)[:3], builtin.score(image, masks, query)[:3])


@pytest.mark.parametrize(("hub_name", "builtin"), [(HUB_BERT, True), (OLD_HUB_BERT, True), ("bert-base-uncased", False)])
def test_text_tower_without_config_json_needs_a_builtin_name(hub_dir, tmp_path, hub_name, builtin):
    folder = shutil.copytree(hub_dir, tmp_path / "hub")
    config = json.loads(json.dumps(BIOMEDCLIP_CFG))
    config["model_cfg"]["text_cfg"].update(hf_model_name=hub_name, hf_tokenizer_name=hub_name)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if builtin:
        assert load_clip(folder).text_config.startswith(f"built-in {hub_name} ")
        return
    with pytest.raises(FileNotFoundError, match=str(folder / "config.json")) as error:
        load_clip(folder)
    assert all(name in str(error.value) for name in BUILTIN_TEXT_CONFIGS)


def test_bert_config_from_published_shapes():
    # PubMedBERT's own shapes give back BERT-base exactly
    t = "text.transformer."
    shapes = {t + "embeddings.word_embeddings.weight": (30522, 768), t + "embeddings.position_embeddings.weight": (512, 768),
              t + "embeddings.token_type_embeddings.weight": (2, 768)}  # fmt: skip
    for i in range(12):
        shapes[f"{t}encoder.layer.{i}.intermediate.dense.weight"] = (3072, 768)
        shapes[f"{t}encoder.layer.{i}.output.dense.weight"] = (768, 3072)
    assert bert_config_from_shapes(BERT_BASE, shapes, source="ckpt.bin") == BERT_BASE
    # A missing tensor, or a width that BERT-base's 12 heads do not divide, is refused by name
    missing = {k: v for k, v in shapes.items() if "position" not in k}
    with pytest.raises(ValueError, match=r"ckpt.bin has no tensor text.transformer.embeddings.position_embeddings"):
        bert_config_from_shapes(BERT_BASE, missing, source="ckpt.bin")
    narrow = {**shapes, t + "embeddings.word_embeddings.weight": (30522, 32)}
    with pytest.raises(ValueError, match="hidden size 32 is not a multiple of the built-in config's 12 attention heads"):
        bert_config_from_shapes(BERT_BASE, narrow, source="ckpt.bin")


def test_safetensors_preferred_over_bin(biomedclip_dir, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(biomedclip_dir, folder)
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    state["logit_scale"] = torch.full_like(state["logit_scale"], 1.25)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    assert load_clip(folder).model.logit_scale.item() == pytest.approx(1.25)


def test_missing_files_name_their_path(biomedclip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_clip(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "open_clip_config.json")):
        load_clip(empty)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(biomedclip_dir, no_weights)
    (no_weights / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=str(no_weights / "open_clip_model.safetensors")):
        load_clip(no_weights)
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(biomedclip_dir, no_vocab)
    (no_vocab / "vocab.txt").unlink()
    (no_vocab / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files in " + str(no_vocab)):
        load_clip(no_vocab)


def test_named_architecture_with_local_checkpoint(tmp_path):
    (tmp_path / "a3tune-test-tiny-clip.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "a3tune-test-tiny-clip.json")
    torch.manual_seed(1)
    reference = open_clip.CLIP(**TINY_CFG)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(checkpoint))

    scorer = load_clip_named("a3tune-test-tiny-clip", checkpoint)
    assert isinstance(scorer, ClipScorer)
    assert torch.equal(scorer.model.visual.proj, reference.visual.proj)
    image, masks = _image_and_masks()
    scores = scorer.score(image, masks, "a lesion")
    # score = 100 cos(crop, text), computed here by hand for mask 0
    with torch.no_grad():
        crop = scorer.preprocess(Image.fromarray(masked_crop(image, masks[0])))[None]
        a = reference.encode_image(crop, normalize=True)[0]
        b = reference.encode_text(scorer.tokenizer(["a lesion"]), normalize=True)[0]
    assert scores[0] == pytest.approx(100.0 * float(a @ b), abs=1e-3)

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.safetensors")):
        load_clip_named("a3tune-test-tiny-clip", tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip_named("no-such-arch", checkpoint)


# --- masked crops and selection --------------------------------------------------------------------


def test_masked_crop_is_image_times_mask_cropped_to_bbox():
    rng = np.random.default_rng(3)
    image = rng.integers(1, 256, (40, 50, 3), dtype=np.uint8)  # no zero pixels: zeros come from the mask
    mask = np.zeros((40, 50), bool)
    mask[5:15, 7:9] = True  # an L shape
    mask[13:15, 7:20] = True
    assert mask_bbox(mask) == (7, 5, 13, 10)  # x, y, w, h
    crop = masked_crop(image, mask)
    assert crop.shape == (10, 13, 3) and crop.dtype == np.uint8
    window = mask[5:15, 7:20]
    np.testing.assert_array_equal(crop[window], image[5:15, 7:20][window])
    assert not crop[~window].any()
    one = np.zeros((40, 50), bool)
    one[0, 49] = True  # a single pixel in a corner
    np.testing.assert_array_equal(masked_crop(image, one), image[0:1, 49:50])
    assert mask_bbox(np.zeros((4, 4), bool)) is None and masked_crop(image, np.zeros((40, 50), bool)) is None


def test_select_top_k_descending_stable_no_threshold():
    scores = np.array([1.0, 3.0, 2.0, 3.0, -np.inf, np.nan, -5.0], np.float32)
    np.testing.assert_array_equal(select_top_k(scores, 3), [1, 3, 2])  # ties keep input order
    np.testing.assert_array_equal(select_top_k(scores, 10), [1, 3, 2, 0, 6])  # no threshold; never inf/nan
    np.testing.assert_array_equal(select_top_k(scores, 10, min_score=1.5), [1, 3, 2])
    assert select_top_k(scores, 0).size == 0 and select_top_k(np.array([]), 4).size == 0
    with pytest.raises(ValueError):
        select_top_k(scores, -1)


# --- query templates ---------------------------------------------------------------------------------

QUERY_CASES = [
    ("slake", {"question": "Is the lung healthy?", "location": "Chest_lung"},
     "Medical image of Chest_lung and lungs. Is the lung healthy?"),
    ("slake", {"question": "Where is the liver?", "location": "Abdomen"},
     "Medical imgaing of abdomen.Where is the liver?"),
    ("slake", {"question": "What modality is used?", "location": "Brain_Tissue"},
     "Medical image of Brain_Tissue.What modality is used?"),
    ("vqarad", {"question": "Is there free air?", "organ": "abd"}, "Medical imgaing of abdomen CT.Is there free air?"),
    ("vqarad", {"question": "Is the heart enlarged?", "organ": "chest"},
     "Medical image of CHEST and lungs. Is the heart enlarged?"),
    ("vqarad", {"question": "Is there a bleed?", "organ": "head"}, "Medical image of HEAD.Is there a bleed?"),
    ("pathvqa", {"question": "What does this image show?", "location": None},
     "Medical image of pathology.What does this image show?"),
    ("r2gen", {"question": "Analyze the chest X-ray and generate a concise medical report.", "organ": "chest"},
     "Medical image of lungs and chest X-ray."),
    ("phantom", {"question": "Is there a lesion in the liver?", "location": "abdomen"},
     "Medical image of abdomen. Is there a lesion in the liver?"),
    ("phantom", {"question": "Which organ contains the lesion?", "location": "abdomen"},
     "Medical image of abdomen. Which organ contains the lesion?"),
    ("slake", {"question": "Is this normal?", "location": None}, "Is this normal?"),  # no location: the question
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "sample", "expected"), QUERY_CASES)
def test_query_templates(fmt, sample, expected):
    assert build_query(fmt, sample) == expected


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="no query template for data set format 'omni'"):
        build_query("omni", {"question": "?"})
