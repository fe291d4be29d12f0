"""The adapter's configuration: one frozen dataclass tree, written next to the weights as JSON.

``adapter_config.json`` is everything ``a3tune.tune.adapters.load_adapter`` needs to rebuild the
adapter modules on a fresh base model before loading ``adapter_model.safetensors``. Values are
checked on construction, so a config read from JSON is as valid as one built in code; unknown keys
are refused rather than ignored, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

QK_MODES = ("moe", "lora", "none")
QK_PROJECTIONS = ("q_proj", "k_proj")


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _dropout(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Plain LoRA on ``targets`` of every language-model layer (reference §6: r 64, α 16)."""

    rank: int = 64
    alpha: float = 16  # delta scale = alpha / rank
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # () = no plain LoRA

    def __post_init__(self) -> None:
        _positive_int(self.rank, "lora.rank")
        _positive_number(self.alpha, "lora.alpha")
        _dropout(self.dropout, "lora.dropout")
        targets = tuple(self.targets)
        if not all(isinstance(t, str) and t for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(f"lora.targets must be distinct non-empty module names, got {self.targets!r}")
        clash = [t for t in targets if t in QK_PROJECTIONS]
        if clash:
            raise ValueError(f"lora.targets must not name {clash}: q_proj/k_proj adapters are chosen by `qk`")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", targets)


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """A³MoE on q_proj / k_proj (reference §7, DESIGN §4.4)."""

    query_experts: int = 8  # dense mixture routed on the question; 1 = plain LoRA, no router
    key_experts: int = 16  # top-k per image token
    key_top_k: int = 1
    rank: int = 16  # of every expert
    alpha: float = 8
    dropout: float = 0.05
    reference_key_gates: bool = False  # True: the reference's ungated keys (the top-k collapse to one expert)

    def __post_init__(self) -> None:
        for name in ("query_experts", "key_experts", "key_top_k", "rank"):
            _positive_int(getattr(self, name), f"moe.{name}")
        if self.key_top_k > self.key_experts:
            raise ValueError(f"moe.key_top_k ({self.key_top_k}) must not exceed moe.key_experts ({self.key_experts})")
        _positive_number(self.alpha, "moe.alpha")
        _dropout(self.dropout, "moe.dropout")
        if not isinstance(self.reference_key_gates, bool):
            raise ValueError(f"moe.reference_key_gates must be true or false, got {self.reference_key_gates!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))


def _heads(heads: Any) -> dict[int, tuple[int, ...]] | None:
    """Normalise layer -> head indices (JSON gives string keys and lists) to int keys, sorted tuples."""
    if heads is None:
        return None
    if not isinstance(heads, dict):
        raise ValueError(f"heads must be a mapping layer -> head indices or null, got {type(heads).__name__}")
    normal = {}
    for layer, indices in heads.items():
        try:
            layer_index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"heads: layer key {layer!r} is not an integer") from None
        if layer_index < 0 or isinstance(indices, str | bytes) or not hasattr(indices, "__iter__"):
            raise ValueError(f"heads[{layer!r}] must be a non-negative layer with a list of head indices, got {indices!r}")
        indices = tuple(indices)
        if not indices or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in indices):
            raise ValueError(f"heads[{layer_index}] must be a non-empty list of non-negative head indices, got {indices!r}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"heads[{layer_index}] repeats a head: {indices!r}")
        normal[layer_index] = tuple(sorted(indices))
    return dict(sorted(normal.items()))


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapters wrap which projections of the language model, and how they were trained."""

    base_model: str  # path or builder name of the base Med-LVLM
    qk: str = "moe"  # "moe" (A³MoE), "lora" (plain LoRA on q/k with `lora`'s rank: the no-MoE ablation), "none"
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    moe: MoeSpec = dataclasses.field(default_factory=MoeSpec)
    # Static head mode: q/k deltas only on these heads' output rows (layer -> heads); None = all rows.
    heads: dict[int, tuple[int, ...]] | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # free-form record (loss settings, head mode...)

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"base_model must be a non-empty string, got {self.base_model!r}")
        if self.qk not in QK_MODES:
            raise ValueError(f"qk must be one of {list(QK_MODES)}, got {self.qk!r}")
        if not isinstance(self.lora, LoraSpec) or not isinstance(self.moe, MoeSpec):
            raise ValueError("lora and moe must be LoraSpec and MoeSpec instances")
        object.__setattr__(self, "heads", _heads(self.heads))
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra is not JSON-serialisable: {error}") from None

    def to_json(self) -> str:
        record = dataclasses.asdict(self)
        if self.heads is not None:
            record["heads"] = {str(layer): list(heads) for layer, heads in self.heads.items()}
        return json.dumps(record, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Parse and validate; unknown keys (at any level) raise ``ValueError`` naming them."""
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(record).__name__}")
        record = dict(record)
        _check_keys(record, cls, "")
        if "base_model" not in record:
            raise ValueError("adapter config has no base_model")
        for name, spec in (("lora", LoraSpec), ("moe", MoeSpec)):
            if name in record:
                if not isinstance(record[name], dict):
                    raise ValueError(f"{name} must be a JSON object, got {record[name]!r}")
                _check_keys(record[name], spec, f"{name}.")
                record[name] = spec(**record[name])
        return cls(**record)


def _check_keys(record: dict, cls: type, prefix: str) -> None:
    unknown = sorted(set(record) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"adapter config has unknown keys: {[prefix + key for key in unknown]}")
