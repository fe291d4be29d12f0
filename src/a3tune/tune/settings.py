"""The settings of one tuning run: a data set preset, a method preset and the config's overrides.

Presets are data (``presets/datasets.yaml``: the reference's numbers per data set;
``presets/methods.yaml``: A³Tune, the plain-LoRA baseline and the ablations). A run's settings are
the data set preset, updated by its block for the run's backbone, by the method preset, then by
``tune.overrides`` from the config; an unknown key anywhere is an error naming it.

Backbones: the reference tuned LLaVA-Med v1 (LLaMA-7B) and v1.5 (Mistral-7B) with different
numbers for some data sets (VQA-RAD: λ 0.06 with the KL loss on v1, 0.09 with the inside-mass loss
on v1.5). The numbers belong to the backbone being tuned, so a data set preset holds v1's values
and a ``backbones`` block with what v1.5 changes; ``backbone_of`` tells the backbone from a model's
config, so that a configured checkpoint gets its own numbers without a setting to keep in step.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PRESETS = Path(__file__).parent / "presets"
QK_MODES = ("moe", "lora", "none")
HEAD_MODES = ("static", "dynamic", "all", "none")
LOSSES = ("inside", "kl")
TRAIN_IMAGES = ("original", "cue_shuffled")
BACKBONES = ("llava-med-v1", "llava-med-v1.5")
# The backbone of a model, by its language model's ``model_type``: LLaVA-Med v1 is LLaMA-7B (a
# converted v1 checkpoint's text config is a LlamaConfig), v1.5 is Mistral-7B.
BACKBONE_OF_TEXT_MODEL = {"llama": "llava-med-v1", "mistral": "llava-med-v1.5"}


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """Everything a tuning run needs besides its inputs; each field documented in the presets' YAML."""

    qk: str = dataclasses.field(default="moe", metadata={"help": f"q/k adaptation, one of {QK_MODES}"})
    heads: str = dataclasses.field(default="static", metadata={"help": f"supervised heads, one of {HEAD_MODES}"})
    align: bool = dataclasses.field(default=True, metadata={"help": "add the attention-alignment loss"})
    loss: str = dataclasses.field(default="inside", metadata={"help": f"alignment loss variant, one of {LOSSES}"})
    lam: float = dataclasses.field(default=0.03, metadata={"help": "weight of the alignment loss (λ)"})
    beta: float = dataclasses.field(default=0.0, metadata={"help": "weight of the MoE load-balancing loss (β)"})
    heads_top_k: float = dataclasses.field(default=128, metadata={"help": "K for dynamic heads: a count or a fraction"})
    lora: dict = dataclasses.field(default_factory=dict, metadata={"help": "LoRA rank, alpha, dropout on V/O/MLP"})
    moe: dict = dataclasses.field(default_factory=dict, metadata={"help": "A³MoE experts, top-k, rank, alpha"})
    train_images: str = dataclasses.field(
        default="original", metadata={"help": f"{TRAIN_IMAGES}: the samples' images, or the phantom's cue-shuffled "
                                              "twins (the cue at chance; a sample's image_cue_shuffled)"})  # fmt: skip
    epochs: float = dataclasses.field(default=1, metadata={"help": "passes over the training split"})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "cap on optimizer steps (None: none)"})
    lr: float = 2e-4
    warmup: float = 0.03
    weight_decay: float = 0.0
    global_batch: int = dataclasses.field(default=32, metadata={"help": "samples per optimizer step, all ranks"})
    micro_batch: int = dataclasses.field(default=1, metadata={"help": "samples per forward pass and rank"})
    checkpoint_every: int = dataclasses.field(default=100, metadata={"help": "optimizer steps between checkpoints"})
    keep_checkpoints: int = 3
    precision: str = dataclasses.field(default="auto", metadata={"help": "fp32, bf16, or auto (bf16 on CUDA)"})
    backend: str = dataclasses.field(default="auto", metadata={"help": "torch, deepspeed, or auto (deepspeed on CUDA)"})
    zero_stage: int = dataclasses.field(default=2, metadata={"help": "DeepSpeed ZeRO stage (2 or 3)"})
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.qk in QK_MODES, f"qk must be one of {QK_MODES}, got {self.qk!r}"),
            (self.heads in HEAD_MODES, f"heads must be one of {HEAD_MODES}, got {self.heads!r}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.train_images in TRAIN_IMAGES, f"train_images must be one of {TRAIN_IMAGES}, got {self.train_images!r}"),
            (not self.align or self.heads != "none", "align: true needs heads static, dynamic or all"),
            (self.lam >= 0 and self.beta >= 0, f"lam and beta must be >= 0, got {self.lam}, {self.beta}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.global_batch >= self.micro_batch >= 1, f"need global_batch >= micro_batch >= 1, got "
                                                         f"{self.global_batch}, {self.micro_batch}"),
            (self.micro_batch < 1 or self.global_batch % self.micro_batch == 0, "global_batch must be a multiple of "
                                                                                "micro_batch"),
            (self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every, keep_checkpoints >= 1"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision: auto, fp32 or bf16, got {self.precision!r}"),
            (self.backend in ("auto", "torch", "deepspeed"), f"backend: auto, torch or deepspeed, got {self.backend!r}"),
            (self.zero_stage in (2, 3), f"zero_stage must be 2 or 3, got {self.zero_stage}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"tune settings: {message}")

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank, so that one step sees ``global_batch`` samples."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(f"tune settings: global_batch {self.global_batch} is not a multiple of micro_batch "
                             f"{self.micro_batch} x {world_size} ranks")  # fmt: skip
        return self.global_batch // per_step

    def total_steps(self, n_samples: int) -> int:
        steps = max(1, math.ceil(self.epochs * n_samples / self.global_batch))
        return min(steps, self.max_steps) if self.max_steps else steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@cache
def _presets(name: str) -> dict[str, dict]:
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}


def dataset_presets() -> list[str]:
    return sorted(_presets("datasets"))


def method_presets() -> list[str]:
    return sorted(_presets("methods"))


def backbone_of(model_config: Any) -> str:
    """The backbone (``BACKBONES``) of a model, from its HF config: a ``LlavaConfig``, or any config with
    ``get_text_config()``, read before the weights load.

    The language model decides, because the reference's two sets of numbers are per language model:
    ``mistral`` is LLaVA-Med v1.5, ``llama`` is v1 (and so is any other LLaMA-based LLaVA, which then
    gets v1's numbers). Anything else has no reference numbers: the error asks for ``tune.backbone``.
    """
    model_type = getattr(model_config.get_text_config(), "model_type", None)
    if model_type not in BACKBONE_OF_TEXT_MODEL:
        known = ", ".join(f"{kind} -> {name}" for kind, name in BACKBONE_OF_TEXT_MODEL.items())
        raise ValueError(f"tune: no preset backbone for a model whose language model is {model_type!r} (known: "
                         f"{known}); set tune.backbone in the config to one of {list(BACKBONES)}")  # fmt: skip
    return BACKBONE_OF_TEXT_MODEL[model_type]


def _updated(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s values; a dict value (``moe``, ``lora``) updates the dict it replaces."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def _dataset_preset(dataset: str, backbone: str) -> dict[str, Any]:
    """The data set's preset for ``backbone``: its values, updated by its ``backbones`` block for it."""
    datasets = _presets("datasets")
    if dataset not in datasets:
        raise ValueError(f"tune: unknown data set preset {dataset!r}; known: {sorted(datasets)}")
    preset = dict(datasets[dataset])
    blocks = preset.pop("backbones", None) or {}
    unknown = sorted(set(blocks) - set(BACKBONES))
    if unknown:
        raise ValueError(f"tune: data set preset {dataset!r} has blocks for unknown backbone(s) {unknown}; "
                         f"known: {list(BACKBONES)}")  # fmt: skip
    return _updated(preset, blocks.get(backbone) or {})


def resolve_settings(
    dataset: str, method: str, overrides: dict[str, Any] | None = None, backbone: str = "llava-med-v1"
) -> TuneSettings:
    """The data set preset, its ``backbone`` block, the method preset, then ``overrides``: one validated
    ``TuneSettings``. The default backbone is v1, whose numbers the presets' top level holds."""
    if backbone not in BACKBONES:
        raise ValueError(f"tune: unknown backbone {backbone!r}; known: {list(BACKBONES)}")
    methods = _presets("methods")
    preset = _dataset_preset(dataset, backbone)
    if method not in methods:
        raise ValueError(f"tune: unknown method {method!r}; known: {sorted(methods)}")
    merged = _updated({**preset, **methods[method]}, overrides or {})
    known = {f.name for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"tune: unknown setting(s) {unknown}; known: {sorted(known)}")
    return TuneSettings(**merged)
