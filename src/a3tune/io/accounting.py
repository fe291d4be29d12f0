"""How many samples a stage used and how many it skipped, and why: the ``samples`` block of its outputs.

Stages read a split's samples joined with the usable images (``status == ok``); a sample whose image is missing,
empty, unreadable or too large is skipped there. :func:`split_accounting` counts those skips by the image's status,
so that no sample disappears without a count: ``{"used": n, "skipped": {"image_<status>": n, ...}}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import polars as pl

from a3tune.io.parquet import read_parquet


def split_accounting(
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    split: str | None,
    *,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, object]:
    """Samples of ``split`` (all splits for None; only sample ids with ``keep(id)`` when given) by image status.

    ``used`` counts those whose image is ok; ``skipped`` the others, keyed ``image_<status>`` (``image_not_listed``
    for an image id absent from images.parquet).
    """
    samples = read_parquet(samples_path, contract="samples").select("sample_id", "split", "image_id")
    if split is not None:
        samples = samples.filter(pl.col("split") == split)
    if keep is not None:
        samples = samples.filter(pl.col("sample_id").map_elements(keep, return_dtype=pl.Boolean))
    images = read_parquet(images_path, contract="images").select("image_id", "status")
    status = samples.join(images, on="image_id", how="left")["status"].fill_null("not_listed")
    counts = status.value_counts()
    by_status = dict(zip(counts["status"].to_list(), counts["count"].to_list()))
    used = int(by_status.pop("ok", 0))
    return {"used": used, "skipped": {f"image_{k}": int(v) for k, v in sorted(by_status.items())}}


def add_skipped(accounting: dict[str, object], reason: str, n: int) -> dict[str, object]:
    """``accounting`` with ``n`` of its used samples moved to ``skipped[reason]`` (nothing when n is 0)."""
    if n <= 0:
        return accounting
    skipped = dict(accounting["skipped"])  # type: ignore[arg-type]
    skipped[reason] = skipped.get(reason, 0) + n
    return {"used": int(accounting["used"]) - n, "skipped": skipped}  # type: ignore[arg-type]


def merge_accounting(parts: list[dict[str, object]]) -> dict[str, object]:
    """The sum of several accountings (the shards of one run)."""
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, n in part["skipped"].items():  # type: ignore[union-attr]
            skipped[reason] = skipped.get(reason, 0) + int(n)
    return {"used": sum(int(p["used"]) for p in parts), "skipped": dict(sorted(skipped.items()))}  # type: ignore[arg-type]
