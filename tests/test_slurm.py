"""The workflow on a real one-node SLURM cluster (scripts/slurm_cluster.sh), with profiles/slurm.

The cluster is started once per session (installing the Debian packages if they are missing) and
stopped at the end; where the machine cannot run it (not root, no apt-get) every test here skips
with the script's one-line reason. The runs use ``--profile profiles/slurm`` as users do, plus only
what a one-node CPU cluster needs: ``--workflow-profile tests/slurm`` (squeue status checks, no
account, fast polls, no retries) and per-rule resources derived from the profile's own (no GPUs,
cores and memory that fit the node). Every scheduler run has a hard timeout that kills Snakemake's
whole process group (it may ignore SIGTERM) and cancels the cluster's jobs.

One run of the DAG up to ``tune`` (tiny demo config) is shared, in order, by: (a) artifacts equal to
a local run, shards as separate SLURM jobs; (d) ``tune`` as a 2-rank job vs 1 rank; (c) a failing
stage; (b) a changed image resubmits only the jobs that depend on it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
OVERLAY = REPO / "tests" / "slurm"
DS = "phantom"
# Targets of the shared run: every stage up to `tune` (score/report add 15 jobs and ~4 minutes
# on a 2-core machine; the local tiny-DAG test covers them).
TARGETS = [
    f"labels/{DS}/labels.parquet",
    f"results/labels/{DS}/overlays",
    f"probe/demo/{DS}/heads.parquet",
    f"runs/lora/{DS}/seed-0/train_log.parquet",
]
LOCAL_TARGETS = TARGETS[:3]
RANKS = 2
MEM_MB = 3000  # per job; the profile's site values (up to 96 GB) do not fit a test machine
# Hard limits (seconds) on each scheduler run; on an idle 2-core machine the shared run takes ~2.5 min.
RUN_TIMEOUT = 360


def _env() -> dict:
    bindir = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}/usr/sbin{os.pathsep}{os.environ.get('PATH', '')}")


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; past ``timeout`` kill the group (SIGKILL: Snakemake may
    ignore SIGTERM), cancel every job on the test cluster, and fail the test."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env or _env(), timeout=30)
        time.sleep(2)
        pytest.fail(f"timed out after {timeout}s: {shlex.join(cmd)}\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def cpu_cluster_resources(ncpus: int) -> list[str]:
    """profiles/slurm's per-rule resources and threads made to fit one CPU node: no GPU request,
    at most half the node's cores (two jobs, e.g. the two SAM shards, run side by side), at most
    MEM_MB; partitions, runtimes and the rest as the profile says. `tune` gets RANKS cores and
    `ranks`, as `gpu: N` gives N ranks on a GPU node. On the command line --set-resources and
    --set-threads replace the profile's whole mappings, so all of them are passed."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    resources, threads = [], []
    for rule, res in profile["set-resources"].items():
        res = dict(res)
        res.pop("gpu", None)
        res["mem_mb"] = min(int(res.get("mem_mb", MEM_MB)), MEM_MB)
        if rule == "tune":
            res["ranks"] = RANKS
        resources += [f"{rule}:{key}={value}" for key, value in res.items()]
    for rule, n in profile["set-threads"].items():
        threads.append(f"{rule}={RANKS if rule == 'tune' else min(int(n), max(ncpus // 2, 1))}")
    return ["--set-resources", *resources, "--set-threads", *threads]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The test cluster, started once (installing packages if missing), stopped at the end."""
    if not SCRIPT.exists():
        pytest.skip("scripts/slurm_cluster.sh is missing")
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no SLURM test cluster: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/slurm_cluster.sh start failed ({proc.returncode}):\n{proc.stderr}"
    env = _env()
    for line in proc.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            env["SLURM_CONF"] = line.split("=", 1)[1]
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """``python -m snakemake ARGS`` on the repository's workflow, in ``workdir`` with its config.yaml."""
    return [sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]  # fmt: skip


def snakemake_slurm(workdir: Path, env: dict, *args: str, timeout: float = RUN_TIMEOUT):
    profile = ["--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", str(OVERLAY)]
    return _run([*snakemake_cmd(workdir, *args), *profile, *cpu_cluster_resources(os.cpu_count() or 1)], workdir, timeout, env)


def snakemake_local(workdir: Path, *args: str, timeout: float = RUN_TIMEOUT):
    return _run(snakemake_cmd(workdir, *args, "--cores", "2"), workdir, timeout)


def submitted(out: str) -> dict[str, list[str]]:
    """rule -> SLURM job ids, from Snakemake's "Job N has been submitted with SLURM jobid M (log: ...)"."""
    jobs: dict[str, list[str]] = {}
    for jobid, log in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", out):
        rule = re.search(r"slurm_logs/rule_([^/]+)/", log).group(1)
        jobs.setdefault(rule, []).append(jobid)
    return jobs


def _chunks(store: Path) -> list[Path]:
    """A Zarr v3 store's chunk files, relative to it."""
    return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts)


def frame(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path)


@pytest.fixture(scope="module")
def shared_run(slurm_cluster, tmp_path_factory, tiny_config_module):
    """The DAG up to `tune` through sbatch, and (concurrently: the scheduler run is mostly waiting)
    a local run of the label and probe stages to compare with."""
    root = tmp_path_factory.mktemp("slurm")
    wd, local = root / "slurm", root / "local"
    for d in (wd, local):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(tiny_config_module))
    cmd = snakemake_cmd(local, *LOCAL_TARGETS, "--cores", "1")
    local_proc = subprocess.Popen(
        cmd, cwd=local, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    start = time.monotonic()
    try:
        proc = snakemake_slurm(wd, slurm_cluster, *TARGETS)
        wall = time.monotonic() - start
        local_out, _ = local_proc.communicate(timeout=max(RUN_TIMEOUT - wall, 30))
    finally:
        if local_proc.poll() is None:
            os.killpg(local_proc.pid, signal.SIGKILL)
    print(f"SLURM run of {len(TARGETS)} targets: {wall:.0f} s")
    return {
        "wd": wd,
        "local": local,
        "proc": proc,
        "local_rc": local_proc.returncode,
        "local_out": local_out,
        "env": slurm_cluster,
    }


@pytest.fixture(scope="module")
def tiny_config_module() -> dict:
    return yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())


def test_dag_runs_through_sbatch_like_a_local_run(shared_run):
    proc, wd, local = shared_run["proc"], shared_run["wd"], shared_run["local"]
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert shared_run["local_rc"] == 0, shared_run["local_out"][-4000:]
    jobs = submitted(proc.stdout)
    expected = {
        "phantom",
        "import_dataset",
        "sam_masks",
        "gather_proposals",
        "demo_clip",
        "refine",
        "label_overlays",
        "demo_lvlm",
        "probe_heads",
        "tune",
    }
    assert set(jobs) == expected, jobs
    # Each shard its own SLURM job, with its own log under .snakemake/slurm_logs.
    assert len(set(jobs["sam_masks"])) == 2
    for shard, jobid in enumerate(sorted(jobs["sam_masks"], key=int)):
        logs = list((wd / ".snakemake" / "slurm_logs" / "rule_sam_masks").glob(f"*/{jobid}.log"))
        assert len(logs) == 1, jobid
    shard_logs = {p.parent.name for p in (wd / ".snakemake" / "slurm_logs" / "rule_sam_masks").glob("*/*.log")}
    assert shard_logs == {f"{DS}_0", f"{DS}_1"}
    # The label stages are deterministic: the same tables as the local run, row for row.
    for rel in (
        f"data/{DS}/samples.parquet",
        f"data/{DS}/images.parquet",
        f"labels/{DS}/proposals/proposals.parquet",
        f"labels/{DS}/labels.parquet",
    ):
        a, b = frame(wd / rel), frame(local / rel)
        assert a.equals(b), rel
    # Zarr label store: every chunk file the same bytes (metadata may carry provenance times).
    store, ref = wd / f"labels/{DS}/labels.zarr", local / f"labels/{DS}/labels.zarr"
    chunks = _chunks(store)
    assert chunks and chunks == _chunks(ref)
    assert all((store / c).read_bytes() == (ref / c).read_bytes() for c in chunks)
    # The probe ranks the same heads; scores within float tolerance (the demo LVLM was trained in
    # another process with other thread counts).
    heads, heads_ref = frame(wd / f"probe/demo/{DS}/heads.parquet"), frame(local / f"probe/demo/{DS}/heads.parquet")
    assert heads.columns == heads_ref.columns and heads.height == heads_ref.height
    for col in heads.columns:
        if heads[col].dtype.is_float():
            np.testing.assert_allclose(heads[col].to_numpy(), heads_ref[col].to_numpy(), rtol=1e-4, atol=1e-5)
        else:
            assert heads[col].to_list() == heads_ref[col].to_list(), col
    assert frame(wd / f"runs/lora/{DS}/seed-0/train_log.parquet")["loss"].is_finite().all()


def _adapter(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_tune_as_two_ranks_matches_one_rank(shared_run):
    """`tune` ran as one SLURM job of 2 cores whose rule launched 2 ranks (torchrun, DeepSpeed
    ZeRO-2, gloo on CPU); the same command with 1 rank gives the same adapter."""
    wd = shared_run["wd"]
    assert shared_run["proc"].returncode == 0
    log = (wd / f"logs/tune/lora/{DS}/seed-0.log").read_text()
    assert f"launching {RANKS} ranks" in log, log[-3000:]
    slurm_log = next((wd / ".snakemake" / "slurm_logs" / "rule_tune").rglob("*.log")).read_text()
    line = next(ln for ln in slurm_log.splitlines() if ln.startswith("Shell command: a3tune tune "))
    assert f"--ranks {RANKS} " in line
    argv = shlex.split(line.removeprefix("Shell command: "))
    argv = argv[: argv.index(">")]  # the log redirection
    argv[argv.index("--ranks") + 1] = "1"
    argv[argv.index("--out") + 1] = "one-rank"
    argv[argv.index("--checkpoints") + 1] = "one-rank-checkpoints"
    env = dict(shared_run["env"], OMP_NUM_THREADS="1")
    one = _run([str(Path(sys.executable).parent / "a3tune"), *argv[1:]], wd, 180, env)
    assert one.returncode == 0, one.stdout[-4000:]
    two, ref = _adapter(wd / f"runs/lora/{DS}/seed-0/adapter"), _adapter(wd / "one-rank" / "adapter")
    assert two.keys() == ref.keys() and two
    # Training moved the adapter (LoRA's B starts at zero), so equal adapters mean equal training
    assert max(float(np.abs(v).max()) for k, v in two.items() if "lora_B" in k) > 0
    diff = max(float(np.max(np.abs(two[k].astype(np.float64) - ref[k].astype(np.float64)))) for k in two)
    print(f"adapter max |2 ranks - 1 rank| = {diff:.3g}")
    assert diff < 1e-5


def test_failing_stage_is_reported_and_stops_downstream(shared_run, tiny_config_module):
    """A tune setting that passes the schema but not the trainer (a global batch that the micro
    batch x ranks does not divide): SLURM reports the job failed, Snakemake names the rule's log,
    and nothing downstream (the run's scoring) is submitted."""
    wd, env = shared_run["wd"], shared_run["env"]
    assert shared_run["proc"].returncode == 0
    config = dict(tiny_config_module, tune=dict(tiny_config_module["tune"]))
    config["tune"]["overrides"] = dict(config["tune"]["overrides"], global_batch=3)
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_slurm(wd, env, f"results/lora-seed0/{DS}/metrics.json", timeout=150)
    assert proc.returncode != 0
    out = proc.stdout
    assert set(submitted(out)) == {"tune"}, submitted(out)  # not the label or probe stages again
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", out), out[-4000:]
    assert "Error in rule tune" in out and f"logs/tune/lora/{DS}/seed-0.log" in out
    assert "global_batch" in (wd / f"logs/tune/lora/{DS}/seed-0.log").read_text()
    assert not (wd / ".snakemake" / "slurm_logs" / "rule_score").exists()
    assert not (wd / "results" / "lora-seed0").exists()
    (wd / "config.yaml").write_text(yaml.safe_dump(tiny_config_module))


def test_changed_image_resubmits_only_its_dependents(shared_run):
    """Rewrite one phantom image's pixels and rerun the import stage (`-R import_dataset`: a data
    root is a directory, whose files Snakemake does not stat): the plan holds the import and what
    depends on it, not the generator nor the demo CLIP (which reads only the raw folder); run to the
    proposals, exactly those jobs are submitted, and only the shard holding the image changes."""
    from PIL import Image

    wd, env = shared_run["wd"], shared_run["env"]
    assert shared_run["proc"].returncode == 0
    images = frame(wd / f"data/{DS}/images.parquet")
    target = wd / f"data/{DS}/raw" / images["path"][0]
    pixels = np.asarray(Image.open(target)).copy()
    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    Image.fromarray(pixels).save(target)
    before = {s: frame(wd / f"labels/{DS}/proposals/shard-{s}.parquet") for s in (0, 1)}
    plan = snakemake_slurm(wd, env, *TARGETS, "-n", "-R", "import_dataset", timeout=90)
    assert plan.returncode == 0, plan.stdout[-3000:]
    planned = set(re.findall(r"^rule (\w+):", plan.stdout, flags=re.M))
    assert planned == {
        "import_dataset",
        "sam_masks",
        "gather_proposals",
        "refine",
        "label_overlays",
        "demo_lvlm",
        "probe_heads",
        "tune",
    }, planned
    goal = f"labels/{DS}/proposals/proposals.parquet"
    proc = snakemake_slurm(wd, env, goal, "-R", "import_dataset", timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    jobs = submitted(proc.stdout)
    assert set(jobs) == {"import_dataset", "sam_masks", "gather_proposals"}, jobs
    assert len(jobs["sam_masks"]) == 2
    after_images = frame(wd / f"data/{DS}/images.parquet")
    changed = images.join(after_images, on="image_id", suffix="_new").filter(pl.col("sha256") != pl.col("sha256_new"))
    assert changed.height == 1 and changed["path"][0] == images["path"][0], changed
    # Shards go by content hash: the ones that held or now hold the image changed, any other is
    # exactly what it was.
    from a3tune.io.shards import shard_of

    touched = {shard_of(changed["sha256"][0], 2), shard_of(changed["sha256_new"][0], 2)}
    after = {s: frame(wd / f"labels/{DS}/proposals/shard-{s}.parquet") for s in (0, 1)}
    assert {s for s in (0, 1) if not after[s].equals(before[s])} == touched
