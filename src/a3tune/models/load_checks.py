"""The checks that keep ``load_lvlm`` from returning a partly random model.

``LlavaForConditionalGeneration.from_pretrained`` reads the tensors whose names it knows and
initialises every other parameter at random, with nothing but a logged report. An original
LLaVA-Med folder loads that way with a random language model and projector: v1.5 says
``model_type: llava_mistral``, and v1 (``LlavaLlamaForCausalLM``) even carries HF Llava's own
``model_type: llava``. So a folder is checked twice: its config must describe an HF Llava model
before anything is loaded, and the loading report must be empty afterwards; a missing, unexpected
or wrong-shape tensor is an error that names the weights file and the key. Weights are read from
safetensors only (``model.safetensors``, or shards listed in ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HF_ARCHITECTURE = "LlavaForConditionalGeneration"
# Config fields of the original LLaVA code (llava_arch.py), which HF Llava configs never carry
ORIGINAL_FIELDS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")
CONVERT_COMMAND = "a3tune convert_model --format {fmt} --source <dir> --out <dir>"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
_SHOWN = 5  # keys listed per kind of fault; the count gives the rest


def check_llava_config(path: Path) -> None:
    """Refuse a folder whose config.json is not an HF Llava model's, pointing to ``a3tune convert_model``."""
    config = json.loads((path / "config.json").read_text())
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    original = [field for field in ORIGINAL_FIELDS if field in config]
    if model_type == "llava" and HF_ARCHITECTURE in architectures and not original:
        return
    found = f"model_type {model_type!r}, architectures {architectures}"
    if original:
        found += f", original LLaVA fields {original}"
    raise ValueError(
        f"{path} is not a Hugging Face Llava checkpoint ({found}); load_lvlm needs model_type 'llava' with "
        f"architectures [{HF_ARCHITECTURE!r}]. Convert it first: {CONVERT_COMMAND.format(fmt=_original_format(config))}"
    )


def _original_format(config: dict[str, Any]) -> str:
    """The ``convert_model --format`` of an original layout; both choices when it is not recognised."""
    architectures = config.get("architectures") or []
    if config.get("model_type") == "llava_mistral" or "LlavaMistralForCausalLM" in architectures:
        return "llava-med-v1.5"
    if "LlavaLlamaForCausalLM" in architectures:
        return "llava-med-v1"
    return "{llava-med-v1.5,llava-med-v1}"


def weights_listing(path: Path) -> Path:
    """The file that lists the checkpoint's tensors: the shard index if there is one, else model.safetensors."""
    for name in (WEIGHTS_INDEX, WEIGHTS):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{path}: no {WEIGHTS} or {WEIGHTS_INDEX}; a3tune reads safetensors weights only "
        f"(an original LLaVA-Med folder: {CONVERT_COMMAND.format(fmt='{llava-med-v1.5,llava-med-v1}')})"
    )


def check_loading_info(path: Path, model: Any, info: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``from_pretrained(..., output_loading_info=True)`` left any tensor unread.

    ``info`` as transformers 5 returns it: ``missing_keys`` and ``unexpected_keys`` (sets of the
    model's names), ``mismatched_keys`` ((name, checkpoint shape, model shape) with
    ``ignore_mismatched_sizes=True``) and ``error_msgs``. Tied weights (``lm_head`` with
    ``tie_word_embeddings``) are not reported missing.
    """
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched, errors = sorted(info["mismatched_keys"]), list(info.get("error_msgs") or [])
    if not (missing or unexpected or mismatched or errors):
        return
    listing = weights_listing(path)
    origin = _origins(model, listing)
    faults = []
    if missing:
        faults.append(_few(f"missing from {listing.name}", missing))
    if unexpected:
        faults.append(_few("unexpected", [_where(key, origin) for key in unexpected]))
    if mismatched:
        shapes = [f"{_where(key, origin)} checkpoint {list(ckpt)} vs model {list(wanted)}" for key, ckpt, wanted in mismatched]
        faults.append(_few("wrong shape", shapes))
    if errors:
        faults.append(_few("load errors", errors))
    raise ValueError(
        f"{path}: the weights do not fit {type(model).__name__}; refusing to run with randomly initialised tensors\n  "
        + "\n  ".join(faults)
    )


def _origins(model: Any, listing: Path) -> dict[str, tuple[str, str]]:
    """Model name -> (checkpoint name, file) of every tensor in the checkpoint.

    transformers renames checkpoint keys while loading (``language_model.model.*`` becomes
    ``model.language_model.*``) and reports the new names; the renaming is undone here with its
    own rules so that a fault names the key as it stands in the file.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from a3tune.models.convert.tensor_source import TensorSource

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    origin = {}
    # The keys the shards really hold (not the keys an index claims), with their files
    for key, info in TensorSource(listing.parent).info.items():
        loaded, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        origin[loaded] = (key, info.file.name)
    return origin


def _where(key: str, origin: dict[str, tuple[str, str]]) -> str:
    name, file = origin.get(key, (key, "?"))
    return f"{file}: {name}"


def _few(what: str, items: list[str]) -> str:
    more = ", ..." if len(items) > _SHOWN else ""
    return f"{what} ({len(items)}): {', '.join(items[:_SHOWN])}{more}"
