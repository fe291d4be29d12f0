"""Head-importance scores from captured attention, and the top-K selection.

Two numbers per (layer, head), each a mean over the probe samples:

- ``score``, the reference's ratio (reference/a3tune-method.md §4): the mean, over the post-image
  query rows R of a sample (everything after the last image token: question, separators and the
  teacher-forced answer), of the share of the row's attention that lands on image tokens.
- ``inside_score``: of the attention those rows give the image, the share inside the sample's weak
  label, ``Σ_R Σ_j A[t, j]·m[j] / Σ_R Σ_j A[t, j]`` over image tokens j, averaged over the sample's
  k label maps; only samples with a label count. A head can look at the image a lot and at the
  labelled structure little; this column tells the two apart.

Heads are ranked by one of the two (``score`` by default, as the reference) and the top K are
selected; K is a count or, below 1, a fraction of all heads (the reference's 128 of 1024 is 0.125).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import torch

from a3tune.probe.head_ratios import head_ratios

RANK_BY = ("score", "inside_score")


@dataclasses.dataclass
class HeadScoreAccumulator:
    """Sums of per-sample head scores over the probe set, layer by layer."""

    n_layers: int
    n_heads: int
    score_sum: np.ndarray = dataclasses.field(init=False)
    inside_sum: np.ndarray = dataclasses.field(init=False)
    n_samples: int = 0
    n_labelled: int = 0

    def __post_init__(self) -> None:
        self.score_sum = np.zeros((self.n_layers, self.n_heads))
        self.inside_sum = np.zeros((self.n_layers, self.n_heads))

    def add(self, captured: dict, post_image: torch.Tensor, label_maps: torch.Tensor | None = None) -> None:
        """Add one batch: ``captured`` maps layer -> LayerCapture for every head of every layer.

        ``post_image`` (B, N) marks each sample's query rows R; ``label_maps`` (B, k) tells which of
        the k label maps passed to the capture are real (a sample without a label has none). The
        ratios come from :func:`a3tune.probe.head_ratios.head_ratios` (ValueError for a sample
        without post-image rows, before anything is added).
        """
        real = label_maps.detach().cpu() if label_maps is not None else None
        labelled = real.any(dim=1) if real is not None else torch.zeros(len(post_image), dtype=torch.bool)
        for layer, cap in captured.items():
            heads = cap.heads.cpu().numpy()
            share, ratio = head_ratios(cap.image_share, cap.inside if labelled.any() else None, post_image)
            self.score_sum[layer, heads] += share.sum(dim=0).numpy()
            if ratio is None:
                continue
            weights = real[:, None, :].to(torch.float64)
            per_sample = (ratio * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1)  # (B, h)
            self.inside_sum[layer, heads] += per_sample[labelled].sum(dim=0).numpy()
        self.n_samples += len(post_image)
        self.n_labelled += int(labelled.sum())

    def table(self, top_k: float, rank_by: str = "score") -> pl.DataFrame:
        """The heads.parquet rows: every head with its scores, rank (1 = best) and selection."""
        if self.n_samples == 0:
            raise ValueError("no probe samples: nothing to rank")
        score = self.score_sum / self.n_samples
        inside = self.inside_sum / self.n_labelled if self.n_labelled else np.full_like(score, np.nan)
        if rank_by == "inside_score" and not self.n_labelled:
            raise ValueError("rank_by inside_score needs labelled probe samples; none had a label")
        layer, head = np.divmod(np.arange(self.n_layers * self.n_heads), self.n_heads)
        rank = rank_heads(score if rank_by == "score" else inside, rank_by)
        k = n_selected(top_k, score.size)
        return pl.DataFrame({
            "layer": layer.astype(np.int32),
            "head": head.astype(np.int32),
            "score": score.ravel(),
            "inside_score": None if not self.n_labelled else inside.ravel(),
            "rank": rank.ravel().astype(np.int32),
            "selected": rank.ravel() <= k,
        }, schema_overrides={"inside_score": pl.Float64})  # fmt: skip


def rank_heads(values: np.ndarray, rank_by: str) -> np.ndarray:
    """1-based ranks, best first; ties keep (layer, head) order so the ranking is deterministic."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    order = np.argsort(-values.ravel(), kind="stable")
    rank = np.empty(values.size, dtype=np.int64)
    rank[order] = np.arange(1, values.size + 1)
    return rank.reshape(values.shape)


def n_selected(top_k: float, n_heads: int) -> int:
    """How many heads ``top_k`` selects: a count (>= 1), or a fraction of all heads (0 < top_k < 1)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k <= 0:
        raise ValueError(f"top_k must be a positive count or a fraction in (0, 1), got {top_k!r}")
    if top_k < 1:
        return max(1, math.ceil(top_k * n_heads))
    if top_k != int(top_k):
        raise ValueError(f"top_k above 1 must be a whole number of heads, got {top_k}")
    return min(int(top_k), n_heads)
