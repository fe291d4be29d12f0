"""``a3tune <stage>``: the only entry point a Snakemake rule calls.

Each subcommand parses its arguments, reads nothing from config.yaml itself (the rule hands it the
values), calls one function of the library and turns expected failures into a one-line message and
exit code 2. Heavy imports happen inside the subcommand, so ``a3tune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import a3tune
from a3tune.cli_types import json_list, json_object, optional_of
from a3tune.models.convert import command as convert_command
from a3tune.tune.settings import BACKBONES

log = logging.getLogger("a3tune")


def _cmd_import(args: argparse.Namespace) -> None:
    from a3tune.data.importer import import_dataset

    import_dataset(fmt=args.format, root=args.root, dataset=args.dataset, samples_out=args.samples,
                   images_out=args.images, options=args.options, progress=not args.no_progress)  # fmt: skip


def _cmd_phantom(args: argparse.Namespace) -> None:
    from a3tune.data.phantom import PhantomConfig, generate

    generate(PhantomConfig.from_dict(args.params), args.out)


def _cmd_sam_masks(args: argparse.Namespace) -> None:
    from a3tune.labels.sam_stage import run_shard

    stats = run_shard(
        args.images, args.root, args.shard, args.shards, args.store, args.table,
        backend=args.backend, checkpoint=args.checkpoint or None, seed=args.seed, params=args.params,
        cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    log.info("sam_masks: %s", stats)


def _cmd_gather_proposals(args: argparse.Namespace) -> None:
    from a3tune.labels.sam_stage import gather

    gather(args.tables, args.out)


def _cmd_demo_clip(args: argparse.Namespace) -> None:
    from a3tune.labels.demo_clip import train_demo_clip

    _check_keywords(train_demo_clip, args.params, "demo_clip")
    train_demo_clip(args.phantom_root, args.out, progress=not args.no_progress, **args.params)


def _cmd_refine(args: argparse.Namespace) -> None:
    from a3tune.labels.refine_stage import run_refine

    run_refine(
        args.samples, args.images, args.proposals, args.root, args.clip, args.store, args.table,
        dataset_format=args.format, grid=args.grid, top_k=args.top_k, min_score=args.min_score,
        device=args.device, progress=not args.no_progress,
    )  # fmt: skip


def _cmd_overlays(args: argparse.Namespace) -> None:
    from a3tune.labels.audit_overlays import write_overlays

    written = write_overlays(args.labels, args.out, n=args.n, seed=args.seed)
    log.info("overlays: %d PNGs in %s", len(written), args.out)


def _cmd_demo_lvlm(args: argparse.Namespace) -> None:
    from a3tune.models.demo_lvlm import train_demo_lvlm

    train_demo_lvlm(
        args.samples, args.images, args.root, args.out, architecture=args.architecture, training=args.training,
        pretrain=args.pretrain or None, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip


def _cmd_probe_heads(args: argparse.Namespace) -> None:
    from a3tune.probe.probe_stage import run_probe

    run_probe(
        args.model, args.samples, args.images, args.labels / "labels.parquet", args.labels / "labels.zarr",
        args.root, args.out, args.figure, split=args.split, n_samples=args.n_samples, batch_size=args.batch_size,
        top_k=args.top_k, rank_by=args.rank_by, seed=args.seed, device=args.device, progress=not args.no_progress,
    )  # fmt: skip


def _cmd_tune(args: argparse.Namespace) -> None:
    from a3tune.tune.tune_stage import run_tune

    if args.ranks > 1 and "WORLD_SIZE" not in os.environ:
        # One process per rank (GPU), the same command under torchrun; each rank lands here again
        command = rank_launch_command(args.ranks, args.argv)
        log.info("tune: launching %d ranks: %s", args.ranks, " ".join(command))
        os.execv(command[0], command)

    run_tune(
        args.model, args.samples, args.images, args.labels, args.root, args.out, args.checkpoints,
        preset=args.preset, method=args.method, heads_path=args.heads, overrides=args.overrides, seed=args.seed,
        backbone=args.backbone, progress=not args.no_progress,
    )  # fmt: skip


def _cmd_merge_adapter(args: argparse.Namespace) -> None:
    from a3tune.models.registry import lvlm_from_config
    from a3tune.tune.adapters import load_adapter, merge_lora

    lvlm = lvlm_from_config(args.model)
    load_adapter(lvlm.model, args.adapter)
    merge_lora(lvlm.model)
    lvlm.save(args.out)
    log.info("merge_adapter: %s + %s -> %s", args.model, args.adapter, args.out)


def _cmd_score(args: argparse.Namespace) -> None:
    from a3tune.score.score_stage import score_shard

    score_shard(
        args.model, args.samples, args.images, args.labels, args.root, args.out, adapter=args.adapter or None,
        heads_path=args.heads, baseline=args.baseline or None, decode=args.decoding, split=args.split,
        shard=args.shard, shards=args.shards, batch_size=args.batch_size, limit=args.limit,
        progress=not args.no_progress,
    )  # fmt: skip


def _cmd_score_gather(args: argparse.Namespace) -> None:
    from a3tune.score.score_stage import gather

    if args.chexbert:  # a clinical metric plugin, from local weights (README "Scoring and the report")
        from a3tune.score.clinical_metrics import chexbert_metric
        from a3tune.score.report_metrics import register_clinical_metric

        register_clinical_metric("chexbert", chexbert_metric(**args.chexbert))
    gather(args.tables, args.out, meteor={"yes": True, "no": False, "auto": None}[args.meteor],
           tokenizer=args.tokenizer, reference_quirks=args.reference_quirks == "yes",
           clinical={"chexbert": args.chexbert} if args.chexbert else None)  # fmt: skip


def _cmd_report(args: argparse.Namespace) -> None:
    from a3tune.score.report_stage import write_report

    write_report(args.metrics, args.table, args.markdown, args.figures, samples_files=args.samples,
                 overlays=args.overlays)  # fmt: skip
    log.info("report: %s", args.markdown)


def rank_launch_command(ranks: int, argv: list[str]) -> list[str]:
    """``a3tune <argv>`` as ``ranks`` processes on this node under torchrun (this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "a3tune.cli", *argv]  # fmt: skip


def _cmd_inspect(args: argparse.Namespace) -> None:
    if args.target[0] == "labels" and len(args.target) == 2:
        from a3tune.labels.audit import label_metrics, label_report

        label_dir = Path(args.target[1])
        print(json.dumps(label_metrics(label_dir), indent=2) if args.json else label_report(label_dir))
        return
    if len(args.target) != 1:
        raise ValueError("usage: a3tune inspect PATH  or  a3tune inspect labels DIR")
    from a3tune.io.inspect import inspect_path

    print(inspect_path(Path(args.target[0])))


def _check_keywords(func: Callable, params: dict, what: str) -> None:
    """Reject parameters the function does not take, naming them (a config typo, not a crash)."""
    import inspect

    known = {name for name, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(params) - known - {"progress"})
    if unknown:
        raise ValueError(f"{what}: unknown parameter(s) {unknown}; known: {sorted(known - {'progress'})}")


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
    p.add_argument("--options", type=json_object, default={}, help="format options as a JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("phantom", help="generate the phantom benchmark's raw files")
    p.add_argument("--out", required=True, type=Path, help="output data root")
    p.add_argument("--params", type=json_object, default={}, help="generator parameters as a JSON object")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("sam_masks", help="SAM proposals for one shard of a data set's images")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--root", required=True, type=Path, help="data root the image paths are relative to")
    p.add_argument("--shard", required=True, type=int, help="this shard's index, 0-based")
    p.add_argument("--shards", required=True, type=int, help="number of shards")
    p.add_argument("--backend", required=True, help="SAM backend: vit_h, vit_l, vit_b, medsam, litemedsam, tiny")
    p.add_argument("--checkpoint", default="", help="local checkpoint path (empty: the backend's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised backend (tiny)")
    p.add_argument("--params", type=json_object, default={}, help="proposal generator parameters (JSON)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--cache-dir", required=True, type=Path, help="proposal cache folder (by image hash)")
    p.add_argument("--store", required=True, type=Path, help="output shard Zarr store (masks)")
    p.add_argument("--table", required=True, type=Path, help="output shard Parquet table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sam_masks)

    p = sub.add_parser("gather_proposals", help="concatenate shard tables into proposals.parquet")
    p.add_argument("--out", required=True, type=Path, help="output proposals.parquet")
    p.add_argument("tables", nargs="+", type=Path, help="shard-<k>.parquet files")
    p.set_defaults(func=_cmd_gather_proposals)

    p = sub.add_parser("demo_clip", help="train the demo CLIP (stand-in for BiomedCLIP) on phantom crops")
    p.add_argument("--phantom-root", required=True, type=Path, help="phantom data root (a3tune phantom)")
    p.add_argument("--out", required=True, type=Path, help="output open_clip model folder")
    p.add_argument("--params", type=json_object, default={}, help="training parameters (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo_clip)

    p = sub.add_parser("refine", help="prompt-aware weak labels: CLIP-ranked proposals on the token grid")
    p.add_argument("--samples", required=True, type=Path, help="samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--proposals", required=True, type=Path, help="proposals.parquet (shard stores beside it)")
    p.add_argument("--root", required=True, type=Path, help="data root")
    p.add_argument("--clip", required=True, type=Path, help="local open_clip model folder (e.g. BiomedCLIP)")
    p.add_argument("--format", required=True, help="data set format, for the query templates")
    p.add_argument("--grid", type=json_object, default={}, help="grid projection (JSON: grid, input_size, ...)")
    p.add_argument("--top-k", type=json_object, default={}, help='masks kept per task (JSON: {"vqa": 8, ...})')
    p.add_argument("--min-score", type=optional_of(float), default=None, help="optional score threshold (empty: none)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--store", required=True, type=Path, help="output labels.zarr")
    p.add_argument("--table", required=True, type=Path, help="output labels.parquet")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_refine)

    p = sub.add_parser("overlays", help="overlay PNGs of a sample of weak labels, for audit")
    p.add_argument("labels", type=Path, help="labels folder (labels.parquet + labels.zarr)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=12, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=_cmd_overlays)

    convert_command.register(sub)

    p = sub.add_parser("demo_lvlm", help="pre-train the demo's stand-in base Med-LVLM (a small LLaVA)")
    p.add_argument("--samples", required=True, type=Path, help="samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--root", required=True, type=Path, help="data root")
    p.add_argument("--architecture", type=json_object, default={}, help="model sizes (JSON, build_tiny_llava)")
    p.add_argument("--training", type=json_object, default={}, help="steps, batch_size, lr, ... (JSON)")
    p.add_argument("--pretrain", type=json_object, default={},
                   help="phantom parameters of an own pre-training image set (JSON; empty: the training split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument("--out", required=True, type=Path, help="output model folder (Hugging Face format)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo_lvlm)

    p = sub.add_parser("probe_heads", help="rank every attention head by its attention on the image")
    p.add_argument("--model", required=True, type=json_object,
                   help='the Med-LVLM (JSON): {"path": "/local/checkpoint"} or {"builder": "smollm2", ...}')
    p.add_argument("--samples", required=True, type=Path, help="samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--labels", required=True, type=Path, help="labels folder (labels.parquet + labels.zarr)")
    p.add_argument("--root", required=True, type=Path, help="data root")
    p.add_argument("--split", default="train", help="split the probe samples come from")
    p.add_argument("--n-samples", type=int, default=64, help="probe samples (labelled ones first)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward pass")
    p.add_argument("--top-k", type=float, default=128, help="heads selected: a count, or a fraction below 1")
    p.add_argument("--rank-by", default="score", help="score (image share, the reference) or inside_score")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", required=True, type=Path, help="output heads.parquet")
    p.add_argument("--figure", type=Path, default=None, help="output heatmap PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_probe_heads)

    p = sub.add_parser("tune", help="train one run's adapters (A3Tune, the LoRA baseline or an ablation)")
    p.add_argument("--model", required=True, type=json_object, help='the base Med-LVLM (JSON): {"path": "/local/dir"}')
    p.add_argument("--samples", required=True, type=Path, help="samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--labels", required=True, type=Path, help="labels folder (labels.parquet + labels.zarr)")
    p.add_argument("--root", required=True, type=Path, help="data root")
    p.add_argument("--heads", type=Path, default=None, help="the probe's heads.parquet (methods with static heads)")
    p.add_argument("--preset", required=True, help="data set preset: slake, vqarad, pathvqa, iu_xray, mimic_cxr, phantom")
    p.add_argument("--method", required=True, help="method preset: a3tune, lora, lora_nocue, no_moe, all_heads or dynamic_heads")
    p.add_argument("--overrides", type=json_object, default={}, help="settings that replace the presets' (JSON)")
    p.add_argument("--backbone", default="auto", choices=("auto", *BACKBONES),
                   help="whose preset numbers to use; auto: from the model's config (mistral: v1.5, llama: v1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the adapters' init and the sample order")
    p.add_argument("--checkpoints", required=True, type=Path, help="checkpoint folder (kept across reruns)")
    p.add_argument("--ranks", type=int, default=1, help="data-parallel ranks (one per GPU), launched with torchrun")
    p.add_argument("--out", required=True, type=Path, help="run folder: adapter/ and train_log.parquet")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("merge_adapter", help="fold a LoRA-only adapter into the base model: a standard HF checkpoint")
    p.add_argument("--model", required=True, type=json_object, help='the base Med-LVLM (JSON): {"path": "/local/dir"}')
    p.add_argument("--adapter", required=True, type=Path, help="adapter folder (runs/<method>/<ds>/seed-<n>/adapter)")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.set_defaults(func=_cmd_merge_adapter)

    p = sub.add_parser("score", help="answers, metrics and attention grounding of one model on a test shard")
    p.add_argument("--model", required=True, type=json_object, help='the base Med-LVLM (JSON): {"path": "/local/dir"}')
    p.add_argument("--adapter", default="", help="adapter folder of a tuned run (empty: the base model)")
    p.add_argument("--baseline", default="", help="inference-time baseline: pai or vcd (empty: none)")
    p.add_argument("--samples", required=True, type=Path, help="samples.parquet")
    p.add_argument("--images", required=True, type=Path, help="images.parquet")
    p.add_argument("--labels", required=True, type=Path, help="labels folder (labels.parquet + labels.zarr)")
    p.add_argument("--root", required=True, type=Path, help="data root")
    p.add_argument("--heads", type=Path, default=None, help="heads.parquet: grounding over the selected heads")
    p.add_argument("--decoding", type=json_object, default={}, help="num_beams, max_new_tokens, stop (JSON)")
    p.add_argument("--split", default="test", help="split to score")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--limit", type=optional_of(int), default=None, help="at most this many samples per shard")
    p.add_argument("--shard", type=int, default=0, help="this shard, 0-based")
    p.add_argument("--shards", type=int, default=1, help="number of shards")
    p.add_argument("--out", required=True, type=Path, help="output shard table (Parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("score_gather", help="join score shards: predictions, attention, metrics.json")
    p.add_argument("--out", required=True, type=Path, help="output folder (results/<run>/<ds>)")
    p.add_argument("--meteor", choices=["auto", "yes", "no"], default="auto",
                   help="METEOR 1.5 on report samples (needs Java); auto: when Java is on PATH")
    p.add_argument("--tokenizer", choices=["auto", "ptb-java", "ptb-python"], default="auto",
                   help="PTB tokenizer of the report metrics: the CoreNLP jar (Java) or its Python equivalent; "
                        "auto: the jar when Java is on PATH")
    p.add_argument("--reference-quirks", choices=["yes", "no"], default="yes",
                   help="VQA scored with the reference scorer's quirks (yes, comparable with the paper) or corrected")
    p.add_argument("--chexbert", type=json_object, default={},
                   help='CheXbert label F1 of report samples from local weights (JSON): {"checkpoint": '
                        '"/path/chexbert.pth", "bert": "/path/bert-base-uncased", "uncertain_positive": true}; '
                        "empty: not run")  # fmt: skip
    p.add_argument("tables", nargs="+", type=Path, help="shard tables")
    p.set_defaults(func=_cmd_score_gather)

    p = sub.add_parser("report", help="summary table (Parquet, Markdown) and figures over every scored run")
    p.add_argument("metrics", nargs="+", type=Path, help="results/<run>/<ds>/metrics.json files")
    p.add_argument("--table", required=True, type=Path, help="output summary.parquet")
    p.add_argument("--markdown", required=True, type=Path, help="output summary.md")
    p.add_argument("--figures", type=Path, default=None, help="output folder of figures")
    p.add_argument("--overlays", type=json_list, default=[], help="attention overlay settings per data set (JSON)")
    p.add_argument("--samples", nargs="*", type=Path, default=[],
                   help="the data sets' samples.parquet: closed accuracy per cue/confuser group and paired "
                        "differences to LoRA, from each run's predictions.parquet")  # fmt: skip
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("inspect", help="print an artifact's schema, counts, statuses and provenance")
    p.add_argument("target", nargs="+", help="PATH (any artifact) or: labels DIR (weak-label audit)")
    p.add_argument("--json", action="store_true", help="with labels: the metrics as JSON")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        # Expected failures (bad data set file, bad parameter, missing input, a diverged training
        # run) get one clear line.
        log.debug("traceback", exc_info=True)
        print(f"a3tune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
