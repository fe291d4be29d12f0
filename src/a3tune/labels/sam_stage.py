"""Stage ``sam_masks``: SAM proposals for one shard of a data set's images, and the gather step.

Images are assigned to shards by their content hash, so adding images never moves the others to
another shard. Each shard job takes its images' proposals from the content-addressed cache
(``proposal_cache``), computes only the missing ones (the model is not even loaded when nothing is
missing), and writes ``shard-<k>.zarr`` (masks, one per chunk) with ``shard-<k>.parquet`` (one row
per mask, or one status row for an image with no proposal). ``gather`` concatenates the shard
tables into ``proposals.parquet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from a3tune.data.images import STATUS_OK, load_rgb, resolve_under
from a3tune.io.contracts import CONTRACTS
from a3tune.io.parquet import read_parquet, write_parquet
from a3tune.io.provenance import Provenance, hash_file, hash_path
from a3tune.io.shards import shard_of
from a3tune.io.zarr_store import write_store
from a3tune.labels.proposal_cache import ProposalCache, cache_key
from a3tune.labels.proposal_params import ProposalParams

log = logging.getLogger(__name__)

STATUS_NO_PROPOSALS = "no_proposals"


@dataclasses.dataclass
class ShardStats:
    images: int = 0
    computed: int = 0
    reused: int = 0
    skipped: int = 0
    seconds_total: float = 0.0  # the whole call: reading, decoding, model, filters, cache, writing
    seconds_model: float = 0.0  # inside the SAM image encoder, prompt encoder and mask decoder


def _backend_settings(backend: str, checkpoint: str | None, seed: int) -> dict[str, Any]:
    from a3tune.labels.sam_backends import litemedsam_checkpoint

    if checkpoint is None and backend == "litemedsam":
        checkpoint = str(litemedsam_checkpoint())
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint}")
    return {
        "backend": backend,
        "checkpoint": checkpoint,
        "checkpoint_sha256": hash_file(checkpoint) if checkpoint else None,
        "seed": seed if checkpoint is None else None,
    }


def shard_images(images: pl.DataFrame, shard: int, shards: int) -> pl.DataFrame:
    """This shard's images: usable ones by content hash, the others by image id."""

    def owner(row: dict) -> int:
        key = row["sha256"] or hashlib.sha256(row["image_id"].encode()).hexdigest()
        return shard_of(key, shards)

    owned = [owner(row) == shard for row in images.iter_rows(named=True)]
    return images.filter(pl.Series(owned, dtype=pl.Boolean)).sort("image_id")


def run_shard(
    images_path: str | os.PathLike,
    root: str | os.PathLike,
    shard: int,
    shards: int,
    out_store: str | os.PathLike,
    out_table: str | os.PathLike,
    *,
    backend: str,
    checkpoint: str | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike,
    device: str = "cpu",
    progress: bool = True,
) -> ShardStats:
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    started = time.perf_counter()
    proposal_params = ProposalParams.from_dict(params or {})
    settings = {**_backend_settings(backend, checkpoint, seed), "params": dataclasses.asdict(proposal_params)}
    cache = ProposalCache(cache_dir, cache_key(settings))
    images = shard_images(read_parquet(images_path, contract="images"), shard, shards)
    usable = images.filter(pl.col("status") == STATUS_OK)
    stats = ShardStats(images=images.height, skipped=images.height - usable.height)

    # Compute what the cache lacks (one entry per distinct image content).
    todo = usable.filter(~pl.col("sha256").map_elements(cache.__contains__, return_dtype=pl.Boolean))
    todo = todo.unique("sha256", keep="first", maintain_order=True)
    stats.reused = usable.height - todo.height
    if todo.height:
        from a3tune.labels.proposals import generate_proposals
        from a3tune.labels.sam_backends import build_sam

        sam = build_sam(backend, settings["checkpoint"], device=device, seed=seed)
        bar = tqdm(todo.iter_rows(named=True), total=todo.height, desc=f"sam shard {shard}", unit="img",
                   disable=not progress, mininterval=1.0)  # fmt: skip
        for row in bar:
            image = load_rgb(resolve_under(root, row["path"]))
            proposals = generate_proposals(sam, image, proposal_params)
            stats.seconds_model += proposals.timings.model_s
            cache.put(row["sha256"], proposals, proposal_params.working_size)
            stats.computed += 1
    log.info("shard %d/%d: %d images, %d computed, %d from cache, %d not usable",
             shard, shards, stats.images, stats.computed, stats.reused, stats.skipped)  # fmt: skip

    masks, rows = _assemble(images, cache, proposal_params.working_size)
    provenance = Provenance(
        stage="sam_masks",
        params={"shard": shard, "shards": shards, "cache_key": cache.dir.name, **settings},
        inputs={"images.parquet": hash_path(images_path)},
    )
    write_store(out_store, {"masks": masks}, provenance)
    write_parquet(rows, out_table, provenance, contract="proposals")
    stats.seconds_total = time.perf_counter() - started
    return stats


def _assemble(images: pl.DataFrame, cache: ProposalCache, size: int) -> tuple[np.ndarray, pl.DataFrame]:
    """Stack the shard's masks in image-id order; one status row for images without proposals."""
    masks: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for image in images.iter_rows(named=True):
        base = {"image_id": image["image_id"], "sha256": image["sha256"] or ""}
        if image["status"] != STATUS_OK:
            rows.append({**base, "status": f"image_{image['status']}"})
            continue
        found = cache.get(image["sha256"])
        if not len(found):
            rows.append({**base, "status": STATUS_NO_PROPOSALS})
            continue
        for i in range(len(found)):
            rows.append({
                **base,
                "mask_row": len(masks),
                "bbox_xywh": [int(v) for v in found.bbox_xywh[i]],
                "area": int(found.area[i]),
                "predicted_iou": float(found.predicted_iou[i]),
                "stability_score": float(found.stability_score[i]),
                "status": STATUS_OK,
            })  # fmt: skip
            masks.append(found.masks[i])
    schema = {name: col.dtype for name, col in CONTRACTS["proposals"].items()} | {"status": pl.String}
    table = pl.DataFrame(rows, schema=schema)
    stack = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    return stack, table


def gather(tables: list[str | os.PathLike], out: str | os.PathLike) -> pl.DataFrame:
    """Concatenate shard tables into proposals.parquet, with the shard of every row."""
    parts = []
    for path in tables:
        prov = _provenance_of(path)
        parts.append(read_parquet(path, contract="proposals").with_columns(pl.lit(prov.params["shard"], pl.Int32).alias("shard")))
    combined = pl.concat(parts).sort("image_id", "mask_row", nulls_last=True)
    first = _provenance_of(tables[0])
    params = {k: v for k, v in first.params.items() if k != "shard"}
    provenance = Provenance("sam_masks_gather", params, {Path(p).name: hash_path(p) for p in tables})
    write_parquet(combined, out, provenance, contract="proposals")
    return combined


def _provenance_of(path: str | os.PathLike) -> Provenance:
    from a3tune.io.provenance import read_provenance

    prov = read_provenance(path)
    if prov is None or prov.stage != "sam_masks":
        raise ValueError(f"{path} is not a sam_masks shard table")
    return prov
