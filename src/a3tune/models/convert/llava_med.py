"""What each original LLaVA-Med layout holds, and where each of its tensors goes in HF Llava.

``plan_tensors`` maps every source tensor to a key of ``LlavaForConditionalGeneration``'s state
dict (the names the model itself uses), with a producer that reads it when its shard is written.
Nothing is silently skipped: a source tensor with no place raises, and the few that are dropped on
purpose (buffers the model recomputes) are listed in the plan and in the output's provenance.

- LLaVA-Med v1.5 (``llava_mistral``): the language model at ``model.*`` / ``lm_head``, the
  ``mlp2x_gelu`` projector at ``model.mm_projector.{0,2}``, the CLIP tower inside the checkpoint at
  ``model.vision_tower.vision_tower.vision_model.*``.
- LLaVA-Med v1 (``llava``, LLaMA): weights are deltas to add to a local LLaMA-7B (``apply_delta``:
  same shapes, or the delta's embedding rows beyond the base's vocabulary kept as they are); the
  projector is one ``nn.Linear``, expressed exactly as HF's two layers with an identity activation
  and an identity second layer; the tower is not in the checkpoint and comes from ``--vision-tower``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from a3tune.models.convert.tensor_source import TensorSource
from a3tune.models.convert.towers import Tower

Producer = Callable[[], torch.Tensor]
FORMATS = {
    "llava-med-v1.5": {"model_type": "llava_mistral", "architecture": "LlavaMistralForCausalLM"},
    "llava-med-v1": {"model_type": "llava", "architecture": "LlavaLlamaForCausalLM"},
}
# Buffers the HF model recomputes from its config: dropped (and listed in the provenance).
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)embeddings\.position_ids$")
_TOWER_IN_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."
_TOWER_IN_FOLDER = "vision_model."
# Parts of a full CLIP folder that are not its vision tower (CLIPVisionModel ignores them too).
_NOT_TOWER = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)")
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclasses.dataclass
class TensorPlan:
    """Model key -> (producer, shape, dtype, where it comes from), plus what was dropped."""

    tensors: dict[str, tuple[Producer, tuple[int, ...], torch.dtype, str]] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, key: str, produce: Producer, shape, dtype: torch.dtype, origin: str) -> None:
        if key in self.tensors:
            raise ValueError(f"two source tensors map to {key}: {self.tensors[key][3]} and {origin}")
        self.tensors[key] = (produce, tuple(shape), dtype, origin)


def read_original_config(folder: Path, fmt: str) -> dict[str, Any]:
    """config.json of an original folder, checked to be the layout ``fmt`` says."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    config = json.loads(path.read_text())
    want = FORMATS[fmt]
    found = (config.get("model_type"), (config.get("architectures") or [None])[0])
    if found != (want["model_type"], want["architecture"]):
        raise ValueError(
            f"{path}: model_type {found[0]!r} / architectures {found[1]!r} is not the {fmt} layout "
            f"({want['model_type']!r} / {want['architecture']!r})"
        )
    if "mm_vision_tower" not in config:
        raise ValueError(f"{path}: no mm_vision_tower; not a LLaVA checkpoint")
    return config


def require(config: dict[str, Any], field: str, where: str) -> Any:
    if field not in config or config[field] is None:
        raise ValueError(f"{where}: config.json lacks {field!r}")
    return config[field]


def _text_key(key: str) -> str:
    """The HF key of a language-model tensor of the original layout."""
    if key == "lm_head.weight":
        return "lm_head.weight"
    return "model.language_model." + key[len("model."):]


def _grown(source: Producer, extra_rows: int) -> Producer:
    """An embedding matrix with ``extra_rows`` new rows, each the mean of the existing rows.

    A new row of ``lm_head`` equal to the mean gives a logit equal to the mean logit, so it takes at
    most 1/V of the probability mass (Jensen): the log-likelihood of any real token moves by at most
    log(1 + 1/V) (3e-5 for V = 32000); generation suppresses the token outright.
    """

    def produce() -> torch.Tensor:
        weight = source()
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        return torch.cat([weight, mean.expand(extra_rows, -1)], dim=0)

    return produce


def _plan_text(plan: TensorPlan, key: str, produce: Producer, shape, dtype, origin: str, extra_rows: int) -> None:
    if key in EMBEDDING_KEYS and extra_rows:
        produce, shape = _grown(produce, extra_rows), (shape[0] + extra_rows, *shape[1:])
    plan.add(_text_key(key), produce, shape, dtype, origin)


def _plan_tower_from_folder(plan: TensorPlan, tower: Tower) -> None:
    if tower.folder is None:
        raise ValueError("the vision tower's weights are not in this checkpoint: pass --vision-tower DIR")
    source = TensorSource(tower.folder)
    ignored = 0
    for key in source.keys():
        if key.startswith(_TOWER_IN_FOLDER) and not _DROPPED.search(key):
            info = source.info[key]
            plan.add("model.vision_tower." + key[len(_TOWER_IN_FOLDER):], _reader(source, key), info.shape,
                     info.dtype, source.where(key))  # fmt: skip
        elif _NOT_TOWER.match(key) or _DROPPED.search(key):
            ignored += 1
        else:
            raise ValueError(f"unexpected tensor in the vision tower folder: {source.where(key)}")
    plan.notes["vision_tower_weights"] = f"{tower.folder} ({ignored} non-tower tensors ignored)"


def _reader(source: TensorSource, key: str) -> Producer:
    return lambda: source.get(key)


def plan_v15(source: TensorSource, tower: Tower, extra_rows: int) -> TensorPlan:
    plan = TensorPlan()
    for key in source.keys():
        info, origin = source.info[key], source.where(key)
        if _DROPPED.search(key):
            plan.dropped.append(key)
        elif key.startswith(_TOWER_IN_CHECKPOINT):
            plan.add("model.vision_tower." + key[len(_TOWER_IN_CHECKPOINT):], _reader(source, key), info.shape,
                     info.dtype, origin)  # fmt: skip
        elif key.startswith("model.mm_projector."):
            match = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key)
            if match is None:
                raise ValueError(f"unexpected projector tensor for mlp2x_gelu: {origin}")
            layer = {"0": "linear_1", "2": "linear_2"}[match[1]]
            plan.add(f"model.multi_modal_projector.{layer}.{match[2]}", _reader(source, key), info.shape, info.dtype,
                     origin)  # fmt: skip
        elif key == "lm_head.weight" or key.startswith("model."):
            _plan_text(plan, key, _reader(source, key), info.shape, info.dtype, origin, extra_rows)
        else:
            raise ValueError(f"unexpected tensor (no place in the HF Llava model): {origin}")
    if not any(k.startswith("model.vision_tower.") for k in plan.tensors):
        _plan_tower_from_folder(plan, tower)
    else:
        plan.notes["vision_tower_weights"] = "checkpoint (model.vision_tower.vision_tower.vision_model.*)"
    return plan


def _delta_sum(delta: TensorSource, base: TensorSource, key: str) -> Producer:
    """delta + base as apply_delta adds them: over the base's rows and columns, in the delta's dtype.

    PyTorch adds two fp16 tensors by rounding their exact float32 sum once, which is what this does.
    """

    def produce() -> torch.Tensor:
        d, b = delta.get(key), base.get(key)
        out = d.float()
        out[tuple(slice(0, n) for n in b.shape)] += b.float()
        return out.to(d.dtype)

    return produce


def _check_delta_shape(delta: TensorSource, base: TensorSource, key: str) -> None:
    d, b = delta.info[key].shape, base.info[key].shape
    if d == b:
        return
    grows = key in EMBEDDING_KEYS and len(d) == len(b) == 2 and d[0] >= b[0] and d[1] == b[1]
    if not grows:
        raise ValueError(f"delta and base disagree on the shape of {key}: {d} in {delta.where(key)}, "
                         f"{b} in {base.where(key)}")  # fmt: skip


def plan_v1(delta: TensorSource, base: TensorSource, tower: Tower, text_hidden: int) -> TensorPlan:
    plan = TensorPlan()
    for key in base.keys():
        if key not in delta and not _DROPPED.search(key):
            raise ValueError(f"base tensor has no delta: {base.where(key)} (is --base the LLaMA-7B of this delta?)")
    for key in delta.keys():
        info, origin = delta.info[key], delta.where(key)
        if _DROPPED.search(key):
            plan.dropped.append(key)
        elif key.startswith("model.mm_projector."):
            match = re.fullmatch(r"model\.mm_projector\.(weight|bias)", key)
            if match is None:
                raise ValueError(f"unexpected projector tensor for the single-Linear projector: {origin}")
            plan.add(f"model.multi_modal_projector.linear_1.{match[1]}", _reader(delta, key), info.shape, info.dtype,
                     origin)  # fmt: skip
        elif key not in base:
            raise ValueError(f"delta tensor has no base tensor to add to: {origin}")
        else:
            _check_delta_shape(delta, base, key)
            _plan_text(plan, key, _delta_sum(delta, base, key), info.shape, info.dtype, f"{origin} + base", 0)
    dtype = delta.info["model.mm_projector.weight"].dtype if "model.mm_projector.weight" in delta else torch.float32
    plan.add("model.multi_modal_projector.linear_2.weight", lambda: torch.eye(text_hidden, dtype=dtype),
             (text_hidden, text_hidden), dtype, "identity (single-Linear projector)")  # fmt: skip
    plan.add("model.multi_modal_projector.linear_2.bias", lambda: torch.zeros(text_hidden, dtype=dtype),
             (text_hidden,), dtype, "zeros (single-Linear projector)")  # fmt: skip
    _plan_tower_from_folder(plan, tower)
    return plan
