"""argparse value types shared by ``a3tune.cli`` and the subcommands registered from their packages."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def json_of(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse type: JSON text that must decode to ``kind`` (a dict: "object", a list: "list")."""

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {name}")
        return value

    return parse


json_object = json_of(dict, "object")
json_list = json_of(list, "list")


def optional_of(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, or None for an empty value, "none" or "null" (how a rule
    passes an unset optional setting)."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("", "none", "null") else kind(text)

    return parse
