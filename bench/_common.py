"""Shared by the benchmarks: phantom inputs with ground-truth labels, the reference's attention
statistics from full probability maps, and a wall-time + peak-memory measurement."""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from a3tune.data.images import load_rgb, resolve_under
from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.labels.audit import read_gt_mask
from a3tune.labels.grid import GridSpec, project_masks
from a3tune.models.capture import LayerCapture
from a3tune.models.layout import encode_batch


def phantom_batches(lvlm, n: int, batch: int) -> list:
    """Encoded batches of phantom VQA samples, with the queried structure's mask on the token grid."""
    tmp = Path(tempfile.mkdtemp())
    generate(PhantomConfig.from_dict({"n_images": {"train": n, "val": 0, "test": 0}}), tmp / "raw")
    import_dataset("phantom", tmp / "raw", "bench", tmp / "samples.parquet", tmp / "images.parquet", progress=False)
    images = pl.read_parquet(tmp / "images.parquet").select("image_id", "path", "height", "width")
    samples = (pl.read_parquet(tmp / "samples.parquet").filter(pl.col("task") == "vqa", pl.col("gt_mask_ref").is_not_null())
               .join(images, on="image_id").sort("sample_id").head(n))  # fmt: skip
    spec = GridSpec(grid=lvlm.grid, input_size=lvlm.input_size, preprocess=lvlm.preprocess, mode="area")
    out = []
    for start in range(0, samples.height, batch):
        part = samples.slice(start, batch)
        pixels = [load_rgb(resolve_under(tmp / "raw", p)) for p in part["path"]]
        encoded = encode_batch(lvlm, pixels, part["question"].to_list(), part["answer"].to_list())
        grids = [project_masks(read_gt_mask(resolve_under(tmp / "raw", r["gt_mask_ref"]), r["height"])[None],
                               (r["height"], r["width"]), spec) for r in part.iter_rows(named=True)]  # fmt: skip
        labels = torch.from_numpy(np.stack(grids).reshape(len(grids), 1, -1).astype(np.float32))
        out.append((encoded, labels))
    return out


def captures_from_probabilities(attentions, image_index: torch.Tensor, labels: torch.Tensor) -> dict:
    """What the capture gives, computed the reference's way from the full (B, H, N, N) probabilities."""
    out = {}
    for layer, probs in enumerate(attentions):
        columns = image_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        on_image = probs.gather(-1, columns)  # (B, H, N, n_img)
        inside = torch.einsum("bhti,bki->bhkt", on_image, labels)
        out[layer] = LayerCapture(torch.arange(probs.shape[1]), on_image.sum(-1), inside, None, 0)
    return out


def measure(run):
    """Result, wall time and peak resident memory above the level before the call (MB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    return result, seconds, (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


