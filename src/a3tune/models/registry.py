"""One registry of Med-LVLM builders, and the config entry that picks a model (STYLE.md: name -> builder)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from a3tune.models.lvlm import LoadedLvlm, build_tiny_llava, load_lvlm
from a3tune.models.smollm2 import build_smollm_llava

LVLM_BUILDERS: dict[str, Callable[..., LoadedLvlm]] = {"tiny": build_tiny_llava, "smollm2": build_smollm_llava}
_LOAD_KEYS = ("dtype", "device", "attn_implementation")
# The names of config.yaml's model.dtype (besides "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None) -> torch.dtype:
    """The parameter dtype that ``model.dtype`` names, for a model bound for ``device``.

    ``auto`` is bfloat16 on CUDA, where a 7B model's weights then take ~15 GB instead of ~29 GB (and
    the reference trains in bf16), and float32 elsewhere: CPU bf16 kernels are slow, and the demo's
    numbers are fp32. With ``device`` None, "on CUDA" means "CUDA is available" (a stage that moves
    the model itself, such as tune under DeepSpeed).
    Also accepted: ``bf16``, ``fp16``, ``fp32``, a floating torch dtype or its name (``"bfloat16"``).
    """
    if name == "auto":
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda else torch.float32
    if isinstance(name, str):
        dtype = DTYPES.get(name, getattr(torch, name, None))
    else:
        dtype = name
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model dtype {name!r} is not one of {['auto', *DTYPES]} or a floating torch dtype (bfloat16, ...)")
    return dtype


def spec_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The parameter dtype ``lvlm_from_config(spec)`` gives the model, known before it is loaded: a
    path's ``dtype`` (default ``auto``) resolved against its ``device``; float32 for a builder."""
    if "builder" in spec:
        return torch.float32
    return resolve_dtype(spec.get("dtype", "auto"), spec.get("device"))


def lvlm_from_config(spec: dict[str, Any]) -> LoadedLvlm:
    """Load or build from a config entry: ``{"path": dir, [dtype, device, attn_implementation]}``
    or ``{"builder": name, **builder_kwargs}``; unknown keys raise ``ValueError`` naming them.

    ``dtype`` as ``spec_dtype`` resolves it.
    """
    spec = dict(spec)
    if ("path" in spec) == ("builder" in spec):
        raise ValueError(f"model spec needs exactly one of 'path' or 'builder', got keys {sorted(spec)}")
    if "path" in spec:
        unknown = sorted(set(spec) - {"path", *_LOAD_KEYS})
        if unknown:
            raise ValueError(f"model spec: unknown key(s) {unknown} for a path; known: {['path', *_LOAD_KEYS]}")
        return load_lvlm(**{**spec, "dtype": spec_dtype(spec)})
    name = spec.pop("builder")
    if name not in LVLM_BUILDERS:
        raise ValueError(f"model spec: unknown builder {name!r}; known: {sorted(LVLM_BUILDERS)}")
    known = list(inspect.signature(LVLM_BUILDERS[name]).parameters)
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"model spec: unknown key(s) {unknown} for builder {name!r}; known: {known}")
    return LVLM_BUILDERS[name](**spec)
