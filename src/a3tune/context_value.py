"""One context manager for the per-forward requests that reach model internals through a ``ContextVar``.

Attention capture, A³MoE routing and PAI's amplification all hand a request to code deep inside a
transformers model (attention functions, wrapped linear layers) for the duration of a block; they
set and reset their ``ContextVar`` through :func:`bound`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def bound(variable: contextvars.ContextVar[T], value: T) -> Iterator[T]:
    """Set ``variable`` to ``value`` for the block (also on an exception), then restore its previous value."""
    token = variable.set(value)
    try:
        yield value
    finally:
        variable.reset(token)
