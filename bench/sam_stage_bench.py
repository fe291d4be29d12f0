"""Benchmark of the sam_masks stage: throughput, time outside the model, incremental rerun cost.

    python bench/sam_stage_bench.py [--images 100] [--backend litemedsam] [--params '{"generator": "boxes"}']

Generates a phantom data set, runs the stage on all images (one shard, cold cache), changes 1 % of
the images, re-imports and reruns the stage, and prints one table of ratios measured in this run:
images/s, the share of stage wall time spent outside the SAM model (target <= 5 %), and the rerun
time over the full-stage time (target <= 3 %).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.labels.sam_stage import run_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="phantom images (all in the train split)")
    parser.add_argument("--backend", default="litemedsam")
    parser.add_argument("--params", default=None, help="proposal parameters (JSON; default: config.yaml's labels.sam.params)")
    parser.add_argument("--changed", type=float, default=0.01, help="share of images changed before the rerun")
    args = parser.parse_args()
    params = json.loads(args.params) if args.params else demo_params()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "raw"
        generate(PhantomConfig.from_dict({"n_images": {"train": args.images, "val": 0, "test": 0}}), root)
        images = tmp / "images.parquet"
        import_dataset("phantom", root, "bench", tmp / "samples.parquet", images, progress=False)

        def stage():
            started = time.perf_counter()
            stats = run_shard(images, root, 0, 1, tmp / "shard-0.zarr", tmp / "shard-0.parquet",
                              backend=args.backend, params=params, cache_dir=tmp / "cache", progress=False)  # fmt: skip
            return stats, time.perf_counter() - started

        full, full_s = stage()
        n_changed = max(1, round(args.changed * args.images))
        for path in sorted((root / "images").glob("*.png"))[:n_changed]:
            pixels = np.asarray(Image.open(path)).copy()
            pixels[:4, :4] = 255 - pixels[:4, :4]
            Image.fromarray(pixels).save(path)
        import_dataset("phantom", root, "bench", tmp / "samples.parquet", images, progress=False)
        rerun, rerun_s = stage()

    outside = 1 - full.seconds_model / full_s
    rows = [
        ("images", f"{full.images}", ""),
        ("full stage, s", f"{full_s:.1f}", ""),
        ("images/s", f"{full.images / full_s:.3f}", ""),
        ("time outside the model", f"{outside:.1%}", "<= 5 %"),
        (f"rerun after changing {n_changed} image(s), s", f"{rerun_s:.2f}", ""),
        ("images recomputed in the rerun", f"{rerun.computed}", f"{n_changed}"),
        ("rerun / full stage", f"{rerun_s / full_s:.1%}", "<= 3 %"),
    ]
    print(f"sam_masks stage, backend {args.backend}, params {json.dumps(params)}")
    print(f"| {'measure':<44} | {'value':>10} | target |")
    print(f"|{'-' * 46}|{'-' * 12}|--------|")
    for name, value, target in rows:
        print(f"| {name:<44} | {value:>10} | {target:<6} |")


def demo_params() -> dict:
    """The proposal parameters of the embedded demo (config.yaml), so the bench measures what the demo runs."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    return config["labels"]["sam"]["params"]


if __name__ == "__main__":
    main()
