"""Stage ``report``: one table and a few figures comparing every scored run, per data set.

Reads each run's ``metrics.json`` (``results/<run>/<ds>/``); a run id is ``base``, or
``<method>-seed<n>`` for a tuned run, or ``<method>-seed<n>+<baseline>`` for a tuned run decoded
with an inference-time baseline. Rows of ``summary.parquet``: data set, method (the run id without
its seed), seed, and the metrics. ``summary.md`` shows, per data set and method, the mean ± std
over seeds of: closed accuracy, open recall, report BLEU-4 / ROUGE-L / CIDEr (report tasks),
the share of image attention inside the weak label and inside the ground truth, and the pointing
game, each over the probe's selected heads and (``own_`` columns, captioned "(own)") over the heads
whose q/k the run's adapter changed. Figures: the metrics as grouped bars, and attention overlays
of the same test samples for the base model and each tuned method (first seed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from a3tune.io.atomic import atomic_file
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, hash_path
from a3tune.score.paired import (
    DIFFERENCE,
    GROUPS,
    REFERENCE_METHOD,
    closed_items,
    group_accuracies,
    mean_interval,
    paired_difference,
)

RUN_ID = re.compile(r"^(?P<method>[A-Za-z0-9_]+)(?:-seed(?P<seed>\d+))?(?P<baseline>\+[a-z]+)?$")
# Summary columns: (metrics.json path, column name, caption)
METRICS = (
    (("vqa", "closed", "accuracy"), "closed_acc", "closed accuracy"),
    (("vqa", "open", "recall"), "open_recall", "open recall"),
    (("report", "bleu_4"), "bleu_4", "BLEU-4"),
    (("report", "rouge_l"), "rouge_l", "ROUGE-L"),
    (("report", "cider"), "cider", "CIDEr"),
    (("grounding", "image_share"), "image_share", "attention on image"),
    (("grounding", "inside_label"), "inside_label", "in weak label"),
    (("grounding", "inside_gt"), "inside_gt", "in ground truth"),
    (("grounding", "pointing_hit"), "pointing", "pointing game"),
    (("grounding", "own_image_share"), "own_image_share", "on image (own)"),
    (("grounding", "own_inside_label"), "own_inside_label", "in label (own)"),
    (("grounding", "own_inside_gt"), "own_inside_gt", "in GT (own)"),
    (("grounding", "own_pointing_hit"), "own_pointing", "pointing (own)"),
)


def parse_run(run: str) -> tuple[str, int | None]:
    """(method, seed) of a run id: ``base`` -> (base, None); ``a3tune-seed1+pai`` -> (a3tune+pai, 1)."""
    match = RUN_ID.match(run)
    if match is None:
        raise ValueError(f"not a run id: {run!r} (base, <method>-seed<n> or <method>-seed<n>+<baseline>)")
    seed = match["seed"]
    return match["method"] + (match["baseline"] or ""), int(seed) if seed is not None else None


def summary_table(metrics_files: list[str | os.PathLike], samples_files: list[str | os.PathLike] = ()) -> pl.DataFrame:
    """One row per (data set, run): the metrics of ``results/<run>/<ds>/metrics.json`` files.

    With the data sets' ``samples_files``, each run's ``predictions.parquet`` (beside its metrics.json)
    adds closed accuracy per cue and confuser group and, for tuned runs, the paired difference to the
    ``lora`` run of the same seed (``paired``).
    """
    samples = {}
    for path in samples_files:
        table = read_parquet(path, contract="samples")
        for (dataset,), part in table.group_by("dataset"):
            samples[dataset] = part
    rows, items = [], {}
    for path in metrics_files:
        path = Path(path)
        run, dataset = path.parent.parent.name, path.parent.name
        method, seed = parse_run(run)
        metrics = json.loads(path.read_text())["metrics"]
        row: dict[str, Any] = {"dataset": dataset, "method": method, "seed": seed, "run": run, "n": metrics["n"]}
        row |= _skipped(metrics)
        for keys, column, _ in METRICS:
            row[column] = _lookup(metrics, keys)
        if dataset in samples:
            items[dataset, run] = closed_items(path.parent / "predictions.parquet", samples[dataset])
            row |= group_accuracies(items[dataset, run])
        rows.append(row)
    for row in rows:
        reference = items.get((row["dataset"], f"{REFERENCE_METHOD}-seed{row['seed']}"))
        if row["method"] != REFERENCE_METHOD and row["seed"] is not None and reference is not None:
            row[DIFFERENCE] = paired_difference(items[row["dataset"], row["run"]], reference)
    schema = {"dataset": pl.String, "method": pl.String, "seed": pl.Int64, "run": pl.String, "n": pl.Int64,
              "n_skipped": pl.Int64, "skipped": pl.String}  # fmt: skip
    schema |= {column: pl.Float64 for _, column, _ in METRICS}
    schema |= {column: pl.Float64 for column in (*GROUPS, DIFFERENCE)}
    return pl.DataFrame(rows, schema=schema).sort("dataset", "method", "seed", nulls_last=True)


def summary_markdown(table: pl.DataFrame) -> str:
    """Per data set, a Markdown table of mean ± std over seeds (n seeds) for every method.

    Column n: test samples scored (runs of a method that scored different numbers show them all, "8/10"); a run
    that skipped test samples (unusable images, ``score.limit``) is named in a note under the table, with reasons.
    """
    lines = ["# a3tune results", ""]
    for (dataset,), part in table.group_by("dataset", maintain_order=True):
        columns = [(c, caption) for _, c, caption in METRICS if part[c].is_not_null().any()]
        lines += [f"## {dataset}", "", "| method | seeds | n | " + " | ".join(cap for _, cap in columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
        for (method,), runs in part.group_by("method", maintain_order=True):
            cells = [_mean_std(runs[c]) for c, _ in columns]
            n = "/".join(str(v) for v in runs["n"].unique(maintain_order=True).to_list())
            lines.append(f"| {method} | {runs['seed'].drop_nulls().len() or '-'} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
        lost = part.filter(pl.col("n_skipped") > 0)
        if lost.height:
            lines += ["Samples not scored: " + "; ".join(f"{r['run']} {r['n_skipped']} ({r['skipped']})"
                                                        for r in lost.iter_rows(named=True)) + ".", ""]  # fmt: skip
        lines += _cue_table(part)
    lines.append("Shares and rates in [0, 1]; CIDEr as the COCO definition (x10). Attention metrics: mean over "
                 "the test samples and post-image query rows; pointing game: the attention peak inside the ground "
                 "truth. Heads: attention on image, in weak label, in ground truth and pointing game average the "
                 "probe's selected heads (heads.parquet; the heads a static A³Tune run trains), the same heads for "
                 "every run; the (own) columns average the run's own heads, those whose q/k its adapter changed "
                 "(a static-head run's heads; every head for a run that adapts every head's q/k, and for the base "
                 "model).")  # fmt: skip
    return "\n".join(lines) + "\n"


CUE_COLUMNS = (("closed_acc", "closed accuracy"), ("closed_acc_cue_agrees", "cue agrees"),
               ("closed_acc_cue_disagrees", "cue disagrees"), ("closed_acc_confuser", "with confuser"),
               ("closed_acc_no_confuser", "no confuser"))  # fmt: skip


def _cue_table(part: pl.DataFrame) -> list[str]:
    """Closed accuracy per cue and confuser group, and each method's paired difference to LoRA (95 % interval)."""
    if not any(part[c].is_not_null().any() for c in GROUPS):
        return []
    lines = [f"Closed accuracy by cue and confuser; {DIFFERENCE}: mean over seeds of the run minus the "
             f"`{REFERENCE_METHOD}` run of the same seed on the same closed items, with its 95 % interval "
             "(Student t over seeds).", "",
             "| method | seeds | " + " | ".join(cap for _, cap in CUE_COLUMNS) + f" | minus {REFERENCE_METHOD} [95 % CI] |",
             "|---|---|" + "---|" * (len(CUE_COLUMNS) + 1)]  # fmt: skip
    for (method,), runs in part.group_by("method", maintain_order=True):
        cells = [_mean_std(runs[c]) for c, _ in CUE_COLUMNS]
        differences = runs[DIFFERENCE].drop_nulls().to_list()
        if differences:
            mean, half = mean_interval(differences)
            cells.append(f"{mean:+.3f}" + (f" [{mean - half:+.3f}, {mean + half:+.3f}]" if half is not None else ""))
        else:
            cells.append("-")
        lines.append(f"| {method} | {runs['seed'].drop_nulls().len() or '-'} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(
    metrics_files: list[str | os.PathLike],
    out_table: str | os.PathLike,
    out_markdown: str | os.PathLike,
    figures_dir: str | os.PathLike | None = None,
    *,
    samples_files: list[str | os.PathLike] = (),
    overlays: list[dict[str, Any]] = (),
) -> pl.DataFrame:
    """summary.parquet, summary.md and (with ``figures_dir``) the metric bars and attention overlays."""
    table = summary_table(metrics_files, samples_files)
    inputs = [*metrics_files, *samples_files, *(Path(p).parent / "predictions.parquet" for p in metrics_files
                                                if samples_files)]  # fmt: skip
    provenance = Provenance("report", {"runs": sorted(table["run"].unique().to_list())},
                            {str(p): hash_path(p) for p in inputs})  # fmt: skip
    write_parquet(table, out_table, provenance)
    with atomic_file(out_markdown) as tmp:
        tmp.write_text(summary_markdown(table))
    if figures_dir is not None:
        from a3tune.score.figures import write_attention_overlays, write_metric_bars

        figures_dir = Path(figures_dir)
        figures_dir.mkdir(parents=True, exist_ok=True)
        write_metric_bars(table, figures_dir)
        for settings in overlays:
            write_attention_overlays(figures_dir=figures_dir, **settings)
    return table


def _skipped(metrics: dict) -> dict[str, Any]:
    """n_skipped and skipped ("reason n, ...") of a metrics.json: test samples the run could not score."""
    skipped = metrics.get("samples", {}).get("skipped", {})
    return {"n_skipped": sum(skipped.values()), "skipped": ", ".join(f"{k} {v}" for k, v in skipped.items()) or None}


def _lookup(metrics: dict, keys: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def _mean_std(column: pl.Series) -> str:
    values = column.drop_nulls().to_numpy()
    if not len(values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {np.std(values, ddof=1):.3f}"
