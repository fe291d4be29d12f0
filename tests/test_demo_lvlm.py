"""The demo's stand-in base Med-LVLM: trains, lowers its loss, saves a loadable model with provenance."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, generate
from a3tune.io.provenance import read_provenance
from a3tune.models.demo_lvlm import phantom_pretraining_set, train_demo_lvlm
from a3tune.models.lvlm import load_lvlm

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"image_size": 56, "patch_size": 14, "vision_hidden": 16, "vision_layers": 1, "text_hidden": 32,
        "text_layers": 1, "text_heads": 2, "kv_heads": 1, "intermediate": 64}  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo_lvlm")
    generate(PhantomConfig.from_dict({"n_images": {"train": 4, "val": 1, "test": 1}, "size": 96,
                                      "lesion_radius": [3, 5]}), tmp / "raw")  # fmt: skip
    import_dataset("phantom", tmp / "raw", "phantom", tmp / "samples.parquet", tmp / "images.parquet", progress=False)
    return tmp


def test_trains_and_saves_a_loadable_model_with_provenance(phantom):
    out = phantom / "model"
    summary = train_demo_lvlm(phantom / "samples.parquet", phantom / "images.parquet", phantom / "raw", out,
                              architecture=ARCH, training={"steps": 40, "batch_size": 4, "lr": 3e-3}, progress=False)  # fmt: skip
    assert summary["last_loss"] < 0.7 * summary["first_loss"]  # measured 3.90 -> 2.16
    lvlm = load_lvlm(out)
    assert (lvlm.grid, lvlm.input_size, lvlm.preprocess) == (4, 56, "pad")
    # The vocabulary covers every split's words: a test question has no unknown token
    test_question = pl.read_parquet(phantom / "samples.parquet").filter(pl.col("split") == "test")["question"][0]
    assert lvlm.processor.tokenizer.unk_token_id not in lvlm.processor.tokenizer(test_question)["input_ids"]
    prov = read_provenance(out)
    assert prov.stage == "demo_lvlm" and prov.params["training"]["steps"] == 40 and "samples.parquet" in prov.inputs
    assert pl.read_parquet(out / "train_log.parquet").height == 40


def test_unknown_training_setting_is_refused(phantom, tmp_path):
    with pytest.raises(ValueError, match=r"unknown training settings \['stepz'\]"):
        train_demo_lvlm(phantom / "samples.parquet", phantom / "images.parquet", phantom / "raw", tmp_path / "m",
                        architecture=ARCH, training={"stepz": 3}, progress=False)  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_answer_types_restrict_the_pre_training_samples(phantom, tmp_path):
    out = tmp_path / "general"
    train_demo_lvlm(phantom / "samples.parquet", phantom / "images.parquet", phantom / "raw", out, architecture=ARCH,
                    training={"steps": 2, "batch_size": 2, "answer_types": ["open", "report"]}, progress=False)  # fmt: skip
    samples = pl.read_parquet(phantom / "samples.parquet")
    expected = samples.filter((pl.col("split") == "train") & pl.col("answer_type").is_in(["open", "report"])).height
    assert 0 < expected < samples.filter(pl.col("split") == "train").height
    assert read_provenance(out).params["train_samples"] == expected
    # The tokenizer still covers the left-out task's words
    closed = samples.filter(pl.col("answer_type") == "closed")["question"][0]
    assert load_lvlm(out).processor.tokenizer.unk_token_id not in load_lvlm(out).processor.tokenizer(closed)["input_ids"]
    with pytest.raises(ValueError, match=r"no training samples .* answer type \['nonsense'\]"):
        train_demo_lvlm(phantom / "samples.parquet", phantom / "images.parquet", phantom / "raw", tmp_path / "none",
                        architecture=ARCH, training={"steps": 2, "answer_types": ["nonsense"]}, progress=False)  # fmt: skip


def test_own_pre_training_set_is_drawn_from_its_parameters(phantom, tmp_path):
    pretrain = {"seed": 5, "n_images": {"train": 6, "val": 0, "test": 0}, "size": 96, "lesion_radius": [3, 5]}
    data, pixels = phantom_pretraining_set(pretrain)
    # Its own images: as many as asked, none of them a tuning image, the same pixels again from the same parameters
    assert len(pixels) == 6 and set(data["path"]) == set(pixels)
    tuning = generate(PhantomConfig.from_dict({"n_images": {"train": 4, "val": 1, "test": 1}, "size": 96,
                                               "lesion_radius": [3, 5]}), tmp_path / "tuning")  # fmt: skip
    assert all(not np.array_equal(np.asarray(Image.open(tuning / path)), image) for path, image in pixels.items()
               if (tuning / path).exists())
    again, _ = phantom_pretraining_set(pretrain)
    assert again.equals(data) and all((phantom_pretraining_set(pretrain)[1][p] == pixels[p]).all() for p in pixels)
    out = tmp_path / "own"
    train_demo_lvlm(phantom / "samples.parquet", phantom / "images.parquet", phantom / "raw", out, architecture=ARCH,
                    training={"steps": 2, "batch_size": 2, "answer_types": ["open", "report"]}, pretrain=pretrain,
                    progress=False)  # fmt: skip
    prov = read_provenance(out)
    assert prov.params["pretrain"] == pretrain
    assert prov.params["train_samples"] == data.filter(pl.col("answer_type").is_in(["open", "report"])).height
    with pytest.raises(ValueError, match="no training images"):
        phantom_pretraining_set({**pretrain, "n_images": {"train": 0, "val": 0, "test": 0}})

