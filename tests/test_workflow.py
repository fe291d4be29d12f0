"""The Snakemake workflow itself: lint, schema, dry runs, quoting, and a real run of the DAG."""

from __future__ import annotations

import copy
import json
import shutil

import polars as pl
import pytest
from conftest import REPO, run_snakemake

from a3tune.io import read_provenance
from a3tune.io.contracts import check_contract
from a3tune.io.inspect import inspect_path
from a3tune.io.parquet import read_parquet


def test_lint_is_clean(tmp_path, default_config):
    proc = run_snakemake(tmp_path, "--lint", config=default_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_slurm_profile_plans_without_cluster(tmp_path, default_config):
    proc = run_snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"), config=default_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "import_dataset" in proc.stdout


def test_benchmark_config_plans_on_top_of_the_demo_config(tmp_path):
    """README's benchmark command: config.yaml, then config/benchmark.yaml, in a folder of its own."""
    proc = run_snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"),
                         "--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "benchmark.yaml"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split()[:2] for line in proc.stdout.split("Job stats:")[1].splitlines()[3:] if line.strip())
    assert jobs["tune"] == "9"  # lora_nocue, lora, a3tune x 3 seeds
    assert jobs["score"] == "10"  # those runs and the base model; no decoding baselines


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"shardz": 2}, "'shardz' was unexpected"),
        ({"phantom": {"seeed": 1}}, "'seeed' was unexpected"),
        ({"shards": "two"}, "'two' is not of type 'integer'"),
        ({"datasets": {"x": {"format": "slake"}}}, "'root' is a required property"),
        ({"datasets": {"x": {"format": "dicom", "root": "/d"}}}, "'dicom' is not one of"),
    ],
)
def test_schema_rejects_bad_config_naming_it(tmp_path, default_config, patch, named):
    config = copy.deepcopy(default_config)
    config.update(patch)
    proc = run_snakemake(tmp_path, "-n", config=config)
    assert proc.returncode != 0
    assert named in proc.stderr + proc.stdout


def test_shell_values_are_quoted(tmp_path, default_config):
    """A config value with shell syntax reaches the CLI as text and is never run."""
    config = copy.deepcopy(default_config)
    hostile = tmp_path / "data; touch PWNED; $(touch PWNED2)"
    hostile.mkdir()
    config["datasets"] = {"evil": {"format": "slake", "root": str(hostile)}}
    proc = run_snakemake(tmp_path / "wd", "--cores", "1", "data/evil/samples.parquet", config=config)
    assert proc.returncode != 0  # the folder holds no SLAKE files: the importer says so
    assert not list(tmp_path.rglob("PWNED*"))
    log = (tmp_path / "wd" / "logs" / "import" / "evil.log").read_text()
    assert "train.json" in log and "PWNED" in log  # the whole path arrived as one argument


@pytest.mark.slow
def test_tiny_dag_runs_and_artifacts_carry_provenance(tmp_path, tiny_config):
    proc = run_snakemake(tmp_path, "--cores", "2", config=tiny_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for ds in tiny_config["datasets"]:
        samples = read_parquet(tmp_path / "data" / ds / "samples.parquet", contract="samples")
        images = read_parquet(tmp_path / "data" / ds / "images.parquet", contract="images")
        assert samples.height > 0 and images.height > 0
        assert set(images["status"]) == {"ok"}
        prov = read_provenance(tmp_path / "data" / ds / "samples.parquet")
        assert prov.stage == "import" and prov.inputs
        assert read_provenance(tmp_path / "data" / ds / "raw").stage == "phantom"
        check_contract(samples, "samples")
        assert "contract: samples ok" in inspect_path(tmp_path / "data" / ds)
        proposals = read_parquet(tmp_path / "labels" / ds / "proposals" / "proposals.parquet", contract="proposals")
        assert read_provenance(tmp_path / "labels" / ds / "proposals" / "proposals.parquet").stage == "sam_masks_gather"
        labels = read_parquet(tmp_path / "labels" / ds / "labels.parquet", contract="labels")
        assert labels.height == samples.height and proposals.height > 0
        for store in [tmp_path / "labels" / ds / "labels.zarr", *(tmp_path / "labels" / ds / "proposals").glob("*.zarr")]:
            assert read_provenance(store) is not None
        assert len(list((tmp_path / "results" / "labels" / ds / "overlays").glob("*.png"))) == 3
        assert read_provenance(tmp_path / "models" / "demo_lvlm" / ds).stage == "demo_lvlm"
        heads = read_parquet(tmp_path / "probe" / "demo" / ds / "heads.parquet", contract="heads")
        assert heads.height == 2 * 4 and heads["selected"].sum() == 2  # 2 layers x 4 heads, top 0.25
        assert read_provenance(tmp_path / "probe" / "demo" / ds / "heads.parquet").stage == "probe_heads"
        assert (tmp_path / "results" / "probe" / "demo" / ds / "heads.png").stat().st_size > 0
        for method in tiny_config["tune"]["methods"]:
            run = tmp_path / "runs" / method / ds / "seed-0"
            train_log = read_parquet(run / "train_log.parquet")
            assert read_provenance(run / "train_log.parquet").stage == "tune" and train_log["loss"].is_finite().all()
            assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (run / "adapter").iterdir()}
        for run in ("base", "lora-seed0", "a3tune-seed0", "lora-seed0+pai", "lora-seed0+vcd"):
            results = tmp_path / "results" / run / ds
            assert read_provenance(results / "predictions.parquet").stage == "score_gather"
            assert read_parquet(results / "predictions.parquet").height == samples.filter(pl.col("split") == "test").height
            assert "grounding" in json.loads((results / "metrics.json").read_text())["metrics"]
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert all(f"| {method} |" in summary for method in ("base", "lora", "lora_nocue", "a3tune", "lora+pai", "lora+vcd"))
    assert "cue disagrees" in summary and "minus lora [95 % CI]" in summary
    assert "| method | seeds | n |" in summary  # samples scored per run; skips would add a note under the table
    metrics = json.loads(next((tmp_path / "results").glob("*/*/metrics.json")).read_text())["metrics"]
    assert metrics["samples"]["used"] == metrics["n"] and "skipped" in metrics["samples"]
    table = read_parquet(tmp_path / "results" / "summary.parquet")
    paired = table.filter(pl.col("method").is_in(["a3tune", "lora_nocue", "lora+pai"]))["closed_acc_minus_lora"]
    assert paired.is_not_null().all() and table.filter(pl.col("method") == "lora")["closed_acc_minus_lora"].is_null().all()
    nocue_run = tmp_path / "runs" / "lora_nocue" / "phantom" / "seed-0" / "train_log.parquet"
    assert "cue_shuffled" in read_provenance(nocue_run).inputs  # trained on the twins
    assert {p.name for p in (tmp_path / "results" / "figures").glob("*.png")} == {"metrics-phantom.png", "attention-phantom.png"}
    # Every rule wrote its log and benchmark.
    assert list((tmp_path / "logs").rglob("*.log")) and list((tmp_path / "benchmarks").rglob("*.tsv"))
    # A second run has nothing to do.
    again = run_snakemake(tmp_path, "--cores", "2", "-n", config=tiny_config)
    assert "Nothing to be done" in again.stdout + again.stderr
    # The same config run again in another folder gives a byte-identical table. The twin starts from
    # this run's weak labels (data/, labels/, the demo CLIP and overlays, copied with their times), so
    # it reruns every model stage (stand-in pre-training, probe, tuning, scoring, report); the label
    # stages' own determinism is checked row for row by test_slurm (a second, local run) and test_faults.
    twin = tmp_path.parent / f"{tmp_path.name}-again"
    for rel in ("data", "labels", "models/demo_clip", "results/labels"):
        shutil.copytree(tmp_path / rel, twin / rel, symlinks=True)
    proc = run_snakemake(twin, "--cores", "2", config=tiny_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rule sam_masks" not in proc.stdout + proc.stderr and "rule demo_lvlm" in proc.stdout + proc.stderr
    for name in ("summary.md", "summary.parquet"):
        assert (twin / "results" / name).read_bytes() == (tmp_path / "results" / name).read_bytes(), name


@pytest.mark.slow
def test_original_checkpoint_is_converted_once_and_feeds_probe_tune_score(tmp_path, tiny_config):
    """model.source set: the plan is convert -> probe -> tune -> score on the converted folder, and a
    run converts once (a tiny LLaVA-Med v1.5 folder in the original layout, grid 8 at 112 px)."""
    from tests.fixtures_llava_med import write_tower, write_v15

    write_v15(tmp_path / "llava-med-v1.5", write_tower(tmp_path / "clip", image_size=112))
    config = copy.deepcopy(tiny_config)
    config["model"] = {"name": "llava_med", "source": str(tmp_path / "llava-med-v1.5"), "source_format": "llava-med-v1.5",
                       "vision_tower": str(tmp_path / "clip")}  # fmt: skip
    config["tune"]["methods"] = ["a3tune"]
    config["score"]["baselines"] = []
    workdir = tmp_path / "wd"
    plan = run_snakemake(workdir, "-n", config=config)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    for rule in ("convert_model", "probe_heads", "tune", "score"):
        assert f"rule {rule}:" in plan.stdout or f"localrule {rule}:" in plan.stdout, rule
    assert "demo_lvlm" not in plan.stdout
    targets = ["runs/a3tune/phantom/seed-0/train_log.parquet", "results/base/phantom/metrics.json"]
    proc = run_snakemake(workdir, "--cores", "2", *targets, config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    converted = workdir / "models" / "converted" / "llava_med"
    assert read_provenance(converted).stage == "convert_model"
    assert read_provenance(workdir / "probe" / "llava_med" / "phantom" / "heads.parquet").inputs
    assert (proc.stdout + proc.stderr).count("rule convert_model:") == 1
    again = run_snakemake(workdir, "--cores", "2", "-n", *targets, config=config)
    assert "Nothing to be done" in again.stdout + again.stderr
