"""Closed accuracy split by what a benchmark controls, and paired run differences with intervals.

A shifted benchmark (the phantom) marks each sample with what makes it hard: ``cue_agrees`` (does
the shortcut cue agree with the answer: yes/no) and ``confuser`` (none, or the look-alike drawn
elsewhere). Accuracy on the items where the cue disagrees measures how much a run relies on the
cue; accuracy with a confuser, whether it looks at the asked-about organ. Data sets without these
columns get nulls.

Runs are compared on the same test items: a tuned run's ``closed_acc_minus_lora`` is its mean
closed hit minus the ``lora`` run's of the same seed, over the closed items both scored. The
summary gives, per method, the mean of these per-seed differences and its 95 % interval from
Student's t with (seeds - 1) degrees of freedom.
"""

from __future__ import annotations

import math
import os

import polars as pl
from scipy import stats

from a3tune.io.parquet import read_parquet

REFERENCE_METHOD = "lora"
# Summary column -> (sample column, the group's rows)
GROUPS = {
    "closed_acc_cue_agrees": ("cue_agrees", pl.col("cue_agrees") == "yes"),
    "closed_acc_cue_disagrees": ("cue_agrees", pl.col("cue_agrees") == "no"),
    "closed_acc_confuser": ("confuser", pl.col("confuser") != "none"),
    "closed_acc_no_confuser": ("confuser", pl.col("confuser") == "none"),
}
DIFFERENCE = "closed_acc_minus_lora"


def closed_items(predictions_path: str | os.PathLike, samples: pl.DataFrame) -> pl.DataFrame:
    """sample_id and hit of each scored closed item, with the samples' ``cue_agrees``/``confuser`` when present."""
    predictions = read_parquet(predictions_path)
    if "hit" not in predictions.columns:
        raise ValueError(f"{predictions_path}: no per-item 'hit' column; rerun its score_gather job")
    items = predictions.filter(pl.col("answer_type").str.to_lowercase() == "closed").select("sample_id", "hit")
    extra = [c for c in sorted({source for source, _ in GROUPS.values()}) if c in samples.columns]
    return items.join(samples.select("sample_id", *extra), on="sample_id", how="left")


def group_accuracies(items: pl.DataFrame) -> dict[str, float | None]:
    """Mean hit within each group of ``GROUPS``; None where the column is absent or the group empty."""
    out: dict[str, float | None] = {}
    for column, (source, predicate) in GROUPS.items():
        if source not in items.columns:
            out[column] = None
            continue
        hits = items.filter(predicate & pl.col("hit").is_not_null())["hit"]
        out[column] = float(hits.mean()) if len(hits) else None
    return out


def paired_difference(items: pl.DataFrame, reference: pl.DataFrame) -> float | None:
    """Mean hit of ``items`` minus that of ``reference`` over the closed items both scored (None if none)."""
    both = items.select("sample_id", "hit").join(reference.select("sample_id", pl.col("hit").alias("ref")),
                                                 on="sample_id").drop_nulls()  # fmt: skip
    if both.is_empty():
        return None
    return float((both["hit"] - both["ref"]).mean())


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of its ``level`` Student-t interval); the half-width is None for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
