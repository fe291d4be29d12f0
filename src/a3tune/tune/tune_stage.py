"""Stage ``tune``: train one run's adapters on a data set's training split.

A run is a data set preset for the model's backbone and a method (``settings.resolve_settings``)
plus a seed; the backbone is configured, or read from the loaded model's config (``resolve_backbone``).
Inputs: the
base Med-LVLM, the samples with their weak labels, and (static heads) the probe's heads.parquet.
Outputs, in the run folder: ``adapter/`` (adapter_model.safetensors + adapter_config.json naming the
base model, the heads, the MoE layout and every setting, with the inputs' hashes) and
``train_log.parquet`` (loss parts per micro-batch, routing entropy, learning rate; provenance in
its metadata). Both record ``samples``: how many training samples were used and how many were skipped,
by reason (an unusable image, ``image_<status>``; :mod:`a3tune.io.accounting`). Checkpoints go to
``checkpoint_root/<fingerprint>/``, outside the outputs, because Snakemake deletes a job's outputs
before it reruns the job and a killed run must find them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import polars as pl

from a3tune.io.accounting import split_accounting
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance
from a3tune.io.zarr_store import open_store
from a3tune.labels.model_inputs import labelled_samples
from a3tune.tune.settings import BACKBONES, backbone_of, resolve_settings

log = logging.getLogger(__name__)


def run_tune(
    model: dict[str, Any],
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    labels_dir: str | os.PathLike,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint_root: str | os.PathLike,
    *,
    preset: str,
    method: str,
    heads_path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    backbone: str = "auto",
    progress: bool = True,
) -> pl.DataFrame:
    from a3tune.models.registry import lvlm_from_config, spec_dtype
    from a3tune.probe.probe_stage import check_label_geometry
    from a3tune.tune.trainer import TrainData, train

    overrides = {**(overrides or {}), "seed": seed}
    resolve_backbone(backbone, None)  # names checked before a (minutes-long) model load
    resolve_settings(preset, method, overrides)
    lvlm = lvlm_from_config(on_rank_gpu(model))
    backbone = resolve_backbone(backbone, lvlm.model.config)
    settings = resolve_settings(preset, method, overrides, backbone=backbone)
    labels_dir = Path(labels_dir)
    heads = selected_heads(heads_path) if settings.heads == "static" else None
    if settings.heads == "static" and heads_path is None:
        raise ValueError(f"tune: method {method!r} uses the probe's heads; pass heads.parquet")
    inputs = {"samples.parquet": samples_path, "images.parquet": images_path,
              "labels.parquet": labels_dir / "labels.parquet", "labels.zarr": labels_dir / "labels.zarr"}  # fmt: skip
    if heads is not None:
        inputs["heads.parquet"] = heads_path
    if "path" in model:
        inputs["model"] = model["path"]
    if settings.train_images == "cue_shuffled":
        inputs["cue_shuffled"] = Path(root) / "cue_shuffled"
    accounting = split_accounting(samples_path, images_path, "train")
    provenance = Provenance.for_inputs(
        "tune", {"model": model, "dtype": str(spec_dtype(model)), "preset": preset, "method": method,
                 "backbone": backbone, "settings": settings.to_dict(),
                 "heads": {str(k): v for k, v in (heads or {}).items()}, "samples": accounting}, inputs)  # fmt: skip
    checkpoints = Path(checkpoint_root) / fingerprint(provenance)

    check_label_geometry(labels_dir / "labels.zarr", lvlm)
    samples = labelled_samples(samples_path, images_path, labels_dir / "labels.parquet", "train")
    if settings.train_images == "cue_shuffled":
        samples = on_cue_shuffled_twins(samples, samples_path)
    data = TrainData(samples, Path(root), open_store(labels_dir / "labels.zarr")["grid"])
    log.info("tune: %s/%s on %s, %d training samples (%d labelled; skipped: %s), %d optimizer steps", preset, method,
             backbone, samples.height, samples["label_row"].is_not_null().sum(), accounting["skipped"],
             settings.total_steps(samples.height))  # fmt: skip
    table = train(lvlm, settings, data, out_dir, checkpoints, heads=heads, progress=progress,
                  record={"provenance": json.loads(provenance.to_json()), "samples": accounting})  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        write_parquet(table, Path(out_dir) / "train_log.parquet", provenance)
    return table


def on_cue_shuffled_twins(samples: pl.DataFrame, samples_path: str | os.PathLike) -> pl.DataFrame:
    """The training samples with each image replaced by its cue-shuffled twin (``image_cue_shuffled``,
    the phantom's); a data set without twins for every sample cannot train such a run."""
    column = "image_cue_shuffled"
    missing = samples.height if column not in samples.columns else int(samples[column].is_null().sum())
    if missing:
        raise ValueError(f"tune: train_images cue_shuffled (method lora_nocue) needs a cue-shuffled twin of every "
                         f"training image (column {column!r}, written by the phantom generator); {missing} of "
                         f"{samples.height} training samples in {samples_path} have none")  # fmt: skip
    return samples.with_columns(pl.col(column).alias("path"))


def resolve_backbone(backbone: str, model_config: Any) -> str:
    """The backbone whose preset numbers a run takes: ``backbone`` as configured, or for ``auto`` the
    one of the loaded model's config (``settings.backbone_of``); ``model_config`` None only checks the name."""
    if backbone not in ("auto", *BACKBONES):
        raise ValueError(f"tune: unknown backbone {backbone!r}; known: {['auto', *BACKBONES]}")
    if backbone != "auto" or model_config is None:
        return backbone
    return backbone_of(model_config)


def on_rank_gpu(model: dict[str, Any]) -> dict[str, Any]:
    """The model spec with a bare ``cuda`` device pinned to this rank's GPU (a launcher's ``LOCAL_RANK``).

    Every rank loads its own copy of the base model; ``cuda`` alone would put all of them on GPU 0
    before DeepSpeed moves each to its rank's GPU. Only the load is pinned: the provenance, and with
    it the checkpoint folder that all ranks share, keeps the spec as configured.
    """
    if model.get("device") != "cuda" or "LOCAL_RANK" not in os.environ:
        return model
    return {**model, "device": f"cuda:{os.environ['LOCAL_RANK']}"}


def selected_heads(heads_path: str | os.PathLike) -> dict[int, list[int]]:
    """layer -> selected head indices, from the probe's heads.parquet."""
    table = read_parquet(heads_path, contract="heads").filter(pl.col("selected")).sort("layer", "head")
    if table.is_empty():
        raise ValueError(f"{heads_path}: no head is selected")
    return {int(layer): part["head"].to_list() for (layer,), part in table.group_by("layer", maintain_order=True)}


def fingerprint(provenance: Provenance) -> str:
    """A short hash of everything that decides the run (settings, inputs): its checkpoint folder name."""
    return hashlib.sha256(provenance.to_json().encode()).hexdigest()[:16]
