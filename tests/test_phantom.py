"""The phantom benchmark: determinism, exact masks, answers that follow the masks, shortcut rates, import."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from a3tune.cli import main
from a3tune.data.importer import import_dataset
from a3tune.data.phantom import PhantomConfig, cue_shuffled_twins, draw, generate, plan_split, read
from a3tune.data.phantom_scene import ORGANS
from a3tune.data.records import DataFormatError
from a3tune.io import hash_path, read_parquet, read_provenance
from a3tune.io.contracts import SPLITS

SMALL = {"n_images": {"train": 6, "val": 2, "test": 4}}


def _mask(root, ref):
    return np.asarray(Image.open(root / ref)) > 0


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return generate(PhantomConfig.from_dict(SMALL), tmp_path_factory.mktemp("phantom") / "raw")


@pytest.fixture(scope="module")
def big_plans():
    cfg = PhantomConfig.from_dict({"n_images": {s: 400 for s in SPLITS}})
    return cfg, {s: plan_split(cfg, s) for s in SPLITS}


def test_same_config_gives_identical_files_and_seed_changes_them(tmp_path, small_root):
    again = generate(PhantomConfig.from_dict(SMALL), tmp_path / "again")
    assert hash_path(again) == hash_path(small_root)
    generate(PhantomConfig.from_dict(SMALL), again)  # a rerun over an existing root replaces it
    assert hash_path(again) == hash_path(small_root)
    other = generate(PhantomConfig.from_dict({**SMALL, "seed": 1}), tmp_path / "other")
    assert hash_path(other) != hash_path(small_root)
    assert (other / "images" / "train_0000.png").read_bytes() != (small_root / "images" / "train_0000.png").read_bytes()


def test_growing_one_split_leaves_the_others_alone(tmp_path, small_root):
    bigger = generate(PhantomConfig.from_dict({"n_images": {"train": 9, "val": 2, "test": 4}}), tmp_path / "b")
    for name in ("val_0000", "test_0003"):
        assert (bigger / "images" / f"{name}.png").read_bytes() == (small_root / "images" / f"{name}.png").read_bytes()


def test_masks_are_exact_and_intensities_differ():
    cfg = PhantomConfig(n_images={"train": 40, "val": 0, "test": 40})
    for plan in plan_split(cfg, "train") + plan_split(cfg, "test"):
        scene = draw(cfg, plan)
        grey = scene.image[..., 0].astype(float)
        assert (scene.image == scene.image[..., :1]).all()  # grey in RGB
        s = scene.structures
        organs = [s[o].mask for o in cfg.organs]
        assert (np.sum(organs, axis=0) <= 1).all()  # organs are disjoint
        assert all(m.sum() > 150 and not (m & ~s["body"].mask).any() for m in organs)
        assert not (s["spine"].mask & np.logical_or.reduce(organs)).any()
        for name, blob in s.items():
            if blob.kind not in ("lesion", "cyst"):
                continue
            host = s[blob.organ].mask
            assert not (blob.mask & ~host).any()  # inside its organ
            assert cfg.lesion_radius[0] <= blob.radius <= cfg.lesion_radius[1]
            assert blob.mask.sum() >= 0.6 * np.pi * cfg.lesion_radius[0] ** 2  # big enough to segment
            gap = grey[blob.mask].mean() - grey[host & ~blob.mask].mean()
            # Drawn contrast >= 55 (lesion) / <= -32 (cyst); the point spread mixes the rim with the organ
            # and the bias field shifts the organ's mean, which leaves >= 41 / <= -27 on these 80 images.
            assert gap > 35 if blob.kind == "lesion" else gap < -20, (plan, name, gap)
        assert ("marker" in s) == plan.cue
        assert ("lesion_0" in s) == (plan.lesion_organ is not None)
        assert ("cyst_0" in s) == (plan.cyst_organ is not None)


def test_scanner_realism_is_on_by_default_and_leaves_the_shapes_alone():
    """Texture, grain, bias and point spread give ~6-9 grey levels of variation inside an organ (about
    10-15 HU at a 400-HU window, routine-dose abdominal CT); turned off, only the white noise is left."""
    from scipy import ndimage

    flat = PhantomConfig(texture=0.0, bias=0.0, grain=0.0, blur=0.0)
    for plan in plan_split(PhantomConfig(), "test")[:4]:
        real, plain = draw(PhantomConfig(), plan), draw(flat, plan)
        assert real.structures.keys() == plain.structures.keys()
        assert all((real.structures[k].mask == plain.structures[k].mask).all() for k in real.structures)
        liver = ndimage.binary_erosion(real.structures["liver"].mask, iterations=3)
        findings = [s.mask for s in real.structures.values() if s.kind in ("lesion", "cyst")]
        liver &= ~ndimage.binary_dilation(np.logical_or.reduce([np.zeros_like(liver), *findings]), iterations=3)
        assert 6.0 < real.image[..., 0][liver].std() < 10.0
        assert plain.image[..., 0][liver].std() < 6.0
        assert not (real.image == plain.image).all()


def test_answers_follow_the_masks_on_disk(small_root):
    data = json.loads((small_root / "phantom.json").read_text())
    images = {img["path"]: img for img in data["images"]}
    kinds = {"closed": 0, "open": 0, "report": 0}
    for sample in data["samples"]:
        kinds[sample["answer_type"]] += 1
        structures = images[sample["image"]]["structures"]
        lesions = [_mask(small_root, s["mask"]) for s in structures.values() if s["kind"] == "lesion"]
        assert len(lesions) <= 1
        if sample["answer_type"] == "closed":
            target = _mask(small_root, sample["gt_mask"])
            inside = any(not (lesion & ~target).any() for lesion in lesions)
            assert sample["answer"] == ("yes" if inside else "no")
            assert sample["organ"] in sample["question"]
        elif sample["answer_type"] == "open":
            holders = [ORGANS[n].display for n, s in structures.items()
                       if s["kind"] == "organ" and not (lesions[0] & ~_mask(small_root, s["mask"])).any()]
            assert holders == [sample["answer"]]
            assert (_mask(small_root, sample["gt_mask"]) == lesions[0]).all()
        else:
            findings = [_mask(small_root, s["mask"]) for s in structures.values() if s["kind"] in ("lesion", "cyst")]
            if findings:
                assert (_mask(small_root, sample["gt_mask"]) == np.logical_or.reduce(findings)).all()
                assert "lesion" in sample["answer"] or "cyst" in sample["answer"]
            else:
                assert sample["gt_mask"] is None and "No focal lesion" in sample["answer"]
    assert kinds["closed"] == 12 and kinds["open"] > 0 and kinds["report"] == 6


def test_rates_per_split_match_the_config(big_plans):
    cfg, plans = big_plans
    for split, rows in plans.items():
        yes = np.array([p.answer == "yes" for p in rows])
        agree = np.mean([p.cue == (p.answer == "yes") for p in rows])
        confused = np.mean([p.confuser != "none" for p in rows])
        assert abs(yes.mean() - cfg.lesion_rate) < 0.01
        assert abs(agree - cfg.cue_agreement[split]) < 0.01
        assert abs(confused - cfg.confuser_rate[split]) < 0.01
        assert abs(np.mean([p.report for p in rows]) - cfg.report_rate) < 0.01
        assert {p.target for p in rows} == set(cfg.organs)
        # A decoy lesion only ever sits in a "no" image, a cyst only in a "yes" image, both elsewhere.
        for p in rows:
            assert p.confuser != "decoy_lesion" or (p.answer == "no" and p.lesion_organ != p.target)
            assert p.confuser != "cyst" or (p.answer == "yes" and p.cyst_organ != p.target)


def test_looking_at_the_wrong_place_is_measurably_wrong(big_plans):
    """Readers that use the cue or any lesion anywhere lose on test; reading the target organ never does."""
    _, plans = big_plans

    def accuracy(rows, reader):
        return np.mean([reader(p) == p.answer for p in rows])

    def cue(p):
        return "yes" if p.cue else "no"

    def anywhere(p):
        return "yes" if p.lesion_organ else "no"

    def target(p):
        return "yes" if p.lesion_organ == p.target else "no"

    assert accuracy(plans["train"], cue) > 0.85 and accuracy(plans["test"], cue) < 0.15
    assert accuracy(plans["train"], anywhere) > 0.85 and accuracy(plans["test"], anywhere) < 0.65
    assert all(accuracy(plans[s], target) == 1.0 for s in SPLITS)


def test_round_trip_through_the_importer(tmp_path, small_root):
    samples, images = import_dataset(
        "phantom", small_root, "phantom", tmp_path / "samples.parquet", tmp_path / "images.parquet", progress=False
    )
    read_parquet(tmp_path / "samples.parquet", contract="samples")
    read_parquet(tmp_path / "images.parquet", contract="images")
    assert images.height == 12 and set(images["status"]) == {"ok"}
    assert set(images["height"]) == {128} and set(images["mode"]) == {"RGB"}
    assert set(samples["image_id"]) == set(images["image_id"])
    refs = samples["gt_mask_ref"].drop_nulls().to_list()
    assert refs and all((small_root / ref).is_file() for ref in refs)
    assert {"cue", "cue_agrees", "confuser", "target"} <= set(samples.columns)
    assert read_provenance(small_root).stage == "phantom"
    assert read_provenance(small_root).params == PhantomConfig.from_dict(SMALL).to_dict()


def test_reader_rejects_options_and_names_bad_rows(tmp_path, small_root):
    with pytest.raises(ValueError, match="image_dir"):
        read(small_root, image_dir="x")
    with pytest.raises(FileNotFoundError, match="phantom.json"):
        read(tmp_path)
    data = json.loads((small_root / "phantom.json").read_text())
    del data["samples"][3]["question"]
    (tmp_path / "phantom.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"row 3, field 'question': missing"):
        read(tmp_path)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"colour": 1}, "colour"),
        ({"size": "128"}, "size must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"n_images": {"tran": 3}}, "tran"),
        ({"cue_agreement": {"test": "low"}}, "cue_agreement"),
        ({"lesion_rate": 1.5}, "lesion_rate must be in"),
        ({"lesion_radius": [4]}, "lesion_radius must be a list of two integers"),
        ({"lesion_radius": [9, 4]}, "lesion_radius"),
        ({"size": 64}, "smallest organ"),
        ({"organs": ["liver", "heart"]}, "heart"),
        ({"organs": ["liver"]}, "organs"),
        ({"blur": 5}, "blur must be in"),
        ({"bias": -0.1}, "bias must be in"),
        ({"grain": "high"}, "grain must be a number"),
    ],
)
def test_from_dict_rejects_bad_params_naming_them(params, named):
    with pytest.raises(ValueError, match=named):
        PhantomConfig.from_dict(params)


def test_config_round_trips_and_partial_splits_keep_defaults():
    cfg = PhantomConfig.from_dict({"n_images": {"test": 3}, "lesion_radius": [3, 5], "noise": 2})
    assert cfg.n_images == {"train": 48, "val": 8, "test": 3} and cfg.noise == 2.0
    assert PhantomConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PhantomConfig.from_dict({}) == PhantomConfig()


def test_cli_generates(tmp_path):
    params = json.dumps({"n_images": {"train": 2, "val": 1, "test": 1}, "seed": 3})
    assert main(["phantom", "--out", str(tmp_path / "raw"), "--params", params]) == 0
    assert len(list((tmp_path / "raw" / "images").glob("*.png"))) == 4
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--params", '{"seeed": 1}']) == 2
    assert not (tmp_path / "bad").exists()


def test_cue_shuffled_twins_differ_only_in_the_marker_and_agree_at_chance(small_root, big_plans):
    data = json.loads((small_root / "phantom.json").read_text())
    for image in data["images"]:
        twin_ref = next(s["image_cue_shuffled"] for s in data["samples"] if s["image"] == image["path"])
        if image["split"] == "test":
            assert twin_ref is None and not (small_root / "cue_shuffled" / f"{image['image_id']}.png").exists()
            continue
        original, twin = (np.asarray(Image.open(small_root / ref)) for ref in (image["path"], twin_ref))
        size = original.shape[0]
        edge, side = max(2, size // 32), PhantomConfig().marker_size  # the marker square (phantom_scene)
        outside = np.ones(original.shape[:2], bool)
        outside[edge:edge + side, size - edge - side:size - edge] = False
        assert (original[outside] == twin[outside]).all()
    cfg, plans = big_plans
    twins = cue_shuffled_twins(cfg, "train", plans["train"])
    assert [(t.image_id, t.answer, t.lesion_organ) for t in twins] == [(p.image_id, p.answer, p.lesion_organ)
                                                                       for p in plans["train"]]  # fmt: skip
    assert np.mean([t.cue == (t.answer == "yes") for t in twins]) == 0.5
    assert np.mean([p.cue == (p.answer == "yes") for p in plans["train"]]) == pytest.approx(0.9, abs=0.01)
