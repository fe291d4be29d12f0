"""The fault matrix (issue 8): bad inputs, crashes and untrusted files on the tiny demo.

Nothing is lost, nothing half-written is taken as complete, and every expected failure is one clear
line. Cases covered by a unit test elsewhere are named here (and in the README's "What happens when
things go wrong" table) rather than repeated:

- decoder statuses per image (corrupt, truncated, empty, text): test_importers::test_bad_images_are_rows_with_a_status
- every malformed-file case per format: test_importers::test_malformed_files_name_file_row_and_field
- path escapes per format: test_importers::test_paths_escaping_the_root_are_refused
- a PathVQA pickle with a payload: test_importers::test_pickle_payload_is_refused_and_never_runs
- a SAM checkpoint with pickled code: test_sam_backends::test_pickled_code_is_refused_and_not_run
- SIGKILL of a writer (Parquet, Zarr): test_io::test_killed_writer_leaves_nothing_that_looks_complete
- zero alignment loss for a sample without a label: test_alignment::test_unlabelled_sample_is_zero_with_finite_zero_gradients
- a killed tune run resumes to the same adapter (in process): test_trainer::test_killed_run_resumes_to_the_uninterrupted_adapter
- NaN in the loss: test_trainer::test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint (and the CLI line below)
- unknown key / wrong type / missing required value: test_workflow::test_schema_rejects_bad_config_naming_it

The tests marked slow share one run of the whole tiny DAG on a phantom data set whose raw files
are damaged after the ``phantom`` rule (``damaged``), and copy its working directory for the
SIGKILL cases: each deletes the outputs of the stage (as in a first run), starts Snakemake for the
stage's target and kills it (the whole process group) once the stage is writing.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from conftest import REPO, run_snakemake
from fixtures_formats import VQARAD_JSON, build_vqarad, rewrite, write_image
from PIL import Image

from a3tune.cli import main
from a3tune.io.parquet import read_parquet

DS = "phantom"
TIMEOUT = 600  # hard limit of every Snakemake run (seconds)


def _fault_config() -> dict:
    """tests/configs/tiny.yaml with more test images, no reports, one tuned method, no baselines, two epochs (killable)."""
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["phantom"]["n_images"] = {"train": 6, "val": 2, "test": 3}
    config["phantom"]["report_rate"] = 0.0  # no report samples: the report metrics' Java METEOR would double score_gather
    config["tune"]["methods"] = ["a3tune"]
    config["tune"]["overrides"] = {**config["tune"]["overrides"], "epochs": 2}
    config["score"]["baselines"] = []
    return config


# ------------------------------------------------------------------------------------------------
# Damaged images: one DAG run


def _bomb_png(path: Path, side: int = 9000) -> None:
    """A valid PNG header claiming side x side pixels (81 MP > the 64 MP guard) over 8x8 pixels of data."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, side, side)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))


# image id -> (what is done to its file, the import status, the image mode when ok)
DAMAGE = {
    "images/train_0000": ("corrupt bytes", "unreadable", None),
    "images/train_0001": ("zero-byte file", "empty", None),
    "images/train_0002": ("JPEG bytes under .png", "ok", "RGB"),
    "images/train_0003": ("16-bit greyscale PNG", "ok", "I;16"),
    "images/val_0000": ("81-megapixel header", "too_large", None),
    "images/test_0000": ("CMYK JPEG (.jpg)", "ok", "CMYK"),
    "images/test_0002": ("file deleted", "missing", None),
}
UNUSABLE = {image_id for image_id, (_, status, _) in DAMAGE.items() if status != "ok"}


def _damage(raw: Path) -> None:
    images = raw / "images"
    (images / "train_0000.png").write_bytes(bytes(range(256)) * 8)
    (images / "train_0001.png").write_bytes(b"")
    Image.open(images / "train_0002.png").convert("RGB").save(images / "train_0002.png", format="JPEG")
    grey = np.asarray(Image.open(images / "train_0003.png").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(images / "train_0003.png", format="PNG")
    _bomb_png(images / "val_0000.png")
    Image.open(images / "test_0000.png").convert("CMYK").save(images / "test_0000.jpg", format="JPEG")
    (images / "test_0000.png").unlink()
    (images / "test_0002.png").unlink()
    manifest = json.loads((raw / "phantom.json").read_text())
    for record in manifest["images"]:
        record["path"] = record["path"].replace("test_0000.png", "test_0000.jpg")
    for sample in manifest["samples"]:
        sample["image"] = sample["image"].replace("test_0000.png", "test_0000.jpg")
    (raw / "phantom.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The whole tiny DAG on a phantom set with DAMAGE applied after the ``phantom`` rule."""
    workdir = tmp_path_factory.mktemp("faults") / "wd"
    config = _fault_config()
    proc = run_snakemake(workdir, "--cores", "2", f"data/{DS}/raw", config=config, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _damage(workdir / "data" / DS / "raw")
    proc = run_snakemake(workdir, "--cores", "2", config=config, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_damaged_images_are_marked_skipped_and_counted(damaged, capsys):
    wd = damaged
    images = read_parquet(wd / "data" / DS / "images.parquet", contract="images")
    samples = read_parquet(wd / "data" / DS / "samples.parquet", contract="samples")
    raw_samples = json.loads((wd / "data" / DS / "raw" / "phantom.json").read_text())["samples"]
    assert samples.height == len(raw_samples) and images.height == 11  # no sample and no image row is lost
    rows = {row["image_id"]: row for row in images.iter_rows(named=True)}
    for image_id, (_, status, mode) in DAMAGE.items():
        assert rows[image_id]["status"] == status, image_id
        if status == "ok":
            assert rows[image_id]["mode"] == mode, image_id
        else:
            assert rows[image_id]["error"], image_id
    assert {row["status"] for image_id, row in rows.items() if image_id not in DAMAGE} == {"ok"}
    assert "exceeds 64000000 pixels" in rows["images/val_0000"]["error"]  # refused from the header, never decoded
    assert rows["images/train_0002"]["path"].endswith(".png") and rows["images/train_0002"]["format"] == "JPEG"

    # demo_clip (reads phantom.json itself) leaves out the unusable training images
    demo_clip_log = (wd / "logs" / "demo_clip" / f"{DS}.log").read_text()
    assert "skipping image images/train_0000.png: unreadable" in demo_clip_log

    # sam_masks: one status row per unusable image, proposals for every usable one
    proposals = read_parquet(wd / "labels" / DS / "proposals" / "proposals.parquet", contract="proposals")
    by_image = dict(proposals.group_by("image_id").agg(pl.col("status").unique()).iter_rows())
    for image_id, row in rows.items():
        expected = {f"image_{row['status']}"} if image_id in UNUSABLE else {"ok"}
        assert set(by_image[image_id]) == expected, image_id

    # refine: image_<status> for the samples of unusable images, a label for the others
    labels = read_parquet(wd / "labels" / DS / "labels.parquet", contract="labels")
    assert labels["sample_id"].to_list() == samples["sample_id"].to_list()
    joined = labels.join(images.select("image_id", pl.col("status").alias("image_status")), on="image_id")
    for row in joined.iter_rows(named=True):
        if row["image_id"] in UNUSABLE:
            assert row["status"] == f"image_{row['image_status']}" and row["label_row"] is None
        else:
            assert row["status"] in ("ok", "empty_grid") and row["label_row"] is not None

    # tune trained on the usable training samples only; scoring covers every usable test sample
    usable = samples.join(images.filter(pl.col("status") == "ok").select("image_id"), on="image_id")
    train_log = (wd / "logs" / "tune" / "a3tune" / DS / "seed-0.log").read_text()
    n_train = usable.filter(pl.col("split") == "train").height
    assert f"{n_train} training samples" in train_log
    test_ids = sorted(usable.filter(pl.col("split") == "test")["sample_id"])
    assert any(s.startswith("test_0000") for s in test_ids)  # the CMYK JPEG is scored
    for run in ("base", "a3tune-seed0"):
        predictions = read_parquet(wd / "results" / run / DS / "predictions.parquet")
        assert sorted(predictions["sample_id"]) == test_ids, run
    assert "| a3tune |" in (wd / "results" / "summary.md").read_text()

    # the counts: import log, `a3tune inspect` of the manifests and the label audit
    assert "4 of 11 images are not usable" in (wd / "logs" / "import" / f"{DS}.log").read_text()
    assert main(["inspect", str(wd / "data" / DS / "images.parquet")]) == 0
    out = capsys.readouterr().out
    status_line = next(line for line in out.splitlines() if line.startswith("status: "))
    for status, n in {"ok": 7, "unreadable": 1, "empty": 1, "too_large": 1, "missing": 1}.items():
        assert f"{status}={n}" in status_line, status_line
    assert main(["inspect", str(wd / "labels" / DS / "labels.parquet")]) == 0
    out = capsys.readouterr().out
    for status in ("image_unreadable", "image_empty", "image_too_large", "image_missing"):
        assert status in out
    assert main(["inspect", "labels", str(wd / "labels" / DS)]) == 0
    assert "image_missing" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Malformed data set files and paths out of the root: one line, exit 2


def _vqarad_put(row: int, field: str, value):
    def mutate(data):
        data[row][field] = value
        return data

    return mutate


def _vqarad_drop(row: int, field: str):
    def mutate(data):
        del data[row][field]
        return data

    return mutate


# name -> (edit of the VQA-RAD file, words the message must hold)
MALFORMED = {
    "bad-json": (lambda data: b'[{"qid": 1,\n  "question": }]', ["line 2, column"]),
    "missing-field": (_vqarad_drop(2, "question"), ["row 2", "field 'question'", "missing"]),
    "duplicate-id": (_vqarad_put(3, "qid", "2"), ["row 3", "field 'id'", "duplicate id 'vqarad-2'"]),
    "empty-question": (_vqarad_put(1, "question", "   "), ["row 1", "field 'question'", "empty"]),
    "answer-type-vocabulary": (_vqarad_put(0, "answer_type", "MAYBE"), ["row 0", "field 'answer_type'", "'maybe'"]),
}


def _import_args(root: Path, fmt: str, out: Path) -> list[str]:
    return ["import", "--format", fmt, "--root", str(root), "--dataset", "x",
            "--samples", str(out / "samples.parquet"), "--images", str(out / "images.parquet")]  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_file_is_one_line_naming_file_row_field(tmp_path, capsys, case):
    mutate, words = MALFORMED[case]
    root = tmp_path / "vqarad"
    build_vqarad(root)
    rewrite(root, VQARAD_JSON, mutate)
    out = tmp_path / "out"
    assert main(_import_args(root, "vqarad", out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"a3tune import: error: {VQARAD_JSON}"), err[0]
    assert all(word in err[0] for word in words), (words, err[0])
    assert not out.exists() or not any(out.iterdir())  # nothing written


def _escape_dotdot(root: Path, outside: Path) -> None:
    rewrite(root, VQARAD_JSON, _vqarad_put(0, "image_name", "../../outside/outside.jpg"))


def _escape_absolute(root: Path, outside: Path) -> None:
    rewrite(root, VQARAD_JSON, _vqarad_put(0, "image_name", str(outside)))


def _escape_symlink(root: Path, outside: Path) -> None:
    image = root / "VQA_RAD Image Folder" / "synpic2.jpg"
    image.unlink()
    os.symlink(outside, image)


@pytest.mark.parametrize("escape", [_escape_dotdot, _escape_absolute, _escape_symlink], ids=["dotdot", "absolute", "symlink"])
def test_manifest_path_escaping_the_root_is_rejected(tmp_path, capsys, escape):
    outside = write_image(tmp_path / "outside" / "outside.jpg")
    root = tmp_path / "vqarad"
    build_vqarad(root)
    escape(root, outside)
    out = tmp_path / "out"
    assert main(_import_args(root, "vqarad", out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("a3tune import: error: ") and "\n" not in err
    assert "must be relative to the data root" in err or "escapes the data root" in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_data_root_is_one_line(tmp_path, capsys):
    assert main(_import_args(tmp_path / "nowhere", "slake", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("a3tune import: error: ") and "\n" not in err and "nowhere" in err


# ------------------------------------------------------------------------------------------------
# Untrusted checkpoint and adapter files: a pickle with a payload is refused and never runs


class _Payload:
    def __init__(self, marker: Path):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.command,)


def test_adapter_weights_that_are_a_pickle_are_refused(tmp_path):
    from a3tune.tune.adapter_config import AdapterConfig, LoraSpec
    from a3tune.tune.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter

    marker = tmp_path / "payload-ran"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = AdapterConfig(base_model="tiny:0", lora=LoraSpec(rank=4, targets=("v_proj",)))
    (adapter / CONFIG_NAME).write_text(config.to_json())
    torch.save({"model.lora_A.weight": _Payload(marker)}, adapter / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="is not a safetensors file.*never loaded from pickles"):
        load_adapter(torch.nn.Module(), adapter)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["engine_state.pt", "rng-00000.pt"])
def test_tune_checkpoint_that_is_a_pickle_is_refused(tmp_path, victim):
    import pickle

    from a3tune.tune.engine import Engine, latest_checkpoint

    marker = tmp_path / "payload-ran"
    checkpoints = tmp_path / "checkpoints"
    engine = Engine(torch.nn.Linear(2, 2), lr=1e-2, total_steps=2)
    engine.save_checkpoint(checkpoints / "step-00000001", {"epoch": 0})
    torch.save({"weights": _Payload(marker)}, checkpoints / "step-00000001" / victim)
    newest = latest_checkpoint(checkpoints)
    assert newest is not None
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Engine(torch.nn.Linear(2, 2), lr=1e-2, total_steps=2).load_checkpoint(newest)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# A non-finite loss through the CLI: one line, exit 2, the last good checkpoint kept


def test_nan_loss_stops_the_cli_with_one_line(tmp_path, capsys, monkeypatch, one_thread):
    from fixtures_lvlm import write_lvlm_inputs

    from a3tune.io.parquet import write_parquet
    from a3tune.io.provenance import Provenance
    from a3tune.tune import trainer

    write_lvlm_inputs(tmp_path)
    heads = pl.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [0.9, 0.1, 0.1, 0.8],
                          "inside_score": [0.5] * 4, "rank": [1, 3, 4, 2], "selected": [True, False, False, True]},
                         schema_overrides={"layer": pl.Int32, "head": pl.Int32, "rank": pl.Int32})  # fmt: skip
    write_parquet(heads, tmp_path / "heads.parquet", Provenance(stage="probe_heads"), contract="heads")
    real, calls = trainer.alignment_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss  # micro-batch 3: the second optimizer step

    monkeypatch.setattr(trainer, "alignment_loss", poisoned)
    checkpoints = tmp_path / "checkpoints"
    overrides = {"epochs": 2, "global_batch": 4, "micro_batch": 2, "checkpoint_every": 1}
    code = main(["tune", "--model", json.dumps({"path": str(tmp_path / "model")}), "--samples", str(tmp_path / "samples.parquet"),
                 "--images", str(tmp_path / "images.parquet"), "--labels", str(tmp_path), "--root", str(tmp_path / "raw"),
                 "--heads", str(tmp_path / "heads.parquet"), "--preset", "phantom", "--method", "a3tune",
                 "--overrides", json.dumps(overrides), "--checkpoints", str(checkpoints),
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    captured = capsys.readouterr().err
    err = [line for line in captured.splitlines() if "a3tune tune: error:" in line]  # after the progress bar's \r
    assert len(err) == 1 and "last good checkpoint is kept" in err[0], captured[-3000:]
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "train_log.parquet").exists()
    kept = [p.name for p in next(checkpoints.iterdir()).iterdir()]
    assert kept == ["step-00000001"]


# ------------------------------------------------------------------------------------------------
# Config errors: one line naming the key, before any job runs


def _snakemake_fails_before_work(tmp_path: Path, config: dict, named: str, *targets: str) -> None:
    proc = run_snakemake(tmp_path, "--cores", "1", *targets, config=config, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert named in output, output[-3000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()  # no job ran


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        (lambda c: c.update(shardz=2), "'shardz' was unexpected"),
        (lambda c: c["labels"]["grid"].update(grid="eight"), "'eight' is not of type 'integer'"),
        (lambda c: c["tune"].update(seeds="0"), "'0' is not of type 'array'"),
    ],
    ids=["unknown-key", "wrong-type-grid", "wrong-type-seeds"],
)
def test_config_error_names_the_key_before_any_job(tmp_path, tiny_config, patch, named):
    config = copy.deepcopy(tiny_config)
    patch(config)
    _snakemake_fails_before_work(tmp_path, config, named)


@pytest.mark.parametrize("key", ["model.path", "labels.clip.model_dir"])
def test_missing_checkpoint_path_is_named_before_any_job(tmp_path, tiny_config, key):
    config = copy.deepcopy(tiny_config)
    missing = str(tmp_path / "no-such-checkpoint")
    if key == "model.path":
        config["model"]["path"] = missing
    else:
        config["labels"]["clip"]["model_dir"] = missing
    _snakemake_fails_before_work(tmp_path / "wd", config, "no-such-checkpoint")


@pytest.mark.slow
def test_missing_sam_checkpoint_is_named_before_any_job(tmp_path, tiny_config):
    config = copy.deepcopy(tiny_config)
    config["labels"]["sam"]["checkpoint"] = str(tmp_path / "no-such-checkpoint.pth")
    _snakemake_fails_before_work(tmp_path / "wd", config, "no-such-checkpoint", f"labels/{DS}/proposals/proposals.parquet")


# ------------------------------------------------------------------------------------------------
# Degenerate weak labels: SAM finds nothing, CLIP cannot tell masks apart, a label misses the grid


@pytest.mark.slow
def test_no_masks_equal_scores_and_empty_grid_get_statuses(damaged, tmp_path, monkeypatch, capsys):
    from a3tune.io.zarr_store import open_store
    from a3tune.labels import clip_scorer, proposals, refine_stage
    from a3tune.labels.model_inputs import label_maps, labelled_samples
    from a3tune.labels.sam_stage import gather, run_shard

    wd, config = damaged, _fault_config()
    raw, images, samples = wd / "data" / DS / "raw", wd / "data" / DS / "images.parquet", wd / "data" / DS / "samples.parquet"

    # SAM returns no masks for the first image it segments
    real_generate, calls = proposals.generate_proposals, []

    def generate(sam, image, params):
        found = real_generate(sam, image, params)
        calls.append(1)
        return found.filter(np.zeros(len(found), bool)) if len(calls) == 1 else found

    monkeypatch.setattr(proposals, "generate_proposals", generate)
    sam, shards = config["labels"]["sam"], config["shards"]
    for shard in range(shards):
        run_shard(images, raw, shard, shards, tmp_path / f"shard-{shard}.zarr", tmp_path / f"shard-{shard}.parquet",
                  backend=sam["backend"], params=sam["params"], cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    gather([tmp_path / f"shard-{k}.parquet" for k in range(shards)], tmp_path / "proposals.parquet")
    found = read_parquet(tmp_path / "proposals.parquet")
    nothing = found.filter(pl.col("status") == "no_proposals")["image_id"].to_list()
    assert len(nothing) == 1 and found.filter(pl.col("image_id") == nothing[0]).height == 1  # one status row

    # CLIP scores every mask the same; the masks of one image miss every grid cell
    class EqualScores:
        def score_queries(self, image, masks, queries):
            return np.full((len(queries), len(masks)), 20.0, np.float32)

    monkeypatch.setattr(clip_scorer, "load_clip", lambda *args, **kwargs: EqualScores())
    with_masks = sorted(set(found.filter(pl.col("status") == "ok")["image_id"]))
    off_grid, current = with_masks[0], {}
    real_load, real_project = refine_stage.load_rgb, refine_stage.project_masks

    def load(path, *args, **kwargs):
        current["image_id"] = Path(path).relative_to(raw.resolve()).with_suffix("").as_posix()
        return real_load(path, *args, **kwargs)

    def project(masks, hw, spec):
        cells = real_project(masks, hw, spec)
        return np.zeros_like(cells) if current.get("image_id") == off_grid else cells

    monkeypatch.setattr(refine_stage, "load_rgb", load)
    monkeypatch.setattr(refine_stage, "project_masks", project)
    out = tmp_path / "labels"
    grid, top_k = config["labels"]["grid"], config["labels"]["top_k"]
    table = refine_stage.run_refine(samples, images, tmp_path / "proposals.parquet", raw, wd / "models" / "demo_clip" / DS,
                                    out / "labels.zarr", out / "labels.parquet", dataset_format="phantom", grid=grid,
                                    top_k=top_k, progress=False)  # fmt: skip
    status = dict(table.group_by("image_id").agg(pl.col("status").unique()).iter_rows())
    assert status[nothing[0]] == ["no_proposals"] and status[off_grid] == ["empty_grid"]
    tasks = dict(read_parquet(samples).select("sample_id", "task").iter_rows())
    equal = table.filter(pl.col("status") == "ok")
    assert equal.height > 0
    for row in equal.iter_rows(named=True):  # all scores equal: ties keep proposal order, the top k are the first k
        assert len(set(row["all_scores"])) == 1
        assert row["n_masks"] == min(len(row["all_scores"]), top_k[tasks[row["sample_id"]]])
        assert row["proposal_rows"] == sorted(row["proposal_rows"])

    # The model-facing stages see no label for these samples: a zero map and no valid mask, so the
    # alignment loss of the sample is zero (test_alignment::test_unlabelled_sample_is_zero_with_finite_zero_gradients)
    rows = pl.concat([labelled_samples(samples, images, out / "labels.parquet", split) for split in ("train", "val", "test")])
    degenerate = rows.filter(pl.col("image_id").is_in([nothing[0], off_grid]))
    assert degenerate.height > 0 and degenerate["label_row"].null_count() == degenerate.height
    maps, valid = label_maps(open_store(out / "labels.zarr")["grid"], degenerate["label_row"].to_list(), grid["grid"] ** 2)
    assert not maps.any() and not valid.any()
    # counted: the label audit and `a3tune inspect` name both statuses with their counts
    n = dict(table.group_by("status").len().iter_rows())
    assert main(["inspect", str(out / "labels.parquet")]) == 0
    printed = capsys.readouterr().out
    assert f"no_proposals={n['no_proposals']}" in printed and f"empty_grid={n['empty_grid']}" in printed
    assert main(["inspect", "labels", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no_proposals=" in printed and "empty_grid=" in printed


# ------------------------------------------------------------------------------------------------
# SIGKILL during sam_masks, refine and tune: rerun, and get the uninterrupted run's artifacts


def _snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), *args]  # fmt: skip


def _env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _kill_snakemake_when(workdir: Path, ready: Callable[[], bool], *args: str, timeout: float = 300) -> None:
    """Run Snakemake in its own process group and SIGKILL the whole group once ``ready()``."""
    proc = subprocess.Popen(_snakemake_cmd(workdir, "--cores", "2", *args), cwd=workdir, env=_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"snakemake {' '.join(args)} finished (rc {proc.returncode}) before it could be killed")
            if time.monotonic() > deadline:
                pytest.fail(f"snakemake {' '.join(args)}: nothing to kill it on after {timeout} s")
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _rerun(workdir: Path, target: str, expect_lock: bool = False) -> None:
    run = lambda *args: subprocess.run(_snakemake_cmd(workdir, *args), cwd=workdir, env=_env(), capture_output=True,  # noqa: E731
                                       text=True, timeout=TIMEOUT)  # fmt: skip
    if expect_lock:  # a SIGKILLed Snakemake leaves its lock: the next run says how to remove it
        locked = run("--cores", "2", target)
        assert locked.returncode != 0 and "--unlock" in locked.stderr + locked.stdout
    assert run("--unlock").returncode == 0
    again = run("--cores", "2", "--rerun-incomplete", target)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]


def _same_tree(a: Path, b: Path) -> None:
    """Bitwise equal files (a file, or every file of a directory; hidden temporary siblings ignored)."""
    if a.is_file():
        assert a.read_bytes() == b.read_bytes(), a
        return
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(a) == files(b), a
    for name in files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), a / name


def _copy_workdir(damaged: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "wd"
    shutil.copytree(damaged, workdir, symlinks=True)  # copy2 keeps mtimes: Snakemake sees an up-to-date run
    return workdir


@pytest.mark.slow
def test_sigkill_during_sam_masks_then_rerun_gives_the_same_labels(damaged, tmp_path):
    from a3tune.io.shards import shard_of

    wd = _copy_workdir(damaged, tmp_path)
    shutil.rmtree(wd / "labels" / DS)  # as in a first run: no proposals and no labels yet
    # Forget the cached SAM proposals of two images per shard, so every shard job computes and writes
    cache = {p.stem: p for p in (wd / ".cache" / "a3tune").rglob("*.npz") if "tune" not in p.parts}
    shards = _fault_config()["shards"]
    for shard in range(shards):
        for sha in sorted(sha for sha in cache if shard_of(sha, shards) == shard)[:2]:
            cache.pop(sha).unlink()
    cached = lambda: any(p.stem not in cache for p in (wd / ".cache" / "a3tune").rglob("*.npz"))  # noqa: E731
    _kill_snakemake_when(wd, cached, f"labels/{DS}/labels.parquet")  # killed once one new entry is complete
    # No shard output is partial: a shard's outputs are absent, or complete and equal to the reference's
    proposals, reference = wd / "labels" / DS / "proposals", damaged / "labels" / DS / "proposals"
    absent = 0
    for shard in range(shards):
        outputs = [proposals / f"shard-{shard}.zarr", proposals / f"shard-{shard}.parquet"]
        if not any(path.exists() for path in outputs):
            absent += 1
        else:
            for path in outputs:
                _same_tree(path, reference / path.name)
    assert absent >= 1 and not (proposals / "proposals.parquet").exists()
    _rerun(wd, f"labels/{DS}/labels.parquet")
    for name in ("proposals/shard-0.zarr", "proposals/shard-1.zarr", "proposals/proposals.parquet", "labels.zarr",
                 "labels.parquet"):  # fmt: skip
        _same_tree(wd / "labels" / DS / name, damaged / "labels" / DS / name)


@pytest.mark.slow
def test_sigkill_during_refine_then_rerun_gives_the_same_labels(damaged, tmp_path):
    wd = _copy_workdir(damaged, tmp_path)
    labels = wd / "labels" / DS
    shutil.rmtree(labels / "labels.zarr")
    (labels / "labels.parquet").unlink()
    writing = lambda: bool(list(labels.glob(".labels.zarr.tmp-*")))  # noqa: E731
    _kill_snakemake_when(wd, writing, f"labels/{DS}/labels.parquet")
    assert not (labels / "labels.zarr").exists() and not (labels / "labels.parquet").exists()
    dry = subprocess.run(_snakemake_cmd(wd, "-n", "--nolock", f"labels/{DS}/labels.parquet"), cwd=wd, env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "refine" in dry.stdout  # the half-written store is not taken as the output
    _rerun(wd, f"labels/{DS}/labels.parquet", expect_lock=True)
    for name in ("labels.zarr", "labels.parquet"):
        _same_tree(labels / name, damaged / "labels" / DS / name)


@pytest.mark.slow
def test_sigkill_during_tune_then_rerun_resumes_to_the_same_adapter(damaged, tmp_path):
    from safetensors.torch import load_file

    wd = _copy_workdir(damaged, tmp_path)
    checkpoints = wd / ".cache" / "a3tune" / "tune" / "a3tune" / DS / "seed-0"
    shutil.rmtree(checkpoints)
    run = f"runs/a3tune/{DS}/seed-0"
    shutil.rmtree(wd / run)
    first = lambda: any(p.name == "step-00000001" for p in checkpoints.rglob("step-*"))  # noqa: E731
    _kill_snakemake_when(wd, first, f"{run}/train_log.parquet")
    assert not (wd / run / "adapter").exists() and not (wd / run / "train_log.parquet").exists()
    _rerun(wd, f"{run}/train_log.parquet")
    assert "resum" in (wd / "logs" / "tune" / "a3tune" / DS / "seed-0.log").read_text().lower()
    resumed = load_file(wd / run / "adapter" / "adapter_model.safetensors")
    full = load_file(damaged / run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    log, reference = read_parquet(wd / run / "train_log.parquet"), read_parquet(damaged / run / "train_log.parquet")
    np.testing.assert_allclose(log["loss"].to_numpy(), reference["loss"].to_numpy(), rtol=1e-5)
