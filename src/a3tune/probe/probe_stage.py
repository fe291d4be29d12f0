"""Stage ``probe_heads``: rank every attention head of the Med-LVLM by how much it looks at the image.

The probe set is a seeded sample of one split (the training split by default), taken from the
samples whose weak label is usable when there are any. Each sample goes through the model once,
teacher-forced with its answer, with the capture attention function on every layer of the language
model: SDPA computes the output, and one extra SDPA call per layer gives each query row's image
share and inside-label mass without any N×N probability map (``a3tune.models.capture``).

Writes ``heads.parquet`` (DESIGN.md §3: layer, head, score, inside_score, rank, selected; the
probe's parameters in the provenance, with ``samples``: how many samples of the split were probed and
how many were skipped, by reason) and a layers × heads heatmap PNG for the report.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import polars as pl
import torch
from tqdm import tqdm

from a3tune.data.images import load_rgb, resolve_under
from a3tune.io.accounting import add_skipped, split_accounting
from a3tune.io.parquet import write_parquet
from a3tune.io.provenance import Provenance, hash_path, read_provenance
from a3tune.io.zarr_store import open_store
from a3tune.labels.model_inputs import label_maps, labelled_samples
from a3tune.probe.head_scores import HeadScoreAccumulator

log = logging.getLogger(__name__)


def run_probe(
    model: dict[str, Any],
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    labels_table: str | os.PathLike,
    labels_store: str | os.PathLike,
    root: str | os.PathLike,
    out_table: str | os.PathLike,
    out_figure: str | os.PathLike | None = None,
    *,
    split: str = "train",
    n_samples: int = 64,
    batch_size: int = 4,
    top_k: float = 128,
    rank_by: str = "score",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> pl.DataFrame:
    """Probe every head on a sample of ``split`` and write the ranked heads table (and heatmap)."""
    from a3tune.models.capture import capture_attention, enable_capture
    from a3tune.models.layout import encode_batch, first_post_image_row
    from a3tune.models.registry import lvlm_from_config

    if batch_size < 1 or n_samples < 1:
        raise ValueError(f"probe: batch_size and n_samples must be positive, got {batch_size}, {n_samples}")
    lvlm = lvlm_from_config(model)
    check_label_geometry(labels_store, lvlm)
    lvlm.model.to(device).eval()
    enable_capture(lvlm.model)

    probe_set, accounting = choose_probe_set(samples_path, images_path, labels_table, split, n_samples, seed)
    grids = open_store(labels_store)["grid"]
    text = lvlm.model.config.text_config
    acc = HeadScoreAccumulator(text.num_hidden_layers, text.num_attention_heads)
    bar = tqdm(total=probe_set.height, desc="probe_heads", unit="sample", disable=not progress, mininterval=1.0)
    for start in range(0, probe_set.height, batch_size):
        part = probe_set.slice(start, batch_size)
        images = [load_rgb(resolve_under(root, path)) for path in part["path"]]
        batch = encode_batch(lvlm, images, part["question"].to_list(), part["answer"].to_list())
        labels, real = label_maps(grids, part["label_row"].to_list(), lvlm.n_image_tokens)
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        with torch.no_grad(), capture_attention(heads="all", image_index=batch.image_index.to(device),
                                                labels=labels.to(device),
                                                row_start=first_post_image_row(batch.post_image)) as captured:  # fmt: skip
            lvlm.model(**inputs)
        acc.add(captured, batch.post_image.to(device), real.to(device))
        bar.update(part.height)
    bar.close()

    table = acc.table(top_k, rank_by)
    provenance = Provenance(
        stage="probe_heads",
        params={
            "model": model, "split": split, "n_samples": acc.n_samples, "n_labelled": acc.n_labelled,
            "requested_samples": n_samples, "batch_size": batch_size, "top_k": top_k, "rank_by": rank_by,
            "seed": seed, "n_layers": acc.n_layers, "n_heads": acc.n_heads,
            "selected": int(table["selected"].sum()), "grid": lvlm.grid, "preprocess": lvlm.preprocess,
            "dtype": str(lvlm.model.dtype), "samples": accounting,
        },
        inputs=_input_hashes(model, samples_path, images_path, labels_table, labels_store),
    )  # fmt: skip
    write_parquet(table, out_table, provenance, contract="heads")
    if out_figure is not None:
        from a3tune.probe.heatmap import write_heatmap

        write_heatmap(table, out_figure, title=f"{acc.n_samples} probe samples ({acc.n_labelled} labelled)")
    top = table.sort("rank").head(5)
    log.info("probe_heads: %d samples (skipped: %s), %d heads, top %s", acc.n_samples, accounting["skipped"],
             table.height, [(r["layer"], r["head"], round(r["score"], 3)) for r in top.iter_rows(named=True)])  # fmt: skip
    return table


def check_label_geometry(labels_store: str | os.PathLike, lvlm) -> None:
    """Refuse labels projected for another vision grid or preprocessing than the model's."""
    provenance = read_provenance(labels_store)
    if provenance is None or "grid" not in provenance.params:
        raise ValueError(f"{labels_store}: no refine provenance with a grid spec; is it a labels store?")
    spec = provenance.params["grid"]
    wanted = {"grid": lvlm.grid, "input_size": lvlm.input_size, "preprocess": lvlm.preprocess}
    wrong = {k: (spec.get(k), v) for k, v in wanted.items() if spec.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} {have!r} (model: {want!r})" for k, (have, want) in wrong.items())
        raise ValueError(f"{labels_store}: labels were projected with {detail}; set labels.grid in the config "
                         "to the model's geometry and rerun refine")  # fmt: skip


def choose_probe_set(
    samples_path, images_path, labels_table, split: str, n: int, seed: int
) -> tuple[pl.DataFrame, dict[str, object]]:
    """A seeded sample of ``split`` with usable images, from the labelled samples when there are any.

    Columns: sample_id, question, answer, path (image, relative to the data root) and label_row
    (null without a usable label); sorted by sample_id. With it, the split's accounting
    (:func:`a3tune.io.accounting.split_accounting`): skipped for an unusable image (``image_<status>``),
    for no usable weak label while others have one (``no_label``) and beyond ``n`` (``n_samples``).
    """
    usable = labelled_samples(samples_path, images_path, labels_table, split)
    if usable.is_empty():
        raise ValueError(f"probe: no samples of split {split!r} with a usable image in {samples_path}")
    labelled = usable.filter(pl.col("label_row").is_not_null())
    pool = labelled if not labelled.is_empty() else usable
    if labelled.is_empty():
        log.warning("probe: no sample of split %r has a usable weak label; inside_score stays empty", split)
    chosen = pool.sample(n=min(n, pool.height), seed=seed, shuffle=True) if pool.height > n else pool
    accounting = add_skipped(split_accounting(samples_path, images_path, split), "no_label", usable.height - pool.height)
    accounting = add_skipped(accounting, "n_samples", pool.height - chosen.height)
    return chosen.select("sample_id", "question", "answer", "path", "label_row").sort("sample_id"), accounting


def _input_hashes(model: dict[str, Any], *paths) -> dict[str, str]:
    names = ("samples.parquet", "images.parquet", "labels.parquet", "labels.zarr")
    hashes = {name: hash_path(path) for name, path in zip(names, paths)}
    if "path" in model:
        hashes["model"] = hash_path(model["path"])
    return hashes
