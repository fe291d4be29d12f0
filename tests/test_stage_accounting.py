"""Every stage that consumes samples says how many it used and how many it skipped, and why: a training
sample whose image file is gone is counted as ``image_missing`` in probe_heads' and tune's outputs."""

from __future__ import annotations

import json

import polars as pl
import pytest
from fixtures_lvlm import write_lvlm_inputs

from a3tune.data.importer import import_dataset
from a3tune.io.parquet import read_parquet
from a3tune.io.provenance import read_provenance
from a3tune.labels.model_inputs import labelled_samples
from a3tune.probe.probe_stage import run_probe
from a3tune.tune.tune_stage import run_tune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The small probe/tune inputs with one training image deleted and the data set imported again
    (images.parquet: status missing). Returns the folder and the number of samples on that image."""
    tmp = tmp_path_factory.mktemp("accounting")
    write_lvlm_inputs(tmp)
    samples = read_parquet(tmp / "samples.parquet").filter(pl.col("split") == "train")
    first, gone = samples["image_id"][0], samples["image_id"][-1]  # the first sample's label is empty_grid
    assert first != gone
    path = read_parquet(tmp / "images.parquet").filter(pl.col("image_id") == gone)["path"][0]
    (tmp / "raw" / path).unlink()
    import_dataset("phantom", tmp / "raw", "phantom", tmp / "samples.parquet", tmp / "images.parquet", progress=False)
    return tmp, int((samples["image_id"] == gone).sum())


def _usable(tmp) -> pl.DataFrame:
    return labelled_samples(tmp / "samples.parquet", tmp / "images.parquet", tmp / "labels.parquet", "train")


def test_probe_counts_the_unusable_image_and_what_it_did_not_draw(inputs):
    tmp, n_gone = inputs
    usable = _usable(tmp)
    n_labelled = int(usable["label_row"].is_not_null().sum())
    run_probe({"path": str(tmp / "model")}, tmp / "samples.parquet", tmp / "images.parquet", tmp / "labels.parquet",
              tmp / "labels.zarr", tmp / "raw", tmp / "heads.parquet", n_samples=2, batch_size=2, top_k=0.25,
              progress=False)  # fmt: skip
    params = read_provenance(tmp / "heads.parquet").params
    assert params["samples"] == {"used": 2, "skipped": {"image_missing": n_gone, "no_label": usable.height - n_labelled,
                                                        "n_samples": n_labelled - 2}}  # fmt: skip
    assert params["n_samples"] == params["samples"]["used"]


def test_tune_records_used_and_skipped_in_the_adapter_config_and_the_train_log(inputs, tmp_path):
    tmp, n_gone = inputs
    run_tune({"path": str(tmp / "model")}, tmp / "samples.parquet", tmp / "images.parquet", tmp, tmp / "raw",
             tmp_path / "run", tmp_path / "checkpoints", preset="phantom", method="lora", progress=False,
             overrides={"epochs": 1, "global_batch": 4, "micro_batch": 2, "checkpoint_every": 100})  # fmt: skip
    expected = {"used": _usable(tmp).height, "skipped": {"image_missing": n_gone}}
    extra = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["extra"]
    assert extra["samples"] == expected and extra["provenance"]["params"]["samples"] == expected
    assert read_provenance(tmp_path / "run" / "train_log.parquet").params["samples"] == expected
