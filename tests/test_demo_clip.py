"""The demo CLIP: trained on a tiny phantom set, saved as an open_clip folder, loaded back by the
scorer, and picking the queried structure; training is deterministic."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never call the hub

import numpy as np
import pytest
import torch

from a3tune.data.phantom import PhantomConfig, generate
from a3tune.io.provenance import hash_file, read_provenance
from a3tune.labels.clip_scorer import load_clip, select_top_k
from a3tune.labels.demo_clip import (
    DEMO_MODEL_CFG,
    DEMO_PREPROCESS_CFG,
    load_phantom_structures,
    structure_ranking_accuracy,
    train_demo_clip,
)

SIZE = 128  # the phantom's own size: no resize
# One thread: on a shared 2-core machine, two threads spin-wait for each other (10x slower under load).
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "data"
    return generate(PhantomConfig(seed=3, n_images={"train": 8, "val": 0, "test": 2}), root)


@pytest.fixture(scope="module")
def trained(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_clip") / "clip"
    return train_demo_clip(phantom_root, out, steps=80, batch_size=8, views=2, seed=0, working_size=SIZE,
                           threads=THREADS, progress=False)  # fmt: skip


def test_phantom_regions_are_the_samples_gt_masks(phantom_root):
    images = load_phantom_structures(phantom_root, "train", working_size=SIZE)
    data = json.loads((phantom_root / "phantom.json").read_text())
    plans = {r["image_id"]: r for r in data["images"]}
    assert len(images) == 8
    for item in images:
        assert item.masks.shape == (len(item.names), SIZE, SIZE) and item.image.shape == (SIZE, SIZE, 3)
        record = plans[item.image_id]
        for query, pos, kind in zip(item.queries, item.positives, item.answer_types):
            names = {item.names[p] for p in pos}
            if kind == "closed":
                assert names == {record["target"]}
                assert query.startswith("Medical image of abdomen. Is there a lesion in the ")
            elif kind == "open":
                assert names == {"lesion_0"}
                assert query == "Medical image of abdomen. Which organ contains the lesion?"
            else:
                assert names and names <= {"lesion_0", "cyst_0"}
    # Resizing to the working size keeps masks boolean and images uint8
    big = load_phantom_structures(phantom_root, "test", working_size=256)
    assert big[0].masks.dtype == bool and big[0].masks.shape[1:] == (256, 256) and big[0].image.dtype == np.uint8


def test_output_is_an_open_clip_folder_with_provenance(trained, phantom_root):
    assert sorted(p.name for p in trained.iterdir()) == [
        "metrics.json", "open_clip_config.json", "open_clip_model.safetensors", "provenance.json"]  # fmt: skip
    config = json.loads((trained / "open_clip_config.json").read_text())
    assert config == {"model_cfg": DEMO_MODEL_CFG, "preprocess_cfg": DEMO_PREPROCESS_CFG}
    provenance = read_provenance(trained)
    assert provenance.stage == "demo_clip"
    assert provenance.inputs == {"phantom.json": hash_file(phantom_root / "phantom.json")}
    assert provenance.params["steps"] == 80 and provenance.params["seed"] == 0
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["train"]["n"]["all"] == sum(len(i.queries) for i in load_phantom_structures(phantom_root, "train"))


def test_refinement_picks_the_queried_structure(trained, phantom_root):
    scorer = load_clip(trained)  # from disk, through the same path the refine stage uses
    images = load_phantom_structures(phantom_root, "train", working_size=SIZE)
    assert structure_ranking_accuracy(scorer, images)["all"] == 1.0
    # The ranking follows the query, not the proposals' order: shuffle them and score one query at a time
    rng = np.random.default_rng(0)
    picked = []
    for item in images:
        order = rng.permutation(len(item.names))
        for query, pos in zip(item.queries, item.positives):
            scores = scorer.score(item.image, item.masks[order], query)
            assert scores.shape == (len(order),) and np.isfinite(scores).all()
            picked.append(int(order[select_top_k(scores, 1)[0]]) in pos)
    assert all(picked)
    # Different queries on the same image pick different structures (prompt-aware, not a saliency map)
    item = next(i for i in images if {"closed", "open"} <= set(i.answer_types))
    scores = scorer.score_queries(item.image, item.masks, item.queries)
    closed, opened = item.answer_types.index("closed"), item.answer_types.index("open")
    assert scores[closed].argmax() != scores[opened].argmax()


def test_training_is_deterministic(phantom_root, tmp_path):
    kwargs = {"steps": 3, "batch_size": 4, "views": 2, "working_size": SIZE, "threads": THREADS, "progress": False}
    a = train_demo_clip(phantom_root, tmp_path / "a", seed=7, **kwargs)
    b = train_demo_clip(phantom_root, tmp_path / "b", seed=7, **kwargs)
    c = train_demo_clip(phantom_root, tmp_path / "c", seed=8, **kwargs)
    for name in ("open_clip_model.safetensors", "provenance.json", "metrics.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "open_clip_model.safetensors").read_bytes() != (c / "open_clip_model.safetensors").read_bytes()
    # Rerunning into an existing folder replaces it atomically, leaving no temporary siblings
    train_demo_clip(phantom_root, tmp_path / "a", seed=7, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_missing_phantom_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "phantom.json")):
        load_phantom_structures(tmp_path, "train")
