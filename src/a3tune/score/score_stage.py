"""Stage ``score``: answers, metrics and attention grounding of one model on a data set's test split.

A scored model is the base Med-LVLM, optionally with a trained adapter, optionally decoded with an
inference-time baseline (PAI, VCD). ``score_shard`` takes the test samples of one shard (by a hash
of the sample id, so shards are stable), generates each answer (greedy or beam search) and
measures where the model looks while reading the question and the reference answer (teacher
forced, so every model is measured on the same tokens): image share, share inside the weak label
and inside the ground-truth mask, and the pointing game, over the probe's selected heads and
(``own_`` columns) over the heads the run's adapter changed (:func:`own_heads`). ``gather`` joins
the shards into ``predictions.parquet`` (sample_id, prompt, prediction, answer, answer_type,
decoding settings), ``attention.parquet`` (the grounding columns and each sample's attention map
on the token grid, for both head sets) and ``metrics.json`` (VQA accuracy per answer type and
organ, report metrics, grounding means, and ``samples``: how many test samples were scored and how many were
skipped, by reason: an unusable image, or the ``limit``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from a3tune.data.images import load_rgb, resolve_under
from a3tune.io.accounting import add_skipped, merge_accounting, split_accounting
from a3tune.io.atomic import atomic_file
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, hash_path, read_provenance
from a3tune.io.shards import shard_of
from a3tune.io.zarr_store import open_store
from a3tune.labels.audit import read_gt_mask
from a3tune.labels.grid import GridSpec, project_masks
from a3tune.labels.model_inputs import label_maps, labelled_samples

log = logging.getLogger(__name__)

BASELINES = ("pai", "vcd")
GT_SIZE = 256  # ground-truth masks are squashed to this square before projection, like SAM's masks


def score_shard(
    model: dict[str, Any],
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    labels_dir: str | os.PathLike,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    heads_path: str | os.PathLike | None = None,
    baseline: str | None = None,
    decode: dict[str, Any] | None = None,
    split: str = "test",
    shard: int = 0,
    shards: int = 1,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Score the ``split`` samples of one shard; writes one Parquet table with everything ``gather`` needs."""
    from a3tune.models.layout import encode_batch
    from a3tune.score.generation import DecodeSettings, generate_answers, load_scored_model
    from a3tune.score.grounding import grounding_scores

    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"score: unknown baseline {baseline!r}; known: {BASELINES}")
    settings = DecodeSettings(**(decode or {}))
    if baseline is not None:
        # The contrast passes need one row per sample: baselines decode greedily (PAI as the reference;
        # the reference samples with VCD, greedy keeps the scores deterministic)
        settings = dataclasses.replace(settings, num_beams=1, do_sample=False)
    labels_dir, root = Path(labels_dir), Path(root)
    lvlm = load_scored_model(model, str(adapter) if adapter else None)
    heads, own = _selected_heads(heads_path), own_heads(adapter)
    samples = labelled_samples(samples_path, images_path, labels_dir / "labels.parquet", split)
    samples = samples.filter(pl.col("sample_id").map_elements(lambda s: _shard(s, shards) == shard, return_dtype=pl.Boolean))
    accounting = split_accounting(samples_path, images_path, split, keep=lambda s: _shard(s, shards) == shard)
    if limit is not None:
        accounting = add_skipped(accounting, "limit", samples.height - limit)
        samples = samples.head(limit)
    grids = open_store(labels_dir / "labels.zarr")["grid"]
    spec = GridSpec(grid=lvlm.grid, input_size=lvlm.input_size, preprocess=lvlm.preprocess, mode="area")

    parts, lengths = [], {}
    bar = tqdm(total=samples.height, desc=f"score shard {shard}", unit="sample", disable=not progress, mininterval=1.0)
    for start in range(0, samples.height, batch_size):
        part = samples.slice(start, batch_size)
        pixels = [load_rgb(resolve_under(root, p)) for p in part["path"]]
        questions, answers = part["question"].to_list(), part["answer"].to_list()
        batch_settings = settings.for_tasks(part["task"].to_list())
        lengths |= dict.fromkeys(part["task"].unique().to_list(), batch_settings.max_new_tokens)
        predictions = generate_answers(lvlm, pixels, questions, batch_settings,
                                       logits_processors=_baseline(baseline, lvlm))  # fmt: skip
        maps = {"label": label_maps(grids, part["label_row"].to_list(), lvlm.n_image_tokens)[0],
                "gt": _gt_maps(part, root, spec)}  # fmt: skip
        batch = encode_batch(lvlm, pixels, questions, answers)
        grounding = grounding_scores(lvlm, batch, maps, heads, own)
        parts.append(part.select("sample_id", "question", "answer", "answer_type", "task", "organ")
                     .with_columns(pl.Series("prediction", predictions, pl.String))
                     .hstack(grounding.drop("sample_id", strict=False)))  # fmt: skip
        bar.update(part.height)
    bar.close()
    table = pl.concat(parts) if parts else pl.DataFrame()
    # the settings as configured, and the decoding length each task actually got
    decoding = {**vars(settings), "baseline": baseline, "max_new_tokens_used": dict(sorted(lengths.items()))}
    provenance = Provenance.for_inputs(
        "score", {"model": model, "dtype": str(lvlm.model.dtype), "adapter": str(adapter) if adapter else None,
                  "decoding": decoding, "split": split, "shard": shard, "shards": shards,
                  "heads": str(heads_path) if heads_path else None, "samples": accounting},
        {"samples.parquet": samples_path, "images.parquet": images_path, "labels.parquet": labels_dir / "labels.parquet",
         **({"adapter": adapter} if adapter else {})},
    )  # fmt: skip
    write_parquet(table, out, provenance)
    return table


def gather(
    shard_tables: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    meteor: bool | None = None,
    tokenizer: str = "auto",
    reference_quirks: bool = True,
    clinical: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join the shard tables; write predictions.parquet, attention.parquet and metrics.json into ``out_dir``.

    ``meteor``, ``tokenizer``: as :func:`a3tune.score.report_metrics.evaluate_reports` (None / auto: METEOR and the
    Java PTB tokenizer when Java is on PATH). ``reference_quirks``: VQA scored with the reference scorer's quirks
    (default, comparable with published numbers) or the corrected scorer (:mod:`a3tune.score.vqa_metrics`).
    ``clinical``: the settings of the registered clinical metrics (e.g. CheXbert's paths and
    ``uncertain_positive``), recorded with the metrics because they change the numbers.
    """
    from a3tune.score.report_metrics import evaluate_reports
    from a3tune.score.vqa_metrics import score_vqa, summarize_vqa

    tables = [read_parquet(path) for path in shard_tables]
    shards = [read_provenance(path) for path in shard_tables]
    for path, shard in zip(shard_tables, shards):
        if shard is None or shard.stage != "score":
            raise ValueError(f"{path} is not a score shard table")
    first = shards[0]
    accounting = merge_accounting([shard.params["samples"] for shard in shards])
    table = pl.concat([t for t in tables if t.height], how="vertical_relaxed").sort("sample_id")
    used = {task: n for shard in shards for task, n in shard.params["decoding"]["max_new_tokens_used"].items()}
    decoding = {**first.params["decoding"], "max_new_tokens_used": used}  # each shard's tasks: the run's
    out_dir = Path(out_dir)
    params = {k: v for k, v in first.params.items() if k not in ("shard", "samples")}
    params |= {"samples": accounting, "reference_quirks": reference_quirks, "meteor": meteor, "tokenizer": tokenizer,
               "clinical": clinical or {}}
    provenance = Provenance("score_gather", params, {Path(p).name: hash_path(p) for p in shard_tables})
    vqa = table.filter(pl.col("task") == "vqa")
    scored = score_vqa(vqa.select("sample_id", "prediction", "answer", "answer_type", "organ"),
                       reference_quirks=reference_quirks) if vqa.height else None  # fmt: skip
    # Each closed item's hit, for paired comparisons of runs on the same items (stage report)
    hits = pl.DataFrame(schema={"sample_id": pl.String, "hit": pl.Float64})
    if scored is not None:
        hits = scored.select("sample_id", "hit")
    predictions = table.select("sample_id", pl.col("question").alias("prompt"), "prediction", "answer", "answer_type",
                               "task", "organ").with_columns(
        pl.lit(json.dumps(decoding, sort_keys=True)).alias("decoding")).join(hits, on="sample_id", how="left")  # fmt: skip
    write_parquet(predictions, out_dir / "predictions.parquet", provenance)
    grounding_columns = [c for c in table.columns if c in GROUNDING_COLUMNS]
    attention = table.select("sample_id", "answer_type", "organ", *grounding_columns)
    write_parquet(attention, out_dir / "attention.parquet", provenance)

    metrics: dict[str, Any] = {"n": table.height, "samples": accounting, "decoding": decoding}
    if scored is not None:
        metrics["vqa"] = {**summarize_vqa(scored), "reference_quirks": reference_quirks}
    reports = table.filter(pl.col("task") == "report")
    if reports.height:
        result = evaluate_reports(reports["prediction"].to_list(), reports["answer"].to_list(), meteor=meteor,
                                  tokenizer=tokenizer)  # fmt: skip
        metrics["report"] = {**result.corpus, "tokenizer": result.tokenizer}
    metrics["grounding"] = {c: _mean(table[c]) for c in grounding_columns if not c.endswith("attention_map")}
    with atomic_file(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"metrics": metrics, "provenance": json.loads(provenance.to_json())}, indent=2,
                                  sort_keys=True, default=float) + "\n")  # fmt: skip
    return metrics


# Over the probe's selected heads, then (own_) over the heads the run's adapter changed (own_heads)
PROBE_GROUNDING_COLUMNS = ("image_share", "inside_label", "inside_gt", "pointing_hit", "attention_map")
GROUNDING_COLUMNS = PROBE_GROUNDING_COLUMNS + tuple(f"own_{c}" for c in PROBE_GROUNDING_COLUMNS)


def own_heads(adapter: str | os.PathLike | None) -> dict[int, tuple[int, ...]] | None:
    """The heads whose q/k the adapter at ``adapter`` changed (layer -> heads), the ``own_`` grounding set.

    An adapter restricted to heads (a static-head run: ``heads`` in its ``adapter_config.json``)
    -> those heads, when it adapts q/k (``qk`` not ``none``). Every other case -> None, every head
    of every layer: an adapter on every head's q/k (``heads`` null), an adapter without a q/k part
    and no adapter at all (the base model) single out no head, so they are measured on all of them.
    Inference-time baselines are scored with their run's adapter and follow the same rule.
    """
    if adapter is None or str(adapter) == "":
        return None
    from a3tune.tune.adapter_config import AdapterConfig
    from a3tune.tune.adapters import CONFIG_NAME

    config = AdapterConfig.from_json((Path(adapter) / CONFIG_NAME).read_text())
    return None if config.qk == "none" else config.heads


def _mean(column: pl.Series) -> float | None:
    values = column.cast(pl.Float64).drop_nulls()
    return float(values.mean()) if len(values) else None


def _shard(sample_id: str, shards: int) -> int:
    return shard_of(hashlib.sha256(sample_id.encode()).hexdigest(), shards)


def _selected_heads(heads_path) -> dict[int, list[int]] | None:
    if heads_path is None:
        return None
    from a3tune.tune.tune_stage import selected_heads

    return selected_heads(heads_path)


def _gt_maps(part: pl.DataFrame, root: Path, spec: GridSpec) -> torch.Tensor | None:
    """Ground-truth masks projected on the model's grid (B, 1, G·G); None when no sample has one."""
    if "gt_mask_ref" not in part.columns or part["gt_mask_ref"].is_null().all():
        return None
    out = np.zeros((part.height, 1, spec.grid * spec.grid), np.float32)
    for i, row in enumerate(part.iter_rows(named=True)):
        if row["gt_mask_ref"] is not None:
            mask = read_gt_mask(resolve_under(root, row["gt_mask_ref"]), GT_SIZE)
            out[i, 0] = project_masks(mask[None], (row["height"], row["width"]), spec).reshape(-1)
    return torch.from_numpy(out)


def _baseline(baseline: str | None, lvlm) -> list | None:
    """The logits-processor factory of an inference-time baseline (one per generate call), or None."""
    if baseline is None:
        return None
    from a3tune.score.baselines import pai_processor, vcd_processor

    return [functools.partial({"pai": pai_processor, "vcd": vcd_processor}[baseline], lvlm)]
