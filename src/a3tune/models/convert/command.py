"""The ``a3tune convert_model`` subcommand (registered by ``a3tune.cli``; heavy imports on call)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from a3tune.cli_types import optional_of
from a3tune.models.convert.tokenizer import CHAT_MODES

log = logging.getLogger("a3tune")
FORMAT_NAMES = ("llava-med-v1.5", "llava-med-v1")  # converter.FORMATS (a test checks), without importing torch


def _run(args: argparse.Namespace) -> None:
    from a3tune.models.convert.converter import convert_model

    convert_model(
        args.format, args.source, args.out, base=args.base, vision_tower=args.vision_tower,
        chat_mode=args.chat_template, max_shard_size=args.max_shard_size, progress=not args.no_progress,
    )  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser(
        "convert_model",
        help="convert an original LLaVA-Med checkpoint (v1.5 llava_mistral, v1 delta) into a HF Llava folder",
    )
    p.add_argument("--format", required=True, choices=FORMAT_NAMES, help="layout of --source")
    p.add_argument("--source", required=True, type=Path, help="the downloaded checkpoint folder (v1: the delta)")
    p.add_argument("--out", required=True, type=Path, help="output HF Llava folder (written atomically)")
    p.add_argument("--base", type=optional_of(Path), default=None,
                   help="llava-med-v1 only: the local LLaMA-7B the delta is added to")
    p.add_argument("--vision-tower", type=optional_of(Path), default=None,
                   help="local CLIP folder of the tower the checkpoint names (config + preprocessor [+ weights]); "
                        "needed for v1, whose tower is not in the checkpoint")  # fmt: skip
    p.add_argument("--chat-template", choices=CHAT_MODES, default="vicuna_v1",
                   help="conversation mode of the prompts (reference: vicuna_v1)")  # fmt: skip
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
