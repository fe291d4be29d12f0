"""Per-sample, per-head attention ratios over a sample's post-image query rows, from a capture.

The head probe (``a3tune.probe.head_scores``) ranks heads by these numbers and the score stage's
grounding (``a3tune.score.grounding``) reports them, so both read them from this one function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def head_ratios(image_share: Tensor, inside: Tensor | None, post_image: Tensor) -> tuple[Tensor, Tensor | None]:
    """(share, inside_ratio) per sample and head over each sample's query rows R, in float64 on the CPU.

    ``image_share`` (B, h, N) and ``inside`` (B, h, k, N) are a ``LayerCapture``'s per-row sums of
    attention on the image and inside each of k maps; ``post_image`` (B, N) marks R.

    - share (B, h) = (1/|R|) Σ_{t∈R} image_share[t]: the mean share of a row's attention on the image;
    - inside_ratio (B, h, k) = Σ_{t∈R} inside[c, t] / Σ_{t∈R} image_share[t]: of the attention R
      gives the image, the share inside map c; None when ``inside`` is None.

    ValueError when a sample has no post-image row (nothing of it reads the image).
    """
    rows = post_image.detach().to("cpu", torch.float64)
    n_rows = rows.sum(dim=1)
    if bool((n_rows == 0).any()):
        raise ValueError("a sample has no tokens after its image: nothing attends to it")
    on_image = (image_share.detach().to("cpu", torch.float64) * rows[:, None]).sum(dim=2)  # (B, h)
    share = on_image / n_rows[:, None]
    if inside is None:
        return share, None
    inside_sum = (inside.detach().to("cpu", torch.float64) * rows[:, None, None]).sum(dim=3)  # (B, h, k)
    return share, inside_sum / on_image.clamp_min(1e-12)[:, :, None]
