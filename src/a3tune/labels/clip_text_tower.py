"""The Hugging Face text tower of a local open_clip folder (BiomedCLIP's PubMedBERT), with no hub access.

open_clip builds such a tower from ``text_cfg.hf_model_name`` with transformers' ``AutoConfig``, and
its tokenizer from ``hf_tokenizer_name``; ``local_text_tower`` points both at a local folder (the
tower's weights come from the CLIP checkpoint like every other weight). The transformers config is,
in order:

1. ``config.json`` in the text folder (``text_model_dir``, default the model folder): explicit wins;
2. for BiomedCLIP's PubMedBERT names (``BUILTIN_TEXT_CONFIGS``), a built-in BERT config sized from
   the checkpoint's own tensors (``bert_config_from_shapes``). The hub repository
   ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` ships the tokenizer files but no
   config.json, so its folder loads as downloaded, with no second download;
3. otherwise ``FileNotFoundError`` naming the missing config.json and the built-in names.

The built-in config is written, with copies of the tokenizer files, to a temporary folder that lives
while the model and tokenizer are built (open_clip's ``_build_text_tower`` takes a name, not a config
object; and ``AutoTokenizer`` reads the model type from config.json when tokenizer_config.json names
no tokenizer class).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# A Hugging Face text tower needs its transformers config and at least one of the tokenizer files.
HF_CONFIG_NAME = "config.json"
HF_TOKENIZER_NAMES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
# Tokenizer files copied next to a built-in config (those of the BiomedCLIP repository, and more).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# BERT-base, the architecture of PubMedBERT (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract,
# renamed from BiomedNLP-PubMedBERT-base-uncased-abstract). The sizes named in BERT_SHAPE_FIELDS are
# replaced by the checkpoint's; the values here document the published model.
BERT_BASE: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,  # not visible in any tensor shape: kept
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,  # not visible in any tensor shape: kept
    "pad_token_id": 0,
}
BUILTIN_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": BERT_BASE,
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": BERT_BASE,
}
# Config field <- (tensor under the tower's prefix, dimension) of an open_clip HFTextEncoder over BERT.
BERT_SHAPE_FIELDS: dict[str, tuple[str, int]] = {
    "vocab_size": ("embeddings.word_embeddings.weight", 0),
    "hidden_size": ("embeddings.word_embeddings.weight", 1),
    "max_position_embeddings": ("embeddings.position_embeddings.weight", 0),
    "type_vocab_size": ("embeddings.token_type_embeddings.weight", 0),
    "intermediate_size": ("encoder.layer.0.intermediate.dense.weight", 0),
}
# The text tower's transformer inside open_clip's CustomTextCLIP.
TEXT_PREFIX = "text.transformer."


def checkpoint_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a CLIP checkpoint, without reading the tensors where the format allows.

    ``.safetensors`` is read from its header; a torch file is memory-mapped (a legacy, non-zip torch
    file is loaded whole). Like open_clip, a ``state_dict`` wrapper and a ``module.`` prefix are undone.
    """
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy torch file cannot be memory-mapped
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return {key.removeprefix("module."): tuple(v.shape) for key, v in state.items() if isinstance(v, torch.Tensor)}


def bert_config_from_shapes(
    base: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, source: str, prefix: str = TEXT_PREFIX
) -> dict[str, Any]:
    """A BERT config whose sizes are those of the checkpoint's text tower, so it cannot disagree with them.

    Every size a tensor shows comes from the tensors (``BERT_SHAPE_FIELDS``; ``num_hidden_layers`` from
    the highest ``encoder.layer.N`` index), which also lets a small BERT in the same layout load. Only
    what no shape shows is kept from ``base``: the number of attention heads, the activation,
    ``layer_norm_eps``, the pad token id.

    Args:
        base: the architecture's published config (``BERT_BASE``).
        shapes: the checkpoint's tensor shapes (``checkpoint_shapes``).
        source: the checkpoint, for messages.
        prefix: where the BERT's tensors are in the checkpoint.

    Raises:
        ValueError: naming the checkpoint and the tensor that is missing, or heads that do not divide
            the hidden size.
    """
    config = dict(base)
    for field, (name, dim) in BERT_SHAPE_FIELDS.items():
        if prefix + name not in shapes:
            raise ValueError(f"{source} has no tensor {prefix + name}: not a BERT text tower in open_clip's layout")
        config[field] = int(shapes[prefix + name][dim])
    layer = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    config["num_hidden_layers"] = 1 + max(int(m.group(1)) for key in shapes if (m := layer.match(key)))
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(
            f"{source}: hidden size {config['hidden_size']} is not a multiple of the built-in config's "
            f"{config['num_attention_heads']} attention heads"
        )
    return config


@dataclasses.dataclass(frozen=True)
class LocalTextTower:
    """Where an HF text tower is built from.

    Args:
        folder: the folder holding the transformers config and tokenizer files that are used.
        text_cfg: the open_clip ``text_cfg`` with the hub names replaced by ``folder``.
        text_config: which transformers config: its config.json path, or "built-in ..." with the sizes.
    """

    folder: Path
    text_cfg: dict[str, Any]
    text_config: str

    def tokenizer(self):
        """open_clip's HFTokenizer over the folder's tokenizer files."""
        from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

        return HFTokenizer(
            str(self.folder), context_length=self.text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=self.text_cfg.get("tokenizer_mode"), **self.text_cfg.get("tokenizer_kwargs", {}),
        )  # fmt: skip


@contextlib.contextmanager
def local_text_tower(text_cfg: Mapping[str, Any], hf_dir: Path, weights: Path) -> Iterator[LocalTextTower]:
    """The text tower's local folder, valid inside the ``with`` block (see the module docstring).

    Args:
        text_cfg: the open_clip ``text_cfg``; ``hf_model_name`` names the hub model.
        hf_dir: the folder with the tokenizer files, and the transformers config if it has one.
        weights: the CLIP checkpoint, whose tensor shapes size a built-in config.

    Raises:
        FileNotFoundError: naming the missing config.json (with the built-in names) or tokenizer files.
    """
    hub_name = text_cfg["hf_model_name"]
    config_path = hf_dir / HF_CONFIG_NAME
    if not config_path.is_file() and hub_name not in BUILTIN_TEXT_CONFIGS:
        raise FileNotFoundError(
            f"{config_path} not found: the text tower ({hub_name}) is built from a local transformers config; "
            f"copy that model's config.json there or pass text_model_dir (built-in configs exist only for "
            f"{', '.join(BUILTIN_TEXT_CONFIGS)})"
        )
    if not any((hf_dir / name).is_file() for name in HF_TOKENIZER_NAMES):
        raise FileNotFoundError(f"no tokenizer files in {hf_dir}: expected one of {list(HF_TOKENIZER_NAMES)}")
    if config_path.is_file():
        yield _tower(text_cfg, hf_dir, str(config_path))
        return
    config = bert_config_from_shapes(BUILTIN_TEXT_CONFIGS[hub_name], checkpoint_shapes(weights), source=str(weights))
    sizes = ", ".join(f"{field} {config[field]}" for field in (*BERT_SHAPE_FIELDS, "num_hidden_layers"))
    with tempfile.TemporaryDirectory(prefix="a3tune-text-tower-") as tmp:
        folder = Path(tmp)
        (folder / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, folder / name)
        yield _tower(text_cfg, folder, f"built-in {hub_name} (sizes from {weights.name}: {sizes})")


def _tower(text_cfg: Mapping[str, Any], folder: Path, text_config: str) -> LocalTextTower:
    names = {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_model_pretrained": False}
    return LocalTextTower(folder, {**text_cfg, **names}, text_config)
