"""``a3tune convert_model``: an original LLaVA-Med folder -> a standard HF Llava folder, streamed.

The output is what ``LlavaForConditionalGeneration.save_pretrained`` plus ``LlavaProcessor``
write (safetensors shards with an index, config, fast tokenizer with the image token, PIL image
processor with the original preprocessing, chat template, generation config) and a
``provenance.json``, built in a temporary sibling and renamed into place. Every tensor of the
target model must come from the source with the right shape, and every source tensor must find a
place (``llava_med.plan_*``), checked against the model built on the meta device before any data
is read; then one output shard at a time is read, written and dropped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from a3tune.compat import ensure_torchvision
from a3tune.io.atomic import atomic_dir
from a3tune.io.provenance import Provenance
from a3tune.models.convert import llava_med
from a3tune.models.convert.shard_writer import parse_size, write_shards
from a3tune.models.convert.tensor_source import TensorSource
from a3tune.models.convert.tokenizer import chat_template, convert_tokenizer
from a3tune.models.convert.towers import Tower, resolve_tower

ensure_torchvision()

from transformers import GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, MistralConfig  # noqa: E402  # noqa: E402
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

log = logging.getLogger("a3tune")
FORMATS = tuple(llava_med.FORMATS)
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_TEXT_FIELDS = ("num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                         "rope_theta", "sliding_window", "attention_dropout")  # fmt: skip


def _layout(fmt: str, original: dict[str, Any], where: str) -> dict[str, Any]:
    """Image token, image block in the prompt, preprocessing and projector of a format's config."""
    feature = original.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(f"{where}: mm_vision_select_feature {feature!r} is not supported (a3tune needs 'patch')")
    if original.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"{where}: mm_patch_merge_type {original['mm_patch_merge_type']!r} is not supported")
    projector = original.get("mm_projector_type", "linear")
    if fmt == "llava-med-v1.5":
        if projector != "mlp2x_gelu":
            raise ValueError(f"{where}: mm_projector_type {projector!r}; LLaVA-Med v1.5 uses 'mlp2x_gelu'")
        # process_images pads to a square only for image_aspect_ratio 'pad'; otherwise the plain CLIP processor.
        preprocess = "pad" if original.get("image_aspect_ratio") == "pad" else "crop"
        return {"image_token": "<image>", "image_block": "<image>", "preprocess": preprocess, "act": "gelu",
                "select_layer": llava_med.require(original, "mm_vision_select_layer", where)}  # fmt: skip
    if projector != "linear":
        raise ValueError(f"{where}: mm_projector_type {projector!r}; LLaVA-Med v1 uses one Linear")
    block = "<im_start><im_patch><im_end>" if original.get("mm_use_im_start_end") else "<im_patch>"
    return {"image_token": "<im_patch>", "image_block": block, "preprocess": "crop", "act": "linear",
            "select_layer": original.get("mm_vision_select_layer", -1)}  # fmt: skip


def _text_config(fmt: str, original: dict[str, Any], vocab: int, tokenizer, where: str):
    fields = {name: llava_med.require(original, name, where) for name in _TEXT_FIELDS}
    fields.update({name: original[name] for name in _OPTIONAL_TEXT_FIELDS if original.get(name) is not None})
    if fmt == "llava-med-v1.5" and "sliding_window" in original:
        fields["sliding_window"] = original["sliding_window"]  # null is meaningful: no sliding window
    cls = MistralConfig if fmt == "llava-med-v1.5" else LlamaConfig
    # Special-token ids come from the tokenizer: some v1 configs say bos 0 / eos 1, which LLaMA's are not.
    return cls(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)  # fmt: skip


def _check_plan(plan: llava_med.TensorPlan, model: LlavaForConditionalGeneration) -> None:
    """Every model tensor planned with its shape, nothing else: raise naming the files and keys otherwise.

    A renamed tensor shows on both sides (a source tensor with no place, a model tensor with no
    source), so both lists go into one message.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    extra = sorted(set(plan.tensors) - set(expected))
    if extra:
        problems.append(f"{len(extra)} source tensor(s) with no place in the model: "
                        + "; ".join(f"{plan.tensors[k][3]} (as {k})" for k in extra[:5]))  # fmt: skip
    missing = sorted(set(expected) - set(plan.tensors))
    if missing:
        problems.append(f"no source tensor for {len(missing)} model tensor(s): {missing[:5]}")
    if problems:
        raise ValueError("; ".join(problems))
    for key, (_, shape, _, origin) in plan.tensors.items():
        if shape != expected[key]:
            raise ValueError(f"{origin}: shape {shape}, but the model's {key} is {expected[key]}")


def _disk_names(model: LlavaForConditionalGeneration, keys) -> dict[str, str]:
    """Model key -> the name ``save_pretrained`` gives it on disk (transformers' own reverse mapping)."""
    marks = {key: torch.empty(0) for key in keys}
    renamed = revert_weight_conversion(model, dict(marks))
    owner = {id(t): key for key, t in marks.items()}
    return {owner[id(t)]: name for name, t in renamed.items()}


def _processor(tower: Tower, tokenizer, layout: dict[str, Any], template: str) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=tower.image_processor(layout["preprocess"]),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=template,
        image_token=layout["image_token"],
        num_additional_image_tokens=1,
    )


def convert_model(
    fmt: str,
    source: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    vision_tower: str | Path | None = None,
    chat_mode: str = "vicuna_v1",
    max_shard_size: str | int = "2GB",
    progress: bool = True,
) -> Path:
    """Convert an original LLaVA-Med folder (``fmt``: llava-med-v1.5 or llava-med-v1) into ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    source, out = Path(source), Path(out)
    if (fmt == "llava-med-v1") != (base is not None):
        raise ValueError("--base (the local LLaMA-7B the delta is added to) is required for llava-med-v1 only")
    where = str(source / "config.json")
    if fmt == "llava-med-v1" and vision_tower is None:
        raise ValueError("LLaVA-Med v1 does not carry its vision tower: pass --vision-tower DIR "
                         "(a local copy of openai/clip-vit-large-patch14)")  # fmt: skip
    original = llava_med.read_original_config(source, fmt)
    layout = _layout(fmt, original, where)
    tower = resolve_tower(original["mm_vision_tower"], vision_tower)
    if original.get("mm_hidden_size", tower.config.hidden_size) != tower.config.hidden_size:
        raise ValueError(f"{where}: mm_hidden_size {original['mm_hidden_size']} differs from the tower's "
                         f"hidden_size {tower.config.hidden_size} ({tower.source})")  # fmt: skip
    vocab = llava_med.require(original, "vocab_size", where)
    tokenizer, image_token_id = convert_tokenizer(source, vocab_size=vocab, image_token=layout["image_token"])
    text = _text_config(fmt, original, len(tokenizer), tokenizer, where)
    grid = tower.config.image_size // tower.config.patch_size
    config = LlavaConfig(vision_config=tower.config, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=layout["select_layer"], vision_feature_select_strategy="default",
                         projector_hidden_act=layout["act"], multimodal_projector_bias=True,
                         image_seq_length=grid * grid, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["LlavaForConditionalGeneration"]

    if fmt == "llava-med-v1.5":
        plan = llava_med.plan_v15(TensorSource(source), tower, len(tokenizer) - vocab)
    else:
        plan = llava_med.plan_v1(TensorSource(source), TensorSource(base), tower, text.hidden_size)
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    _check_plan(plan, skeleton)
    names = _disk_names(skeleton, plan.tensors)
    dtype = plan.tensors["model.language_model.embed_tokens.weight"][2]
    config.dtype = text.dtype = str(dtype).removeprefix("torch.")

    model_key = {names[k]: k for k in plan.tensors}

    def expect(disk_key: str, tensor: torch.Tensor) -> None:
        _, shape, want, origin = plan.tensors[model_key[disk_key]]
        if tuple(tensor.shape) != shape or tensor.dtype != want:
            raise ValueError(f"{origin}: read {tuple(tensor.shape)} {tensor.dtype}, its header said {shape} {want}")

    shard_plan = [(names[k], math.prod(shape) * dt.itemsize, produce) for k, (produce, shape, dt, _) in plan.tensors.items()]
    template = chat_template(chat_mode, layout["image_block"])
    processor = _processor(tower, tokenizer, layout, template)
    inputs = {"source": source, **({"base": base} if base else {}), **({"vision_tower": vision_tower} if vision_tower else {})}
    provenance = Provenance.for_inputs("convert_model", {
        "format": fmt, "chat_template": chat_mode, "vision_tower": tower.source, "preprocess": layout["preprocess"],
        "image_token": layout["image_token"], "image_token_id": image_token_id, "image_block": layout["image_block"],
        "embedding_rows_added": len(tokenizer) - vocab, "tokenizer": "fast, converted from tokenizer.model (legacy=True)",
        "dtype": config.dtype, "dropped_buffers": sorted(plan.dropped), "max_shard_size": str(max_shard_size),
        **plan.notes}, inputs)  # fmt: skip
    with atomic_dir(out) as tmp:
        write_shards(tmp, shard_plan, max_bytes=parse_size(max_shard_size), expect=expect, progress=progress)
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # The image token is a placeholder for image features: generating it would break the next step.
        GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                         suppress_tokens=[image_token_id]).save_pretrained(tmp)  # fmt: skip
        (tmp / "provenance.json").write_text(json.dumps(json.loads(provenance.to_json()), indent=2) + "\n")
    log.info("convert_model: %s %s -> %s (%d tensors, %d buffers dropped)", fmt, source, out, len(plan.tensors),
             len(plan.dropped))  # fmt: skip
    return out

