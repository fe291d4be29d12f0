"""``a3tune <stage>``: the only entry point a Snakemake rule calls.

Each subcommand parses its arguments, reads nothing from config.yaml itself (the rule hands it the
values), calls one function of the library and turns expected failures into a one-line message and
exit code 2. Heavy imports happen inside the subcommand, so ``a3tune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import a3tune

log = logging.getLogger("a3tune")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _cmd_import(args: argparse.Namespace) -> None:
    from a3tune.data.importer import import_dataset

    import_dataset(
        fmt=args.format,
        root=args.root,
        dataset=args.dataset,
        samples_out=args.samples,
        images_out=args.images,
        options=args.options,
        progress=not args.no_progress,
    )


def _cmd_phantom(args: argparse.Namespace) -> None:
    from a3tune.data.phantom import PhantomConfig, generate

    generate(PhantomConfig.from_dict(args.params), args.out)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from a3tune.io.inspect import inspect_path

    print(inspect_path(args.path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a3tune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"a3tune {a3tune.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = sub.add_parser("import", help="import a data set into samples.parquet + images.parquet")
    p.add_argument("--format", required=True, help="slake, vqarad, pathvqa, r2gen or phantom")
    p.add_argument("--root", required=True, type=Path, help="data root; image paths must stay inside it")
    p.add_argument("--dataset", required=True, help="data set name written into samples.parquet")
    p.add_argument("--samples", required=True, type=Path, help="output samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="output images.parquet")
    p.add_argument("--options", type=_json_object, default={}, help="format options as a JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("phantom", help="generate the phantom benchmark's raw files")
    p.add_argument("--out", required=True, type=Path, help="output data root")
    p.add_argument("--params", type=_json_object, default={}, help="generator parameters as a JSON object")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("inspect", help="print an artifact's schema, counts, statuses and provenance")
    p.add_argument("path", type=Path, help="a Parquet manifest, a Zarr store or an artifact directory")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Expected failures (bad data set file, bad parameter, missing input) get one clear line.
        log.debug("traceback", exc_info=True)
        print(f"a3tune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
