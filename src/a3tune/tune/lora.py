"""Plain LoRA around a frozen linear layer, optionally confined to some output rows.

``y = W x + s·B A dropout(x) ⊙ row_mask`` with ``s = alpha / rank``. The row mask is how static
head mode (DESIGN §4.1) keeps unselected attention heads exactly as they were: a head owns a block
of q_proj / k_proj output rows, and a zero in the mask makes that row's delta exactly zero, in the
output and in ``delta_weight``, whatever A and B become. On a grouped-query k_proj a ``key_scope``
replaces the row mask: the delta becomes extra key heads for the selected query heads only
(``a3tune.models.key_scope``); such a layer cannot be merged into a plain k_proj.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from a3tune.models.key_scope import KeyScope


def check_row_mask(row_mask: Tensor | None, out_features: int) -> Tensor | None:
    """A (out_features,) 0/1 float mask, or None (all rows)."""
    if row_mask is None:
        return None
    if row_mask.shape != (out_features,):
        raise ValueError(f"row_mask must have shape ({out_features},), got {tuple(row_mask.shape)}")
    if not bool(((row_mask == 0) | (row_mask == 1)).all()):
        raise ValueError("row_mask must hold only 0 and 1")
    return row_mask.detach().clone().float()


class LoraLinear(nn.Module):
    """A frozen ``base_layer`` plus a trainable low-rank delta (A Kaiming-uniform, B zero)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        row_mask: Tensor | None = None,
        key_scope: KeyScope | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if row_mask is not None and key_scope is not None:
            raise ValueError("LoraLinear: give a row mask or a key scope, not both")
        self.key_scope = key_scope
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        weight = base_layer.weight
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        out_features = key_scope.out_features if key_scope else base_layer.out_features
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        mask = check_row_mask(row_mask, base_layer.out_features)
        # Derived from the adapter config, so not part of the saved state.
        self.register_buffer("row_mask", None if mask is None else mask.to(weight.device, weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        delta = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale
        if self.key_scope is not None:
            return self.key_scope.extend(self.base_layer(x), delta)
        if self.row_mask is not None:
            delta = delta * self.row_mask
        return self.base_layer(x) + delta

    def delta_weight(self) -> Tensor:
        """The (out, in) change this adapter makes to ``base_layer.weight`` (row mask applied)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale
        if self.row_mask is not None:
            delta = delta * self.row_mask[:, None]
        return delta

    def merge(self) -> nn.Linear:
        """A plain, frozen ``nn.Linear`` computing base + delta (dropout off), for a standard checkpoint."""
        if self.key_scope is not None:
            raise ValueError("cannot merge head-scoped keys into k_proj: its query heads share a key/value head")
        return merged_linear(self.base_layer, self.delta_weight())


def merged_linear(base: nn.Linear, delta: Tensor) -> nn.Linear:
    """A new frozen ``nn.Linear`` with ``base``'s weight plus ``delta`` and ``base``'s bias."""
    weight = base.weight
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight + delta.to(weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged.requires_grad_(False)
