"""The demo's stand-in for BiomedCLIP: a small open_clip CLIP trained on phantom crops.

Real BiomedCLIP weights cannot ship, so the embedded demo refines its proposals with a tiny CLIP
(ViT 64 px / patch 16 / 3 layers, text transformer with open_clip's built-in BPE tokenizer, 64-d
embeddings) trained here, on the phantom's *train* split only, for exactly the decision the refine
stage makes: given one image's masks and one sample's query, which mask is the queried region?

Training pairs (the gt_mask of each phantom sample is its queried region):

- for every training sample with a ground-truth mask, the query text ``build_query("phantom",
  sample)`` (the string the refine stage will use) is paired with the masked crop of its region:
  the target organ for a closed question ("Medical image of abdomen. Is there a lesion in the
  liver?"), the lesion for the open one ("... Which organ contains the lesion?"), any lesion or
  cyst for a report with findings;
- the negatives are the masked crops of every other structure of the *same* image (body, other
  organs, spine, the lesion, cyst and cue marker): the hard negatives the ranking must beat;
  crops of other images are not negatives (another image's liver is a liver too);
- the loss is a multi-positive InfoNCE over the image's crops for each query, plus the symmetric
  term over the distinct query texts for each positive crop (a crop picks its query);
- each structure is shown in one of ``views`` crops: the exact mask, or the mask grown or shrunk by
  a pixel, like an imperfect proposal (no flips: they would swap the kidneys; no grey-level
  changes: grey levels tell the organs apart).

Measured on the default phantom (48 train images, 394 structure crops, 91 queries): training takes
about 44 s of CPU on one thread (the default), train top-1 1.00; top-1 on the test split 0.95 /
0.96 / 0.98 for seeds 0 / 1 / 2 (57 samples), and 0.956-0.958 on a 240-image test split (565
samples). The errors left are inherent to masked crops, which the preprocessing rescales to a fixed
size: a lesion crop and the spine crop are both bright ovals, and the report query (any lesion or
cyst) sometimes prefers a dark organ.

Crops are made by ``clip_scorer.masked_crop`` at the working size and preprocessed by the model's
own inference transform, exactly as ``ClipScorer`` does at refinement time. The output folder is an
open_clip folder that ``clip_scorer.load_clip`` loads (open_clip_config.json,
open_clip_model.safetensors, provenance.json, metrics.json); a fixed seed (and thread count) gives
the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from a3tune.data.images import STATUS_OK, load_rgb, probe_image, resolve_under
from a3tune.io.atomic import atomic_dir
from a3tune.io.provenance import Provenance, hash_file
from a3tune.labels.clip_scorer import (
    CONFIG_NAME,
    WEIGHT_NAMES,
    ClipScorer,
    build_query,
    import_open_clip,
    masked_crop,
    select_top_k,
)

log = logging.getLogger(__name__)

# The architecture: open_clip's CLIP with its built-in towers (ViT + causal text transformer).
DEMO_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
# The model's own preprocessing: squash the crop to 64 x 64 (keeps the whole shape of elongated
# organs; the kidneys differ only by their notch side).
DEMO_PREPROCESS_CFG: dict[str, Any] = {
    "size": 64,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "squash",
}
METRICS_NAME = "metrics.json"
# Findings masks name no single structure: any structure of these kinds is the queried region.
FINDING_KINDS = ("lesion", "cyst")


@dataclasses.dataclass
class PhantomImage:
    """One phantom image at the working size, its structures' masks and its samples' queries."""

    image_id: str
    image: np.ndarray  # (S, S, 3) uint8
    names: list[str]  # structure names, in phantom.json order
    masks: np.ndarray  # (m, S, S) bool, one per name
    queries: list[str]  # one per sample with a ground-truth region
    positives: list[list[int]]  # for each query, the indices (into names) of the queried region
    answer_types: list[str]  # for each query: closed / open / report


def load_phantom_structures(
    phantom_root: str | os.PathLike, split: str, *, working_size: int = 256
) -> list[PhantomImage]:
    """The images of ``split`` with every structure mask, resized to the working size.

    Images go through the proposal stage's own ``prepare_image`` (the working image the refine stage
    scores), masks are resized by nearest neighbour. Samples without a ground-truth mask (a report
    without findings) are left out.
    """
    from a3tune.labels.proposals import prepare_image  # imports segment_anything: only when needed

    root = Path(phantom_root)
    path = root / "phantom.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with `a3tune phantom --out {root}`")
    data = json.loads(path.read_text())
    by_image: dict[str, list[dict[str, Any]]] = {}
    for sample in data["samples"]:
        if sample["split"] == split and sample.get("gt_mask"):
            by_image.setdefault(Path(sample["image"]).stem, []).append(sample)
    out = []
    for record in data["images"]:
        if record["split"] != split:
            continue
        usable = probe_image(root, record["path"])  # a damaged image is skipped, as every stage skips it
        if usable.status != STATUS_OK:
            log.warning("demo CLIP: skipping image %s: %s (%s)", record["path"], usable.status, usable.error)
            continue
        image = prepare_image(load_rgb(resolve_under(root, record["path"])), working_size)
        structures = record["structures"]
        names = list(structures)
        masks = np.stack([_resize_mask(Image.open(root / structures[n]["mask"]), working_size) for n in names])
        queries, positives, kinds = [], [], []
        for sample in by_image.get(record["image_id"], []):
            region = Path(sample["gt_mask"]).stem
            if region in structures:
                pos = [names.index(region)]
            else:  # findings.png: the union of the lesions and cysts
                pos = [i for i, n in enumerate(names) if structures[n]["kind"] in FINDING_KINDS]
            if pos:
                queries.append(build_query("phantom", sample))
                positives.append(pos)
                kinds.append(sample["answer_type"])
        out.append(PhantomImage(record["image_id"], image, names, masks, queries, positives, kinds))
    return out


def _resize_mask(mask: Image.Image, size: int) -> np.ndarray:
    mask = mask.convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.NEAREST)
    return np.asarray(mask) > 127


def structure_ranking_accuracy(scorer: ClipScorer, images: list[PhantomImage]) -> dict[str, Any]:
    """Top-1 accuracy of picking a sample's queried structure among all structures of its image.

    Returns ``{"all": acc, "closed": acc, "open": acc, "report": acc, "n": {...}}`` (answer types
    without samples are left out).
    """
    hits: dict[str, list[bool]] = {}
    for item in images:
        if not item.queries:
            continue
        scores = scorer.score_queries(item.image, item.masks, item.queries)
        for row, pos, kind in zip(scores, item.positives, item.answer_types):
            top = select_top_k(row, 1)
            hit = bool(top.size) and int(top[0]) in pos
            hits.setdefault(kind, []).append(hit)
            hits.setdefault("all", []).append(hit)
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["n"] = {k: len(v) for k, v in sorted(hits.items())}
    return out


@dataclasses.dataclass
class _TrainSet:
    crops: torch.Tensor  # (views, N, 3, s, s) preprocessed masked crops of all structures
    image_of_crop: np.ndarray  # (N,) index of the image each crop belongs to
    crop_start: np.ndarray  # (n_images + 1,) the crops of image i are crop_start[i]:crop_start[i+1]
    tokens: torch.Tensor  # (T, context) the distinct query texts
    queries: list[tuple[int, int, list[int]]]  # (image, text, positive crop indices, global)
    queries_of_image: list[list[int]]


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` dilated (steps > 0) or eroded (steps < 0) by ``|steps|`` 4-neighbour steps."""
    out = mask.copy()
    for _ in range(abs(steps)):
        padded = np.pad(out, 1, constant_values=steps < 0)
        near = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        out = np.logical_or.reduce([out, *near]) if steps > 0 else np.logical_and.reduce([out, *near])
    return out


def _view(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, max_grow: int) -> np.ndarray:
    """The masked crop of the mask grown or shrunk a little, like an imperfect proposal (the exact
    mask when shrinking would empty it). Grey levels are left alone: they tell the organs apart."""
    grown = _grow(mask, int(rng.integers(-max_grow, max_grow + 1)))
    return masked_crop(image, grown if grown.any() else mask)


def _build_train_set(
    images: list[PhantomImage], preprocess, tokenizer, *, views: int, rng: np.random.Generator, max_grow: int
) -> _TrainSet:
    crops, owner, starts, queries, per_image = [], [], [0], [], []
    texts = sorted({q for item in images for q in item.queries})
    for i, item in enumerate(images):
        base = starts[-1]
        local = {}  # structure index -> global crop index (empty masks have no crop)
        for s, mask in enumerate(item.masks):
            crop = masked_crop(item.image, mask)
            if crop is not None:
                local[s] = base + len(local)
                # View 0 is the exact crop, the others perturbed copies
                copies = [crop] + [_view(item.image, mask, rng, max_grow) for _ in range(views - 1)]
                crops.append(torch.stack([preprocess(Image.fromarray(c)) for c in copies]))
                owner.append(i)
        starts.append(base + len(local))
        per_image.append([])
        for query, pos in zip(item.queries, item.positives):
            pos = [local[p] for p in pos if p in local]
            if pos:
                per_image[-1].append(len(queries))
                queries.append((i, texts.index(query), pos))
    return _TrainSet(
        torch.stack(crops, dim=1), np.asarray(owner), np.asarray(starts), tokenizer(texts), queries, per_image
    )


def _batches(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Image indices, epoch after epoch, each epoch a fresh permutation cut into batches."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):  # the remainder waits for the next epoch
            yield np.sort(order[start : start + batch_size])


def _loss(model, data: _TrainSet, batch: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    crop_ids = np.concatenate([np.arange(data.crop_start[i], data.crop_start[i + 1]) for i in batch])
    position = {int(c): j for j, c in enumerate(crop_ids)}
    view = torch.as_tensor(rng.integers(len(data.crops), size=len(crop_ids)))  # a random view of each crop
    image_emb = model.encode_image(data.crops[view, torch.as_tensor(crop_ids)], normalize=True)
    text_emb = model.encode_text(data.tokens, normalize=True)
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
    query_ids = [q for i in batch for q in data.queries_of_image[i]]
    if not query_ids:
        return image_emb.sum() * 0.0
    # Query -> crops of its own image (multi-positive InfoNCE)
    owner = torch.as_tensor(data.image_of_crop[crop_ids])
    q_image = torch.as_tensor([data.queries[q][0] for q in query_ids])
    q_text = torch.as_tensor([data.queries[q][1] for q in query_ids])
    positive = torch.zeros(len(query_ids), len(crop_ids), dtype=torch.bool)
    for row, q in enumerate(query_ids):
        positive[row, [position[c] for c in data.queries[q][2]]] = True
    logits = scale * text_emb[q_text] @ image_emb.T
    logits = logits.masked_fill(owner[None, :] != q_image[:, None], float("-inf"))
    to_crops = (logits.logsumexp(1) - logits.masked_fill(~positive, float("-inf")).logsumexp(1)).mean()
    # Positive crop -> the distinct texts (a crop's positives: every text it answers in its image)
    anchors = sorted({c for q in query_ids for c in data.queries[q][2]})
    text_pos = torch.zeros(len(anchors), len(data.tokens), dtype=torch.bool)
    for q in query_ids:
        for c in data.queries[q][2]:
            text_pos[anchors.index(c), data.queries[q][1]] = True
    logits = scale * image_emb[[position[c] for c in anchors]] @ text_emb.T
    to_texts = (logits.logsumexp(1) - logits.masked_fill(~text_pos, float("-inf")).logsumexp(1)).mean()
    return (to_crops + to_texts) / 2


def train_demo_clip(
    phantom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    seed: int = 0,
    working_size: int = 256,
    views: int = 8,
    max_grow: int = 1,
    threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Train the demo CLIP on the phantom's train split and write an open_clip folder atomically.

    Args:
        phantom_root: a phantom data root (``a3tune.data.phantom.generate``).
        out_dir: the folder to write (replaced if it exists).
        steps: optimiser steps.
        batch_size: images per step (each brings all its structure crops and its queries).
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0).
        weight_decay: AdamW weight decay.
        warmup: share of the steps spent warming up.
        seed: seeds the initial weights and the batch order.
        working_size: side the images and masks are resized to before cropping (the SAM stage's).
        views: crops prepared per structure: the exact one and ``views - 1`` copies whose mask is
            grown or shrunk by up to ``max_grow`` px; each step shows every structure in a random
            one of its views (8 views instead of 1 lifted top-1 on a 240-image phantom test split from
            0.94 to 0.96).
        max_grow: largest mask dilation or erosion of a perturbed view, in working-size pixels.
        threads: torch threads while training (None: leave the current setting). One by default:
            the same seed then gives the same bytes on any machine (the thread count changes float
            sums), and a shared 2-core machine is not slowed by threads spin-waiting on each other.
        progress: show a tqdm bar.

    Returns:
        ``out_dir``.
    """
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    phantom_root, out_dir = Path(phantom_root), Path(out_dir)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("views", views)):
        if value < 1:
            raise ValueError(f"demo_clip: {name} must be >= 1, got {value}")
    params = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
              "seed": seed, "working_size": working_size, "views": views, "max_grow": max_grow,
              "threads": threads, "model_cfg": DEMO_MODEL_CFG,
              "preprocess_cfg": DEMO_PREPROCESS_CFG}  # fmt: skip
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        model = open_clip.CLIP(**DEMO_MODEL_CFG)
        preprocess = image_transform_v2(PreprocessCfg(**DEMO_PREPROCESS_CFG), is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=DEMO_MODEL_CFG["text_cfg"]["context_length"])
        images = load_phantom_structures(phantom_root, "train", working_size=working_size)
        if not images:
            raise ValueError(f"{phantom_root / 'phantom.json'} has no train images")
        rng = np.random.default_rng(seed)
        data = _build_train_set(images, preprocess, tokenizer, views=views, rng=rng, max_grow=max_grow)
        log.info("demo CLIP: %d train images, %d crops, %d queries (%d distinct texts)",
                 len(images), data.crops.shape[1], len(data.queries), len(data.tokens))  # fmt: skip

        # fused: one kernel for all parameters (the 49408-row token embedding made the loop version
        # a third of each step)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        warm = max(1, int(warmup * steps))

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        batches = _batches(rng, len(images), min(batch_size, len(images)))
        model.train()
        bar = tqdm(range(steps), desc="demo CLIP", disable=not progress, mininterval=1.0)
        for _ in bar:
            loss = _loss(model, data, next(batches), rng)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        model.eval()
        scorer = ClipScorer(model, preprocess, tokenizer, source="training")
        metrics = {"train": structure_ranking_accuracy(scorer, images)}
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        log.info("demo CLIP: trained %d steps in %.1f s (%.1f s CPU); train top-1 %.3f",
                 steps, seconds, cpu, metrics["train"]["all"])  # fmt: skip

        from safetensors.torch import save_file

        with atomic_dir(out_dir) as tmp:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / WEIGHT_NAMES[0]), metadata={"format": "pt"})
            config = {"model_cfg": DEMO_MODEL_CFG, "preprocess_cfg": DEMO_PREPROCESS_CFG}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
            (tmp / METRICS_NAME).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
            provenance = Provenance(stage="demo_clip", params=params,
                                    inputs={"phantom.json": hash_file(phantom_root / "phantom.json")})  # fmt: skip
            (tmp / "provenance.json").write_text(provenance.to_json() + "\n")
    finally:
        torch.set_num_threads(old_threads)
    return out_dir
