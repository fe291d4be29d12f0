"""The embedded demo's base Med-LVLM: a small LLaVA pre-trained on the phantom training split.

Real Med-LVLM weights cannot ship, so the demo builds a tiny ``LlavaForConditionalGeneration``
(CLIP vision tower, projector, Llama language model; ``build_tiny_llava``) whose word-level
tokenizer covers the data set's questions and answers, and trains all of it from scratch with the
language-modelling loss on the answers of the training split. The result is the "base model" that
the probe ranks and that tuning starts from; it is saved in Hugging Face format (safetensors,
config, processor) with a ``provenance.json`` and the training curve, so ``load_lvlm`` reads it
like any local checkpoint.

With ``pretrain`` (phantom generator parameters) the model pre-trains on an image set of its own
instead, drawn in memory from those parameters and disjoint from the tuning data set, as a real
Med-LVLM's pre-training data is: many more images cost no weak labels (no SAM time), so the base
model can learn to see lesions and organs before tuning teaches it the closed task.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from a3tune.data.images import STATUS_OK, load_rgb, resolve_under
from a3tune.io.atomic import atomic_dir
from a3tune.io.parquet import read_parquet
from a3tune.io.provenance import Provenance, hash_path
from a3tune.tune.engine import Engine, check_finite

log = logging.getLogger(__name__)

# answer_types: the training samples' answer types (closed, open, report; empty = all). Leaving the
# fine-tuning task out (e.g. [open, report]) gives a base model that knows the images and the
# vocabulary but not that task, as a general Med-LVLM is before it is tuned on a data set.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "lr": 1e-3, "warmup": 0.05, "weight_decay": 0.0, "answer_types": []}


def train_demo_lvlm(
    samples_path: str | os.PathLike,
    images_path: str | os.PathLike,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    architecture: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    pretrain: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Build the stand-in LLaVA, pre-train it on the training split (or on the ``pretrain`` phantom
    set's), save it to ``out_dir``.

    ``architecture`` holds ``build_tiny_llava`` keyword arguments; ``training`` overrides
    ``TRAIN_DEFAULTS``. Returns the first and last logged losses.
    """
    from a3tune.models.layout import encode_batch
    from a3tune.models.lvlm import build_tiny_llava

    architecture = dict(architecture or {})
    unknown = set(training or {}) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"demo_lvlm: unknown training settings {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    train = {**TRAIN_DEFAULTS, **(training or {})}
    samples = read_parquet(samples_path, contract="samples")
    images = read_parquet(images_path, contract="images").filter(pl.col("status") == STATUS_OK)
    # The tokenizer's vocabulary: every word of every split's questions and answers
    corpus = samples["question"].to_list() + samples["answer"].to_list()
    torch.manual_seed(seed)
    lvlm = build_tiny_llava(corpus=corpus, seed=seed, **architecture)
    if pretrain is not None:
        data, pixels = phantom_pretraining_set(pretrain)
    else:
        data = samples.filter(pl.col("split") == "train").join(images.select("image_id", "path"), on="image_id")
    if train["answer_types"]:
        data = data.filter(pl.col("answer_type").is_in(list(train["answer_types"])))
    if data.is_empty():
        raise ValueError(f"demo_lvlm: no training samples with a usable image and answer type "
                         f"{train['answer_types'] or 'any'} in {'the pretrain set' if pretrain else samples_path}")  # fmt: skip
    if pretrain is None:
        pixels = {p: load_rgb(resolve_under(root, p)) for p in data["path"].unique().sort()}

    model = lvlm.model.train()
    engine = Engine(model, lr=train["lr"], weight_decay=train["weight_decay"], warmup=train["warmup"],
                    total_steps=train["steps"], seed=seed)  # fmt: skip
    rng = np.random.default_rng(seed)
    curve: list[dict[str, float]] = []
    bar = tqdm(range(train["steps"]), desc="demo_lvlm", unit="step", disable=not progress, mininterval=1.0)
    for step in bar:
        rows = data[rng.choice(data.height, size=min(train["batch_size"], data.height), replace=False)]
        batch = encode_batch(lvlm, [pixels[p] for p in rows["path"]], rows["question"].to_list(), rows["answer"].to_list())
        loss = model(**batch.inputs, labels=batch.labels).loss
        check_finite(loss, step)
        curve.append({"step": step, "loss": float(loss.detach()), "lr": engine.lr})
        engine.backward(loss)
        engine.step()
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", refresh=False)
    model.eval()

    provenance = Provenance(
        stage="demo_lvlm",
        params={"architecture": architecture, "training": train, "pretrain": pretrain, "seed": seed,
                "train_samples": data.height},
        inputs={"samples.parquet": hash_path(samples_path), "images.parquet": hash_path(images_path)},
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        lvlm.processor.save_pretrained(tmp)
        pl.DataFrame(curve).write_parquet(Path(tmp) / "train_log.parquet")
        (Path(tmp) / "provenance.json").write_text(provenance.to_json() + "\n")
    summary = {"first_loss": curve[0]["loss"], "last_loss": float(np.mean([c["loss"] for c in curve[-10:]]))}
    log.info("demo_lvlm: %d steps on %d samples, loss %.3f -> %.3f", train["steps"], data.height,
             summary["first_loss"], summary["last_loss"])  # fmt: skip
    return summary


def phantom_pretraining_set(params: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """The training split of the phantom drawn from ``params``, in memory: its samples (sample_id,
    question, answer, answer_type, path) and each path's pixels. No files: the parameters, recorded
    in the model's provenance, give the same images again."""
    from a3tune.data.phantom import PhantomConfig, draw, plan_split, samples_for

    cfg = PhantomConfig.from_dict(params)
    rows, pixels = [], {}
    for plan in plan_split(cfg, "train"):
        scene = draw(cfg, plan)
        records = samples_for(plan, scene, cfg)
        pixels[records[0]["image"]] = scene.image
        rows += [{k: r[k] for k in ("sample_id", "question", "answer", "answer_type")} | {"path": r["image"]}
                 for r in records]  # fmt: skip
    if not rows:
        raise ValueError(f"demo_lvlm: the pretrain set {params} has no training images (n_images.train)")
    return pl.DataFrame(rows), pixels
