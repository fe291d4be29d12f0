"""Peak memory of ``convert_model`` against the checkpoint's size: the conversion streams shard by shard.

Writes a tiny LLaVA-Med v1.5 checkpoint and a synthetic one of about 1 GB (the same layout with a
wider, deeper language model; tests/fixtures_llava_med.py), converts each in a fresh process and
prints the peak resident and anonymous memory above the level after imports, and the anonymous
peak as a ratio of the checkpoint size.

    python bench/convert_bench.py [--size-mb 1024] [--shard 256MB]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/fixtures_llava_med.py writes the original layout


def _write(root: Path, size_mb: int) -> None:
    from a3tune.compat import ensure_torchvision

    ensure_torchvision()  # before the fixtures import transformers' image processors
    from tests.fixtures_llava_med import write_tower, write_v15

    tower = write_tower(root / "clip")
    write_v15(root / "tiny", tower)
    # fp32 Mistral-shaped layers of hidden 1024, intermediate 4096: 62.9 MB each (GQA 4 q : 1 kv heads)
    layers = max(1, round(size_mb / 62.9))
    write_v15(root / "big", tower, sizes={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers,
                                          "num_attention_heads": 8})  # fmt: skip


def _anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no RssAnon")


def _convert(source: Path, out: Path, vision: Path, shard: str) -> None:
    """Print seconds, peak RSS and peak anonymous RSS above the level after imports (MB).

    RSS counts the source's memory-mapped pages (safetensors are read through mmap), which are
    page cache the kernel can drop; anonymous memory is what the conversion itself holds.
    """
    sys.path.insert(0, str(REPO / "bench"))
    from _common import measure

    from a3tune.models.convert.converter import convert_model

    base, peak_anon, done = _anon_kb(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _anon_kb() - base)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, seconds, peak = measure(lambda: convert_model("llava-med-v1.5", source, out, vision_tower=vision,
                                                     max_shard_size=shard, progress=False))  # fmt: skip
    done.set()
    sampler.join()
    print(f"{seconds:.2f} {peak:.1f} {peak_anon[0] / 1024:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the synthetic checkpoint")
    parser.add_argument("--shard", default="256MB", help="--max-shard-size of the conversion")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child process: write the checkpoints
    parser.add_argument("--convert", nargs=3, type=Path, help=argparse.SUPPRESS)  # child: one conversion
    args = parser.parse_args()
    if args.write:
        return _write(args.write, args.size_mb)
    if args.convert:
        return _convert(*args.convert, args.shard)
    root = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    subprocess.run([sys.executable, __file__, "--size-mb", str(args.size_mb), "--write", str(root)], check=True)
    print("| checkpoint | size (MB) | max shard | seconds | peak RSS (MB) | peak anonymous (MB) | anonymous / size |")
    print("|---|---|---|---|---|---|---|")
    for name in ("tiny", "big"):
        size = sum(f.stat().st_size for f in (root / name).glob("*.safetensors")) / 2**20
        child = [sys.executable, __file__, "--shard", args.shard, "--convert", str(root / name), str(root / f"{name}-hf"),
                 str(root / "clip")]  # fmt: skip
        seconds, peak, anon = map(float, subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-3:])
        print(f"| {name} | {size:.1f} | {args.shard} | {seconds:.1f} | {peak:.1f} | {anon:.1f} | {anon / size:.2f} |")


if __name__ == "__main__":
    main()
