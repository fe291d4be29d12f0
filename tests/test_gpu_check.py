"""bench/gpu_check.sh's CPU mode: the whole real-size check at tiny sizes prints a complete table."""

from __future__ import annotations

import math
import re
import subprocess

from conftest import REPO

SHAPES = ("llama-7b", "mistral-7b")
VARIANTS = ("plain LoRA", "A3Tune static", "A3Tune dynamic", "reference eager")
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "none of")
NUMERIC = ("step, s", "peak MB", "extra MB", "time x", "peak x")  # "extra x" is n/a when LoRA's extra is < 1 MB


def _table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) > 2, stdout
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_gpu_check_cpu_mode_prints_every_row():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    print(proc.stdout)
    assert "2 of 32 decoder layers" in proc.stdout
    rows = {(row["model"], row["row"]): row for row in _table(proc.stdout)}

    for shape in SHAPES:
        for variant in VARIANTS:
            row = rows[(shape, variant)]
            for column in NUMERIC:
                assert math.isfinite(float(row[column])), (shape, variant, column, row)
            assert row["extra x"] == "n/a" or math.isfinite(float(row["extra x"])), row
        assert rows[(shape, "plain LoRA")]["time x"] == "1.00"
        backend = rows[(shape, "capture SDPA backend")]["note"]
        assert backend.startswith(BACKENDS), backend

    zero = [row for (_, name), row in rows.items() if name.startswith("DeepSpeed ZeRO-2")]
    assert len(zero) == 1 and zero[0]["note"] == "skipped: no CUDA", zero

    precision = [row for (_, name), row in rows.items() if name == "bf16 vs fp32 alignment loss"]
    assert len(precision) == 1, rows
    found = re.search(r"fp32 (\S+), bf16 (\S+), rel diff (\S+)", precision[0]["note"])
    assert found, precision[0]
    fp32, bf16, relative = (float(x) for x in found.groups())
    print(f"bf16 vs fp32 alignment loss: {fp32} vs {bf16}, relative difference {relative:.2e}")
    assert math.isfinite(fp32) and fp32 > 0 and math.isfinite(bf16)
    assert relative < 5e-2
