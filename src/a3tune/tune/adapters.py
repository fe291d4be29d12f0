"""Wrap a LLaVA model's language model with the adapters an :class:`AdapterConfig` describes; save,
load and merge them.

Every base parameter is frozen (vision tower, projector, embeddings, lm_head included); the
adapters are the only trainable parameters. Only the adapter is saved: ``adapter_model.safetensors``
(the adapter modules' parameters, by their names in the wrapped model) and ``adapter_config.json``.

Static heads (DESIGN §4.1): q_proj's delta is confined to the output rows ``[h·D, (h+1)·D)`` of
the selected heads. A key/value head is shared by ``num_key_value_groups`` consecutive query heads
(grouped-query attention), so changing its k rows changes the attention of all of them: k_proj gets
a delta only on the KV heads whose query heads are *all* selected. Unselected heads therefore keep
their base attention exactly (except through V/O/MLP LoRA and earlier layers); the number of KV
heads that got a delta is logged and returned by :func:`apply_adapters`. A layer without any
selected head, or without any fully selected KV head, gets no q (k) adapter at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from a3tune.io.atomic import atomic_dir
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


def _row_masks(selected: tuple[int, ...], heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """q and k row masks for the selected query heads of one layer (see the module docstring)."""
    groups = heads // kv_heads
    q_heads = torch.zeros(heads)
    q_heads[list(selected)] = 1
    kv_full = q_heads.view(kv_heads, groups).all(dim=1).float()
    return q_heads.repeat_interleave(head_dim), kv_full.repeat_interleave(head_dim)


def apply_adapters(model: nn.Module, config: AdapterConfig) -> dict[str, int]:
    """Freeze the model and wrap its language model's layers as ``config`` says, in place.

    Returns counts for the run record: ``q_heads_with_delta``/``q_heads`` and
    ``kv_heads_with_delta``/``kv_heads`` (all layers), and ``trainable_parameters``.
    """
    layers = _language_layers(model)
    present = [name for name, module in model.named_modules() if isinstance(module, ADAPTER_TYPES)]
    if present:
        raise ValueError(f"model already has adapters (e.g. {present[0]}); apply_adapters to a fresh base model")
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if config.heads is not None:
        bad = {layer: h for layer, h in config.heads.items() if layer >= len(layers) or max(h) >= heads}
        if bad:
            raise ValueError(f"heads {bad} out of range: the language model has {len(layers)} layers of {heads} heads")
    model.requires_grad_(False)
    summary = {
        "q_heads_with_delta": 0,
        "q_heads": len(layers) * heads,
        "kv_heads_with_delta": 0,
        "kv_heads": len(layers) * kv_heads,
    }
    lora = config.lora
    for index, layer in enumerate(layers):
        for target in lora.targets:
            parent, attribute, linear = _find_linear(layer, target, index)
            wrapped = LoraLinear(linear, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
            setattr(parent, attribute, wrapped.train(linear.training))
        if config.qk == "none":
            continue
        q_mask = k_mask = None
        if config.heads is not None:
            q_mask, k_mask = _row_masks(config.heads.get(index, ()), heads, kv_heads, head_dim)
        sides = (("q_proj", q_mask, MoeQueryLinear, "q_heads", heads), ("k_proj", k_mask, MoeKeyLinear, "kv_heads", kv_heads))
        for target, mask, moe_type, count, per_layer in sides:
            if mask is not None and not bool(mask.any()):
                continue
            summary[f"{count}_with_delta"] += per_layer if mask is None else int(mask.sum()) // head_dim
            parent, attribute, linear = _find_linear(layer, target, index)
            if config.qk == "lora":
                wrapped = LoraLinear(linear, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, row_mask=mask)
            else:
                wrapped = moe_type(linear, config.moe, mask)
            setattr(parent, attribute, wrapped.train(linear.training))  # new modules start in training mode
    summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "adapters (qk=%s): q deltas on %d/%d heads, k deltas on %d/%d KV heads, %d trainable parameters",
        config.qk,
        summary["q_heads_with_delta"],
        summary["q_heads"],
        summary["kv_heads_with_delta"],
        summary["kv_heads"],
        summary["trainable_parameters"],
    )
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
    input and cannot be folded into a weight: their presence raises before anything is changed.
    """
    routed = [
        name
        for name, module in model.named_modules()
        if isinstance(module, MoeKeyLinear) or (isinstance(module, MoeQueryLinear) and module.router is not None)
    ]
    if routed:
        raise ValueError(f"cannot merge routed MoE layers (routing depends on the input): {routed}")
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear | MoeQueryLinear):
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, module.merge())
