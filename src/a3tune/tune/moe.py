"""A³MoE: mixtures of LoRA experts on q_proj and k_proj (reference §7, DESIGN §4.4).

Query side (:class:`MoeQueryLinear`): one gate vector per sample and layer, the softmax of a router
applied to the mean of the layer's input over the sample's question tokens; every token gets
``W x + Σ_e g_e E_e(x)``. Key side (:class:`MoeKeyLinear`): a router per image token, top-k experts,
``W x + Σ_{e∈top-k} g_e E_e(x)`` at image positions and ``W x`` everywhere else. The gates are
straight-through (DESIGN §4.4): forward ``g_e = 1`` for a chosen expert, as the reference's
output, while the gradient flows through the router probability ``p_e``, so the key router learns
from the task losses; with 16 experts a gate of ``p_e`` itself would scale the delta by ~1/16 at
initialisation. ``reference_key_gates`` restores the reference's assignment, where only the
highest-index chosen expert survives and the router gets no gradient. Under grouped-query
attention with static heads the key delta is head-scoped (``a3tune.models.key_scope``).

The routing inputs (question span, image positions) are per batch, not per layer, so they reach
the layers through a ``ContextVar`` set by :func:`routing`, as ``a3tune.models.capture`` does for
attention capture. The block's :class:`RoutingState` collects what the losses and the train log
need, and caches the query gates of a generation's prefill for its decode steps.

Prefill and decode are told apart by the input length: a forward whose input reaches past the
question (query layers) or the last image token (key layers) routes; a shorter one (a decode step,
length 1) reuses the query gates cached at prefill and applies ``W x`` alone to keys, whose image
entries are already in the KV cache. Routing inputs with batch B also serve inputs with batch
B·n (beam search repeats each sample n times, consecutively).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from a3tune.context_value import bound
from a3tune.models.key_scope import KeyScope
from a3tune.tune.adapter_config import MoeSpec
from a3tune.tune.lora import check_row_mask, merged_linear


class LoraExperts(nn.Module):
    """E LoRA deltas with stacked parameters, A (E, r, in) and B (E, out, r), mixed by per-token weights.

    All experts share one dropout mask of the input. The mixture costs two matmuls of width E·r
    whatever the weights, and an expert with weight 0 gets no gradient.
    """

    def __init__(
        self, base_layer: nn.Linear, *, experts: int, rank: int, alpha: float, dropout: float, out_features: int | None = None
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        out_features = out_features or base_layer.out_features
        self.experts, self.rank, self.scale = experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(experts, rank, base_layer.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, device=weight.device, dtype=weight.dtype))
        for a in self.lora_A.data:  # per expert, so that fan_in is in_features
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """``s Σ_e w_e B_e A_e dropout(x)``; x (..., in), weights (..., E) broadcastable to x's leading dims."""
        hidden = F.linear(self.dropout(x), self.lora_A.flatten(0, 1))  # (..., E·r)
        hidden = (hidden.unflatten(-1, (self.experts, self.rank)) * weights.unsqueeze(-1)).flatten(-2)
        return F.linear(hidden, self.lora_B.transpose(0, 1).flatten(1)) * self.scale

    def delta_weight(self) -> Tensor:
        """(E, out, in): each expert's change to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale


@dataclasses.dataclass(frozen=True)
class _KeyRouting:
    probs: Tensor  # (B, E) router softmax, mean over image tokens
    chosen: Tensor  # (B, E) top-k indicator, mean over image tokens (no gradient)
    entropy: Tensor  # scalar mean routing entropy over samples and image tokens


@dataclasses.dataclass(eq=False)
class RoutingState:
    """Routing inputs of one batch and what the MoE layers computed from them in this block."""

    question_span: Tensor  # (B, 2) long [start, end)
    image_index: Tensor  # (B, n_img) long
    query_gates: dict[nn.Module, Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, E_q)
    key_routing: dict[nn.Module, _KeyRouting] = dataclasses.field(default_factory=dict)

    def balance_loss(self) -> Tensor:
        """(B,) load-balancing loss Σ_e mean(p_e)·mean(c_e), means over key layers × image tokens (no ×E)."""
        records = self._key_records()
        probs = torch.stack([r.probs for r in records]).mean(0)
        chosen = torch.stack([r.chosen for r in records]).mean(0)
        return (probs * chosen).sum(-1)

    def entropy(self) -> Tensor:
        """Scalar mean entropy of the key routers' softmax, over layers, samples and image tokens."""
        return torch.stack([r.entropy for r in self._key_records()]).mean()

    def _key_records(self) -> list[_KeyRouting]:
        if not self.key_routing:
            raise RuntimeError("no MoE key layer routed in this routing block (qk is not 'moe', or no forward ran)")
        return list(self.key_routing.values())


_STATE: contextvars.ContextVar[RoutingState | None] = contextvars.ContextVar("a3tune_moe_routing", default=None)


@contextlib.contextmanager
def routing(question_span: Tensor, image_index: Tensor) -> Iterator[RoutingState]:
    """Give the MoE layers a batch's routing inputs (``layout.Batch.question_span`` / ``.image_index``)
    for the forward passes (and generate calls) inside the block; blocks cannot be nested."""
    if _STATE.get() is not None:
        raise RuntimeError("routing blocks cannot be nested: one set of routing inputs per forward pass")
    if question_span.ndim != 2 or question_span.shape[1] != 2 or question_span.dtype != torch.long:
        raise ValueError(
            f"question_span must be a (batch, 2) long tensor, got {tuple(question_span.shape)} {question_span.dtype}"
        )
    if image_index.ndim != 2 or image_index.dtype != torch.long or image_index.shape[0] != question_span.shape[0]:
        raise ValueError(
            f"image_index must be a ({question_span.shape[0]}, n_img) long tensor to match question_span, "
            f"got {tuple(image_index.shape)} {image_index.dtype}"
        )
    if bool((question_span[:, 1] <= question_span[:, 0]).any()):
        raise ValueError(f"question_span has an empty span: {question_span.tolist()}")
    with activate(RoutingState(question_span=question_span, image_index=image_index)) as state:
        yield state


def activate(state: RoutingState | None) -> contextlib.AbstractContextManager[RoutingState | None]:
    """Make ``state`` the current routing state for a block (None: none)."""
    return bound(_STATE, state)


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for non-reentrant activation checkpointing: a recompute (possibly on another
    thread, or after the block ended) routes with the state that was current at the original forward.
    Combine with ``a3tune.models.capture.checkpoint_context`` when both are in use."""
    return contextlib.nullcontext(), activate(_STATE.get())


def _current(layer: nn.Module) -> RoutingState:
    state = _STATE.get()
    if state is None:
        raise RuntimeError(
            f"{type(layer).__name__}: routing inputs missing; run the model inside "
            "a3tune.tune.moe.routing(batch.question_span, batch.image_index)"
        )
    return state


def _rows(routing_input: Tensor, batch: int, device: torch.device) -> Tensor:
    """Routing inputs for an input batch of ``batch`` rows: as is, or each row repeated (beam search)."""
    rows = routing_input.shape[0]
    if batch % rows:
        raise ValueError(f"routing inputs describe {rows} samples but the layer input has batch {batch}")
    return routing_input.repeat_interleave(batch // rows, dim=0).to(device)


class MoeQueryLinear(nn.Module):
    """q_proj with a dense mixture of LoRA experts gated per sample by the question; E_q = 1 is a plain LoRA."""

    def __init__(self, base_layer: nn.Linear, spec: MoeSpec, row_mask: Tensor | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.experts = LoraExperts(base_layer, experts=spec.query_experts, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout)
        weight = base_layer.weight
        self.router = None
        if spec.query_experts > 1:
            self.router = nn.Linear(base_layer.in_features, spec.query_experts, device=weight.device, dtype=weight.dtype)
        mask = check_row_mask(row_mask, base_layer.out_features)
        self.register_buffer("row_mask", None if mask is None else mask.to(weight.device, weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.router is None:
            gates = x.new_ones(x.shape[0], 1)
        else:
            gates = self._gates(x).to(x.dtype)
        delta = self.experts(x, gates[:, None, :])
        if self.row_mask is not None:
            delta = delta * self.row_mask
        return self.base_layer(x) + delta

    def _gates(self, x: Tensor) -> Tensor:
        """(B, E_q) softmax gates: routed on a full input, cached ones on a decode step."""
        state = _current(self)
        span = _rows(state.question_span, x.shape[0], x.device)
        if x.shape[1] < int(span[:, 1].max()):
            if self not in state.query_gates:
                raise RuntimeError(
                    f"MoeQueryLinear: input of {x.shape[1]} tokens does not reach the question's end and no "
                    "gates were cached by a prefill in this routing block"
                )
            return state.query_gates[self]
        positions = torch.arange(x.shape[1], device=x.device)
        in_question = ((positions >= span[:, :1]) & (positions < span[:, 1:])).to(x.dtype)  # (B, N)
        mean = (in_question.unsqueeze(-1) * x).sum(1) / in_question.sum(1, keepdim=True)
        gates = torch.softmax(self.router(mean).float(), dim=-1)
        state.query_gates[self] = gates
        return gates

    def delta_weight(self) -> Tensor:
        """(E_q, out, in): each expert's change to the base weight, row mask applied."""
        delta = self.experts.delta_weight()
        return delta if self.row_mask is None else delta * self.row_mask[:, None]

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` for a single-expert (unrouted) layer; a routed layer cannot be merged."""
        if self.router is not None:
            raise ValueError(f"cannot merge a routed MoeQueryLinear ({self.experts.experts} experts): gates depend on the input")
        return merged_linear(self.base_layer, self.delta_weight()[0])


class MoeKeyLinear(nn.Module):
    """k_proj with top-k LoRA experts routed per image token; other positions are ``W x`` exactly.

    ``row_mask`` confines the delta to some output rows (key heads); ``key_scope`` instead appends
    one adapted key per selected query head (grouped-query attention, see ``a3tune.models.key_scope``).
    """

    def __init__(
        self, base_layer: nn.Linear, spec: MoeSpec, row_mask: Tensor | None = None, key_scope: KeyScope | None = None
    ) -> None:
        super().__init__()
        if row_mask is not None and key_scope is not None:
            raise ValueError("MoeKeyLinear: give a row mask or a key scope, not both")
        self.base_layer = base_layer.requires_grad_(False)
        self.key_scope = key_scope
        self.experts = LoraExperts(base_layer, experts=spec.key_experts, rank=spec.rank, alpha=spec.alpha,
                                   dropout=spec.dropout, out_features=key_scope.out_features if key_scope else None)  # fmt: skip
        weight = base_layer.weight
        self.router = nn.Linear(base_layer.in_features, spec.key_experts, device=weight.device, dtype=weight.dtype)
        self.top_k = spec.key_top_k
        self.reference_gates = spec.reference_key_gates
        mask = check_row_mask(row_mask, base_layer.out_features)
        self.register_buffer("row_mask", None if mask is None else mask.to(weight.device, weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        state = _current(self)
        out = self.base_layer(x)
        index = _rows(state.image_index, x.shape[0], x.device)
        if x.shape[1] <= int(index.max()):  # decode step: the image keys are in the KV cache already
            if self not in state.key_routing:
                raise RuntimeError(
                    f"MoeKeyLinear: input of {x.shape[1]} tokens does not reach the image tokens and no prefill "
                    "routed them in this routing block"
                )
            return out if self.key_scope is None else self.key_scope.extend(out)
        image_x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, n_img, in)
        weights = self._route(state, image_x)
        delta = self.experts(image_x, weights.to(x.dtype))
        if self.key_scope is not None:
            return self.key_scope.extend(out, delta, index)
        if self.row_mask is not None:
            delta = delta * self.row_mask
        return out.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), delta)

    def _route(self, state: RoutingState, image_x: Tensor) -> Tensor:
        """(B, n_img, E) expert weights; records the routing statistics in ``state``."""
        probs = torch.softmax(self.router(image_x).float(), dim=-1)
        top = probs.topk(self.top_k, dim=-1).indices
        chosen = torch.zeros_like(probs).scatter(-1, top, 1.0)
        state.key_routing[self] = _KeyRouting(
            probs=probs.mean(1), chosen=chosen.mean(1), entropy=torch.special.entr(probs).sum(-1).mean()
        )
        if self.reference_gates:
            # The reference assigns each chosen expert's output in ascending expert order, ungated.
            return F.one_hot(top.max(-1).values, probs.shape[-1]).to(probs.dtype)
        picked = probs.gather(-1, top)
        return torch.zeros_like(probs).scatter(-1, top, picked - picked.detach() + 1)  # straight-through: 1 forward

    def delta_weight(self) -> Tensor:
        """(E_k, out, in): each expert's change to the base weight at image positions, row mask applied.

        With a key scope, ``out`` is the scoped heads' width (the extra keys' change to their group's key).
        """
        delta = self.experts.delta_weight()
        return delta if self.row_mask is None else delta * self.row_mask[:, None]
