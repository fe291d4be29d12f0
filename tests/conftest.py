"""Shared fixtures: the repository root and a runner for the real Snakemake workflow."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from a3tune.compat import ensure_torchvision

# Tests import segment_anything, open_clip and transformers directly, in whatever order the import
# sorter puts them: install the torchvision shim before any test module is imported.
ensure_torchvision()

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """A script of bench/ as a module (bench/ is not a package), registered in ``sys.modules`` before it
    runs, as dataclasses need; loaded once per session."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_snakemake(workdir: Path, *args: str, config: dict | None = None, timeout: int = 600):
    """Run the repository's Snakefile in ``workdir`` with this interpreter's environment on PATH."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if config is not None:
        configfile = workdir / "config.yaml"
        configfile.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(configfile)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(cmd + list(args), cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.fixture
def tiny_config() -> dict:
    return yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())


@pytest.fixture
def one_thread():
    """One intra-op thread: these models are small, and on a shared 2-core machine two threads that
    wait on each other made the tiny model's passes 10-100x slower (measured); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
