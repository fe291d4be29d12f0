"""Head-scoped keys: an adapted key for some query heads of a grouped-query attention layer.

Under grouped-query attention (Mistral-7B: 32 query heads share 8 key/value heads) a k_proj row
belongs to a key/value head, so a delta on it changes the attention of every query head of its
group. Static head mode (DESIGN §4.1) adapts the selected query heads only; their unselected
neighbours must keep the base key. So a scoped k_proj returns its base output followed by one extra
key head per selected query head: ``[W x (kv heads) | W_g(h) x + Δ_h(x) (selected heads)]``. The
attention module views and rotates these like any key head (RoPE and per-head norms act on each
head alone), the KV cache stores them, and the attention function (``a3tune.models.capture``)
hands each query head its own key: the extra one for a selected head, its group's for the others.

A :class:`KeyScope` describes the extra heads; the k_proj wrapper exposes it as ``key_scope`` and
:func:`scoped_attention_inputs` reads it from the attention module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class KeyScope:
    """The selected query heads (ascending) of one layer whose keys are adapted, and the layer's geometry."""

    heads: tuple[int, ...]
    groups: int  # query heads per key/value head
    head_dim: int

    def __post_init__(self) -> None:
        if not self.heads or list(self.heads) != sorted(set(self.heads)):
            raise ValueError(f"KeyScope heads must be distinct, ascending and non-empty, got {self.heads}")
        if self.groups < 2:
            raise ValueError(f"KeyScope is for grouped-query attention (groups >= 2), got groups={self.groups}")

    @property
    def out_features(self) -> int:
        """Width of the adapted keys: one head_dim block per selected head."""
        return len(self.heads) * self.head_dim

    def extend(self, base: Tensor, delta: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """``[base | base's group key of each selected head + delta]`` along the last dimension.

        ``base``: (B, N, kv·D) k_proj output. ``delta``: (B, N, out_features) or, with ``index``
        (B, n) positions, (B, n, out_features) added at those positions only; None: no delta
        (a decode step past the adapted positions).
        """
        groups_of = torch.tensor(self.heads, device=base.device) // self.groups
        shared = base.unflatten(-1, (-1, self.head_dim)).index_select(-2, groups_of).flatten(-2)
        if delta is not None and index is None:
            shared = shared + delta
        elif delta is not None:
            shared = shared.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, shared.shape[-1]), delta)
        return torch.cat([base, shared], dim=-1)


class _Ungrouped:
    """Stands for an attention module whose keys and values are already one per query head."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self.is_causal = getattr(module, "is_causal", True)
        self.layer_idx = getattr(module, "layer_idx", None)


def key_scope(module: nn.Module) -> KeyScope | None:
    """The :class:`KeyScope` of an attention module's k_proj, or None (plain keys)."""
    return getattr(getattr(module, "k_proj", None), "key_scope", None)


def scoped_attention_inputs(module: nn.Module, key: Tensor, value: Tensor) -> tuple[Any, Tensor, Tensor]:
    """(module, key, value) for an attention function; with scoped keys, one key and value per query head.

    Without a scope the inputs are returned as they are. With one, ``key`` holds the kv heads then
    the extra heads (B, kv + n_sel, N, D): each query head gets its group's key, a selected head its
    extra key; values are repeated per group; the returned stand-in module has no groups, so
    transformers' attention functions do not repeat them again.
    """
    scope = key_scope(module)
    if scope is None:
        return module, key, value
    kv_heads = value.shape[1]
    heads = kv_heads * scope.groups
    if key.shape[1] != kv_heads + len(scope.heads):
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: {key.shape[1]} key heads, expected {kv_heads} + "
            f"{len(scope.heads)} scoped ones: was the cache filled by a model without these adapters?"
        )
    source = torch.arange(heads, device=key.device) // scope.groups
    source[list(scope.heads)] = torch.arange(kv_heads, kv_heads + len(scope.heads), device=key.device)
    return _Ungrouped(module), key.index_select(1, source), value.repeat_interleave(scope.groups, dim=1)
