"""Windowed box decoding for box-trained SAMs: one encoder pass per image, each prompt's mask decoder
on a window of the image embedding around its box, prompts sharing a window batched."""

from __future__ import annotations

import numpy as np
import torch

from a3tune.compat import ensure_torchvision
from a3tune.labels.sam_backends import LoadedSam

ensure_torchvision()  # segment_anything imports torchvision

from segment_anything import SamPredictor  # noqa: E402

# Window sides (in embedding tokens) for the mask decoder, smallest first; a window of side s is
# placed on a grid of stride s / 4, so any needed extent up to 3/4 s fits one.
WINDOW_SIDES = (8, 16, 32, 64)
# Logit given to pixels outside a prompt's decoder window (certainly background)
OUTSIDE_LOGIT = -1e4


def jittered_boxes(boxes: np.ndarray, fraction: float, size: int) -> list[np.ndarray]:
    """Each xyxy box shrunk and grown by ``fraction`` of its sides on every side, clipped to the image."""
    wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    grow = np.array([-1, -1, 1, 1], dtype=np.float32) * fraction
    return [np.clip(boxes + sign * grow * wh, 0, size) for sign in (-1.0, 1.0)]


def decoder_windows(token_boxes: np.ndarray, grid: int, margin: float) -> np.ndarray:
    """For each box in embedding-token coordinates, a window ``(side, row0, col0)`` of the embedding.

    The window holds the box enlarged by ``margin`` of its longer side (plus one token) on each
    side; its side is the smallest of ``WINDOW_SIDES`` (capped at ``grid``) whose grid of offsets
    (stride side / 4) has a window holding that extent. ``margin <= 0`` gives the whole embedding.
    """
    out = np.zeros((len(token_boxes), 3), dtype=np.int64)
    sides = sorted({min(s, grid) for s in WINDOW_SIDES} | {grid})
    for i, (x0, y0, x1, y1) in enumerate(token_boxes):
        if margin <= 0:
            out[i] = (grid, 0, 0)
            continue
        pad = margin * max(x1 - x0, y1 - y0) + 1.0
        lo = np.floor(np.array([y0, x0]) - pad).clip(0, grid)
        hi = np.ceil(np.array([y1, x1]) + pad).clip(0, grid)
        for side in sides:
            stride = max(side // 4, 1)
            start = np.minimum(lo // stride * stride, grid - side)
            if (hi <= start + side).all():
                out[i] = (side, *start.astype(np.int64))
                break
    return out


@torch.no_grad()
def decode_boxes(
    sam: LoadedSam, predictor: SamPredictor, boxes: np.ndarray, *, window: float, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits (n, S, S) at the working size and predicted IoU (n,) for xyxy boxes.

    ``predictor`` holds the image embedding (``set_image`` was called). Prompts sharing a decoder
    window go through the mask decoder together, ``batch`` at a time.
    """
    model = sam.model
    size = predictor.original_size
    n = len(boxes)
    logits = torch.full((n, 1, *size), OUTSIDE_LOGIT)
    iou = torch.zeros(n)
    if n == 0:
        return logits[:, 0], iou
    # Prompt boxes in SAM's convention (last column and row, not exclusive ends), at the model's input size
    corners = boxes.astype(np.float64) - np.array([0, 0, 1, 1])
    model_boxes = predictor.transform.apply_boxes(corners, size)
    features = predictor.features
    grid = features.shape[-1]
    tokens_per_px = grid / model.image_encoder.img_size
    windows = decoder_windows(model_boxes * tokens_per_px, grid, window)
    dense_pe = model.prompt_encoder.get_dense_pe()
    sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(model_boxes, dtype=torch.float32,
                                         device=features.device), masks=None)  # fmt: skip
    low_res = 4 * grid  # the decoder upscales the embedding 4x
    for key in np.unique(windows, axis=0):
        side, r0, c0 = (int(v) for v in key)
        rows = np.flatnonzero((windows == key).all(axis=1))
        crop = np.s_[:, :, r0 : r0 + side, c0 : c0 + side]
        # Crop before indexing: box prompts' dense embeddings are one vector expanded over the
        # whole embedding, and indexing first would copy that full (n, C, 64, 64) block
        dense_window = dense[crop]
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            masks, scores = model.mask_decoder(
                image_embeddings=features[crop],
                image_pe=dense_pe[crop],
                sparse_prompt_embeddings=sparse[part],
                dense_prompt_embeddings=dense_window[part],
                multimask_output=False,
            )
            # Paste the window into a full low-resolution canvas, then resize as SAM does
            canvas = torch.full((len(part), 1, low_res, low_res), OUTSIDE_LOGIT, device=masks.device)
            canvas[:, :, 4 * r0 : 4 * (r0 + side), 4 * c0 : 4 * (c0 + side)] = masks
            logits[part] = model.postprocess_masks(canvas, predictor.input_size, size).cpu()
            iou[part] = scores[:, 0].cpu()
    return logits[:, 0], iou
