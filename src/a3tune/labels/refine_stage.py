"""Stage ``refine``: prompt-aware weak labels from SAM proposals, scored by a CLIP model.

For each image, its proposals are scored once against the queries of all its samples (masked-crop
visual prompt, 100·cos); each sample keeps its top-k masks (k by task: 8 for VQA, 4 for reports,
no score threshold by default), projected onto the model's vision-token grid with the model's own
preprocessing geometry. ``labels.zarr`` holds ``masks`` (n_labels, K, S, S) bool and ``grid``
(n_labels, K, G, G) float16, K = the largest k (rows past ``n_masks`` are empty);
``labels.parquet`` holds one row per sample with its status, kept proposal rows, kept scores,
every proposal's score and the query text. The store is filled incrementally, one label at a time,
so a data set larger than memory is fine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from a3tune.data.images import STATUS_OK, load_rgb, resolve_under
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, hash_path, read_provenance
from a3tune.io.zarr_store import build_store, open_store
from a3tune.labels.grid import GridSpec, project_masks

log = logging.getLogger(__name__)

STATUS_NO_PROPOSALS = "no_proposals"
STATUS_BELOW_MIN_SCORE = "below_min_score"
STATUS_EMPTY_GRID = "empty_grid"  # every kept mask misses every grid cell: no alignment signal
DEFAULT_TOP_K = {"vqa": 8, "report": 4}


def run_refine(
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    proposals_path: str | os.PathLike,
    root: str | os.PathLike,
    clip_dir: str | os.PathLike,
    out_store: str | os.PathLike,
    out_table: str | os.PathLike,
    *,
    dataset_format: str,
    grid: dict[str, Any],
    top_k: dict[str, int] | None = None,
    min_score: float | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> pl.DataFrame:
    from a3tune.labels.clip_scorer import build_query, load_clip, select_top_k
    from a3tune.labels.proposals import prepare_image

    top_k = {**DEFAULT_TOP_K, **(top_k or {})}
    spec = GridSpec.from_dict(grid)
    samples = read_parquet(samples_path, contract="samples")
    images = {row["image_id"]: row for row in read_parquet(images_path, contract="images").iter_rows(named=True)}
    # "row": a proposal's row in proposals.parquet, which is what labels.parquet's proposal_rows name.
    proposals = read_parquet(proposals_path, contract="proposals").with_row_index("row")
    sam_params = read_provenance(proposals_path).params["params"]
    size, channel_order = sam_params["working_size"], sam_params["channel_order"]
    stores = {k: open_store(Path(proposals_path).parent / f"shard-{k}.zarr")["masks"] for k in proposals["shard"].unique()}
    by_image = {key[0]: group for key, group in proposals.filter(pl.col("status") == STATUS_OK).group_by("image_id")}

    # Which samples get a label row: those whose image is usable and has proposals.
    def labelled(row: dict) -> bool:
        return images.get(row["image_id"], {}).get("status") == STATUS_OK and row["image_id"] in by_image

    flags = [labelled(row) for row in samples.iter_rows(named=True)]
    label_rows = np.cumsum(flags) - 1
    k_max = max(top_k.get(task, DEFAULT_TOP_K["vqa"]) for task in samples["task"].unique())
    scorer = load_clip(Path(clip_dir), device=device)
    rows: dict[str, dict[str, Any]] = {}

    provenance = Provenance(
        stage="refine",
        params={
            "format": dataset_format, "top_k": top_k, "k": k_max, "min_score": min_score, "grid": spec.to_dict(),
            "working_size": size, "channel_order": channel_order, "clip": str(clip_dir),
            "samples": str(samples_path), "images": str(images_path), "root": str(root),
        },
        inputs={"samples.parquet": hash_path(samples_path), "images.parquet": hash_path(images_path),
                "proposals.parquet": hash_path(proposals_path), "clip": hash_path(clip_dir)},
    )  # fmt: skip
    n_labels = int(sum(flags))
    with build_store(out_store, provenance) as group:
        masks_out = group.create_array("masks", shape=(n_labels, k_max, size, size), dtype=bool,
                                       chunks=(1, k_max, size, size), fill_value=False)  # fmt: skip
        grid_out = group.create_array("grid", shape=(n_labels, k_max, spec.grid, spec.grid), dtype=np.float16,
                                      chunks=(1, k_max, spec.grid, spec.grid), fill_value=0)  # fmt: skip
        grouped = samples.with_columns(pl.Series("label_row", label_rows))
        groups = sorted(grouped.group_by("image_id"), key=lambda g: g[0][0])
        for (image_id,), group_samples in tqdm(groups, desc="refine", unit="img", disable=not progress, mininterval=1.0):
            image_row = images.get(image_id)
            queries = [build_query(dataset_format, s) for s in group_samples.iter_rows(named=True)]
            if image_row is None or image_row["status"] != STATUS_OK or image_id not in by_image:
                status = STATUS_NO_PROPOSALS if image_row and image_row["status"] == STATUS_OK else (
                    f"image_{image_row['status']}" if image_row else "image_missing_from_manifest")
                for sample, query in zip(group_samples.iter_rows(named=True), queries):
                    rows[sample["sample_id"]] = _row(sample, None, status, query)
                continue
            props = by_image[image_id].sort("shard", "mask_row")
            masks = np.concatenate([
                stores[shard].oindex[part["mask_row"].to_numpy()]
                for (shard,), part in props.group_by("shard", maintain_order=True)
            ])  # fmt: skip
            proposal_index = props["row"].to_numpy()
            image = prepare_image(load_rgb(resolve_under(root, image_row["path"])), size, channel_order)
            scores = scorer.score_queries(image, masks, queries)
            hw = (image_row["height"], image_row["width"])
            for sample, query, sample_scores in zip(group_samples.iter_rows(named=True), queries, scores):
                keep = select_top_k(sample_scores, top_k[sample["task"]], min_score=min_score)
                kept = masks[keep]
                cells = project_masks(kept, hw, spec) if len(kept) else np.zeros((0, spec.grid, spec.grid))
                label_row = int(sample["label_row"])
                masks_out[label_row, : len(kept)] = kept
                grid_out[label_row, : len(kept)] = cells.astype(np.float16)
                status = STATUS_OK if cells.any() else (STATUS_EMPTY_GRID if len(kept) else STATUS_BELOW_MIN_SCORE)
                rows[sample["sample_id"]] = _row(sample, label_row, status, query, keep, sample_scores, proposal_index)
    table = _table([rows[s] for s in samples["sample_id"]])
    write_parquet(table, out_table, provenance, contract="labels")
    counts = dict(table.group_by("status").len().sort("status").iter_rows())
    log.info("refine: %d samples, %d labels, status %s", table.height, n_labels, counts)
    return table


def _row(sample, label_row, status, query, keep=(), scores=None, proposal_index=None) -> dict[str, Any]:
    keep = np.asarray(keep, dtype=np.int64)
    scores = np.zeros(0, np.float32) if scores is None else scores
    return {
        "sample_id": sample["sample_id"],
        "image_id": sample["image_id"],
        "label_row": label_row,
        "n_masks": len(keep),
        "proposal_rows": [int(proposal_index[i]) for i in keep] if proposal_index is not None else [],
        "clip_scores": [float(scores[i]) for i in keep],
        "all_scores": [float(s) for s in scores],
        "query_text": query,
        "status": status,
    }


def _table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    schema = {
        "sample_id": pl.String, "image_id": pl.String, "label_row": pl.Int64, "n_masks": pl.Int32,
        "proposal_rows": pl.List(pl.Int64), "clip_scores": pl.List(pl.Float32), "all_scores": pl.List(pl.Float32),
        "query_text": pl.String, "status": pl.String,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)
