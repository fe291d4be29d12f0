"""Wrap a LLaVA model's language model with the adapters an :class:`AdapterConfig` describes; save,
load and merge them.

Every base parameter is frozen (vision tower, projector, embeddings, lm_head included); the
adapters are the only trainable parameters. Only the adapter is saved: ``adapter_model.safetensors``
(the adapter modules' parameters, by their names in the wrapped model) and ``adapter_config.json``.

Static heads (DESIGN §4.1): q_proj's delta is confined to the output rows ``[h·D, (h+1)·D)`` of
the selected heads. Keys: with one key/value head per query head, k_proj's delta is confined to
the selected heads' rows the same way. Under grouped-query attention a key/value head serves
``num_key_value_groups`` query heads, so a row delta would change unselected heads too; there the
k_proj adapter is head-scoped (``a3tune.models.key_scope``): each selected query head gets its own
adapted key, its neighbours keep the base key, and the language model is switched to the capture
attention function, which dispatches the keys (plain SDPA otherwise). Unselected heads therefore
keep their base attention exactly (except through V/O/MLP LoRA and earlier layers). A layer
without a selected head gets no q/k adapter; a configuration that would leave q/k (or the whole
adapter) without parameters is refused. :func:`apply_adapters` returns the counts for the run
record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from a3tune.io.atomic import atomic_dir
from a3tune.models.capture import enable_capture
from a3tune.models.key_scope import KeyScope
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.lora import LoraLinear
from a3tune.tune.moe import MoeKeyLinear, MoeQueryLinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
ADAPTER_TYPES = (LoraLinear, MoeQueryLinear, MoeKeyLinear)

logger = logging.getLogger(__name__)


def _language_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.model.language_model.layers
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.language_model.layers: not a LLaVA-style model") from None


def _find_linear(layer: nn.Module, target: str, index: int) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, linear) of the one nn.Linear named ``target`` in a decoder layer."""
    hits = [name for name, module in layer.named_modules() if name.rpartition(".")[2] == target and isinstance(module, nn.Linear)]
    if len(hits) != 1:
        linears = sorted(name for name, module in layer.named_modules() if isinstance(module, nn.Linear))
        raise ValueError(f"language-model layer {index}: {len(hits)} nn.Linear named {target!r}; its linear layers: {linears}")
    parent_name, _, attribute = hits[0].rpartition(".")
    return layer.get_submodule(parent_name), attribute, layer.get_submodule(hits[0])


def _head_rows(heads: tuple[int, ...], n_heads: int, head_dim: int) -> Tensor:
    """The (n_heads·head_dim,) 0/1 row mask of the given heads' output rows."""
    selected = torch.zeros(n_heads)
    selected[list(heads)] = 1
    return selected.repeat_interleave(head_dim)


def apply_adapters(model: nn.Module, config: AdapterConfig) -> dict[str, Any]:
    """Freeze the model and wrap its language model's layers as ``config`` says, in place.

    Returns counts for the run record: ``q_heads_adapted`` (query heads with a query delta),
    ``k_heads_adapted`` (query heads whose key is adapted), ``heads`` (all query heads), ``per_layer``
    (layer -> those two counts and the query/key experts of that layer) and ``trainable_parameters``.
    """
    layers = _language_layers(model)
    present = [name for name, module in model.named_modules() if isinstance(module, ADAPTER_TYPES)]
    if present:
        raise ValueError(f"model already has adapters (e.g. {present[0]}); apply_adapters to a fresh base model")
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    groups = heads // kv_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if config.heads is not None:
        bad = {layer: h for layer, h in config.heads.items() if layer >= len(layers) or max(h) >= heads}
        if bad:
            raise ValueError(f"heads {bad} out of range: the language model has {len(layers)} layers of {heads} heads")
    model.requires_grad_(False)
    lora, scoped = config.lora, False
    per_layer: dict[str, dict[str, int]] = {}
    for index, layer in enumerate(layers):
        for target in lora.targets:
            parent, attribute, linear = _find_linear(layer, target, index)
            wrapped = LoraLinear(linear, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
            setattr(parent, attribute, wrapped.train(linear.training))
        selected = tuple(range(heads)) if config.heads is None else tuple(sorted(config.heads.get(index, ())))
        if config.qk == "none" or not selected:
            continue
        q_rows = k_rows = scope = None
        if config.heads is not None:
            q_rows = _head_rows(selected, heads, head_dim)
            if groups == 1:
                k_rows = q_rows
            else:
                scope, scoped = KeyScope(selected, groups, head_dim), True
        for target, rows, moe_type in (("q_proj", q_rows, MoeQueryLinear), ("k_proj", k_rows, MoeKeyLinear)):
            parent, attribute, linear = _find_linear(layer, target, index)
            key_scope = scope if target == "k_proj" else None
            if config.qk == "lora":
                wrapped = LoraLinear(linear, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, row_mask=rows,
                                     key_scope=key_scope)  # fmt: skip
            elif key_scope is not None:
                wrapped = moe_type(linear, config.moe, key_scope=key_scope)
            else:
                wrapped = moe_type(linear, config.moe, rows)
            setattr(parent, attribute, wrapped.train(linear.training))  # new modules start in training mode
        moe = config.qk == "moe"
        per_layer[str(index)] = {"q_heads": len(selected), "k_heads": len(selected),
                                 "query_experts": config.moe.query_experts if moe else 0,
                                 "key_experts": config.moe.key_experts if moe else 0}  # fmt: skip
    if config.qk != "none" and not per_layer:
        raise ValueError(f"qk={config.qk!r} but no language-model layer has a selected head: the q/k adapters would be empty")
    if scoped:
        enable_capture(model)  # the attention function that hands each query head its scoped key
    summary = {
        "q_heads_adapted": sum(layer["q_heads"] for layer in per_layer.values()),
        "k_heads_adapted": sum(layer["k_heads"] for layer in per_layer.values()),
        "heads": len(layers) * heads,
        "key_value_groups": groups,
        "per_layer": per_layer,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if not summary["trainable_parameters"]:
        raise ValueError("the adapter configuration adds no trainable parameter (qk 'none' and no LoRA targets)")
    logger.info(
        "adapters (qk=%s): query deltas on %d/%d heads, adapted keys for %d query heads (%d query heads per key/value "
        "head), %d trainable parameters",
        config.qk, summary["q_heads_adapted"], summary["heads"], summary["k_heads_adapted"], groups,
        summary["trainable_parameters"],
    )  # fmt: skip
    return summary


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter modules' parameters (never their ``base_layer``), by name in ``model``, detached."""
    state = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            for name, parameter in module.named_parameters():
                if not name.startswith("base_layer."):
                    state[f"{module_name}.{name}"] = parameter.detach()
    return state


def save_adapter(
    model: nn.Module, config: AdapterConfig, path: str | os.PathLike, state: dict[str, Tensor] | None = None
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to the directory ``path``, atomically.

    ``state`` replaces the model's own adapter weights, e.g. the full weights an engine gathered
    under DeepSpeed ZeRO-3, where each rank's parameters are only a partition.
    """
    state = {name: tensor.contiguous().cpu() for name, tensor in (state or trainable_state_dict(model)).items()}
    if not state:
        raise ValueError(f"{type(model).__name__} has no adapters to save; call apply_adapters first")
    with atomic_dir(path) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config.to_json())


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterConfig:
    """Apply the adapter saved at ``path`` to a fresh base ``model`` and load its weights; returns its config.

    Weights are read from safetensors only: a file that is not one is refused, never unpickled.
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"adapter file not found: {file}")
    config = AdapterConfig.from_json(config_file.read_text())
    try:
        saved = load_file(weights_file)
    except SafetensorError as error:
        raise ValueError(f"{weights_file} is not a safetensors file ({error}); adapters are never loaded from pickles") from None
    apply_adapters(model, config)
    params = trainable_state_dict(model)
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not match its config on this model: missing keys {missing}, unexpected keys {unexpected}"
        )
    with torch.no_grad():
        for name, parameter in params.items():
            if saved[name].shape != parameter.shape:
                raise ValueError(
                    f"{weights_file}: {name} has shape {tuple(saved[name].shape)}, the model expects {tuple(parameter.shape)}"
                )
            parameter.copy_(saved[name])
    return config


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA (and single-expert, unrouted q MoE) layer into a plain ``nn.Linear``, in place.

    Afterwards ``model.save_pretrained`` writes a standard checkpoint. Routed MoE layers depend on the
    input and cannot be folded into a weight, nor can head-scoped keys (they add key heads): their
    presence raises before anything is changed.
    """
    routed = [
        name
        for name, module in model.named_modules()
        if isinstance(module, MoeKeyLinear) or (isinstance(module, MoeQueryLinear) and module.router is not None)
    ]
    if routed:
        raise ValueError(f"cannot merge routed MoE layers (routing depends on the input): {routed}")
    scoped = [name for name, module in model.named_modules() if isinstance(module, LoraLinear) and module.key_scope]
    if scoped:
        raise ValueError(f"cannot merge head-scoped keys (grouped-query attention) into k_proj: {scoped}")
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear | MoeQueryLinear):
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, module.merge())
