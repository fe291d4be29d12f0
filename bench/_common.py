"""Shared by the benchmarks: phantom inputs with ground-truth labels, the reference's attention
statistics from full probability maps, and wall-time + peak-memory measurements (CPU: resident
set high-water mark; CUDA: the caching allocator's peak)."""

from __future__ import annotations

import ctypes
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
    result, seconds, _, extra = measure_memory(run, torch.device("cpu"))
    return result, seconds, extra


def measure_memory(run, device: torch.device):
    """Result, wall time, peak memory (MB) and its part above the level before the call (MB).

    CPU: the resident set's high-water mark, reset through /proc/self/clear_refs after freeing
    what the allocator holds (so the call's allocations touch fresh pages). CUDA: the peak of
    ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache), synchronised.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        result = run()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device)
        return result, seconds, peak / 2**20, (peak - before) / 2**20
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    return result, seconds, peak / 1024, (peak - before) / 1024


def tensor_peak(run, device: torch.device):
    """Result and the peak of live tensor memory above the level before the call (MB): tensors only.

    CUDA: ``max_memory_allocated``. CPU: the running sum of the allocations and frees the torch
    profiler records (``profile_memory``), exact where the resident set moves by allocator noise.
    """
    if device.type == "cuda":
        result, _, _, extra = measure_memory(run, device)
        return result, extra
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return result, peak / 2**20


def _malloc_trim() -> None:
    """Hand glibc's free heap memory back to the system (elsewhere: nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
