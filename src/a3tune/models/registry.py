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


def lvlm_from_config(spec: dict[str, Any]) -> LoadedLvlm:
    """Load or build from a config entry: ``{"path": dir, [dtype, device, attn_implementation]}``
    or ``{"builder": name, **builder_kwargs}``; unknown keys raise ``ValueError`` naming them.

    ``dtype`` may be a torch dtype or its name (``"bfloat16"``).
    """
    spec = dict(spec)
    if ("path" in spec) == ("builder" in spec):
        raise ValueError(f"model spec needs exactly one of 'path' or 'builder', got keys {sorted(spec)}")
    if "path" in spec:
        path = spec.pop("path")
        unknown = sorted(set(spec) - set(_LOAD_KEYS))
        if unknown:
            raise ValueError(f"model spec: unknown key(s) {unknown} for a path; known: {['path', *_LOAD_KEYS]}")
        if isinstance(spec.get("dtype"), str):
            spec["dtype"] = getattr(torch, spec["dtype"])
        return load_lvlm(path, **spec)
    name = spec.pop("builder")
    if name not in LVLM_BUILDERS:
        raise ValueError(f"model spec: unknown builder {name!r}; known: {sorted(LVLM_BUILDERS)}")
    known = list(inspect.signature(LVLM_BUILDERS[name]).parameters)
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"model spec: unknown key(s) {unknown} for builder {name!r}; known: {known}")
    return LVLM_BUILDERS[name](**spec)
