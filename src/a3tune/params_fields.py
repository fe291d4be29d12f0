"""Parameter dataclasses built from plain JSON values: the pieces their parsers share.

``ProposalParams``, ``BoxProposalParams`` and ``PhantomConfig`` are frozen dataclasses that config
files fill from JSON/YAML. Each refuses unknown keys and wrongly typed values with its own message
prefix; the key check and the scalar checks live here once.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def described_field(default: Any, help: str) -> Any:
    """A dataclass field whose ``help`` metadata documents it (schema text, error messages)."""
    return dataclasses.field(default=default, metadata={"help": help})


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float)


def known_fields(cls: type, params: dict[str, Any], unknown: str) -> dict[str, dataclasses.Field]:
    """``cls``'s fields by name; ``ValueError`` ``"{unknown} [...]; known: [...]"`` for keys of ``params`` not among them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(params) - set(fields))
    if extra:
        raise ValueError(f"{unknown} {extra}; known: {sorted(fields)}")
    return fields


def json_scalar(kind: str, value: Any, name: str) -> Any:
    """``value`` as a field annotated ``kind`` (``int``, ``float``, ``bool``, ``str``; an int passes for a
    float); ``ValueError`` ``"{name} must be of type {kind}, got {value!r}"`` if it is not one."""
    if kind == "int" and is_int(value):
        return value
    if kind == "float" and is_number(value):
        return float(value)
    if kind in ("str", "bool") and type(value).__name__ == kind:
        return value
    raise ValueError(f"{name} must be of type {kind}, got {value!r}")
