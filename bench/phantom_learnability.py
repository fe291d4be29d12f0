"""Can the demo's stand-in model answer the phantom's closed question by looking? One design, measured.

    python bench/phantom_learnability.py [--design JSON] [--threads N] [--out DIR]

Issue 19's first question, before any method comparison: plain LoRA tuned on the cue-shuffled twins
(``lora_nocue``) must beat the answer prior on the shifted test, or no method can be told apart. This
bench runs one design without the DAG or weak labels (plain LoRA needs none): it draws the phantom,
pre-trains the stand-in (``train_demo_lvlm``; optionally on an own image set, ``pretrain``), measures
the base model's accuracy on the open question ("Which organ contains the lesion?": can it see and
place a lesion at all?) on its own training images and on the test split, then tunes plain LoRA on
the original images and on their cue-shuffled twins and prints closed accuracy on the test split, split
by whether the cue agrees with the answer, with the share of "yes" answers.

``--design`` (JSON) overrides: ``phantom`` (generator parameters of the tuning set), ``pretrain``
(generator parameters of the own pre-training set, or null), ``architecture`` and ``training`` (of the
stand-in), ``tune`` (overrides of the phantom preset). Defaults: the demo's config.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from a3tune.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from a3tune.data.images import load_rgb  # noqa: E402
from a3tune.data.importer import import_dataset  # noqa: E402
from a3tune.data.phantom import PhantomConfig, generate  # noqa: E402
from a3tune.models.demo_lvlm import train_demo_lvlm  # noqa: E402
from a3tune.models.registry import lvlm_from_config  # noqa: E402
from a3tune.score.generation import DecodeSettings, generate_answers  # noqa: E402
from a3tune.score.vqa_metrics import closed_hit  # noqa: E402
from a3tune.tune.settings import resolve_settings  # noqa: E402
from a3tune.tune.trainer import TrainData, train  # noqa: E402
from a3tune.tune.tune_stage import on_cue_shuffled_twins  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def default_design() -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    demo = config["model"]["demo"]
    return {"phantom": config["phantom"], "pretrain": demo.get("pretrain"), "architecture": demo["architecture"],
            "training": demo["training"], "tune": {}}  # fmt: skip


def split_of(data: Path, split: str, answer_type: str) -> pl.DataFrame:
    samples, images = pl.read_parquet(data / "samples.parquet"), pl.read_parquet(data / "images.parquet")
    rows = samples.filter((pl.col("split") == split) & (pl.col("answer_type") == answer_type))
    return rows.join(images.select("image_id", "path"), on="image_id").sort("sample_id")


def answers(lvlm, rows: pl.DataFrame, root: Path) -> list[str]:
    out = []
    for start in range(0, rows.height, 16):
        part = rows.slice(start, 16)
        out += generate_answers(lvlm, [load_rgb(root / p) for p in part["path"]], part["question"].to_list(),
                                DecodeSettings(num_beams=1, max_new_tokens=4))  # fmt: skip
    return out


def open_accuracy(lvlm, rows: pl.DataFrame, root: Path) -> float:
    """Share of open answers that name the lesion's organ."""
    predicted = answers(lvlm, rows, root)
    return float(np.mean([a.lower() in p.lower() for p, a in zip(predicted, rows["answer"])])) if rows.height else float("nan")


def closed_scores(lvlm, rows: pl.DataFrame, root: Path) -> dict[str, float]:
    predicted = answers(lvlm, rows, root)
    hits = np.array([closed_hit(p, a) for p, a in zip(predicted, rows["answer"])], float)
    agrees = (rows["cue_agrees"] == "yes").to_numpy()
    return {"closed": hits.mean(), "cue agrees": hits[agrees].mean(), "cue disagrees": hits[~agrees].mean(),
            "yes share": float(np.mean([p.lower().startswith("yes") for p in predicted]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", type=json.loads, default={}, help="overrides of the demo's design (JSON)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="work folder (default: a temporary one); a base model there from the same design is reused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    design = {**default_design(), **args.design}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        data = work / "phantom"
        shutil.rmtree(data, ignore_errors=True)
        generate(PhantomConfig.from_dict(design["phantom"]), data / "raw")
        import_dataset("phantom", data / "raw", "phantom", data / "samples.parquet", data / "images.parquet",
                       progress=False)  # fmt: skip
        base = work / "base"
        texts = pl.read_parquet(data / "samples.parquet").select(pl.concat_list("question", "answer")).to_series()
        vocabulary = sorted({t for pair in texts.to_list() for t in pair})  # the stand-in's tokenizer reads these
        recipe = json.dumps({**{k: design[k] for k in ("pretrain", "architecture", "training")}, "texts": vocabulary},
                            sort_keys=True)  # fmt: skip
        if not (base / "recipe.json").is_file() or (base / "recipe.json").read_text() != recipe:
            shutil.rmtree(base, ignore_errors=True)  # another design's base model: train this one
            train_demo_lvlm(data / "samples.parquet", data / "images.parquet", data / "raw", base,
                            architecture=design["architecture"], training=design["training"],
                            pretrain=design["pretrain"], progress=False)  # fmt: skip
            (base / "recipe.json").write_text(recipe)
        spec = {"path": str(base), "device": "cpu"}
        lvlm = lvlm_from_config(spec)
        rows = [("base", "open, train split", open_accuracy(lvlm, split_of(data, "train", "open"), data / "raw")),
                ("base", "open, test split", open_accuracy(lvlm, split_of(data, "test", "open"), data / "raw"))]
        test = split_of(data, "test", "closed")
        results = {"base": closed_scores(lvlm, test, data / "raw")}
        for method in ("lora", "lora_nocue"):
            lvlm = lvlm_from_config(spec)
            settings = resolve_settings("phantom", method, {**design["tune"], "seed": 0})
            samples = pl.read_parquet(data / "samples.parquet").filter(pl.col("split") == "train")
            samples = samples.join(pl.read_parquet(data / "images.parquet").select("image_id", "path"), on="image_id")
            samples = samples.sort("sample_id").with_columns(pl.lit(None, pl.Int64).alias("label_row"))
            if settings.train_images == "cue_shuffled":
                samples = on_cue_shuffled_twins(samples, data / "samples.parquet")
            side = int(lvlm.n_image_tokens**0.5)
            with tempfile.TemporaryDirectory() as run:
                train(lvlm, settings, TrainData(samples, data / "raw", np.zeros((1, 1, side, side), np.float32)), run,
                      Path(run) / "checkpoints", progress=False)  # fmt: skip
            results[method] = closed_scores(lvlm, test, data / "raw")
    print(f"design: {json.dumps(design, sort_keys=True)}")
    print(f"{time.perf_counter() - start:.0f} s on {args.threads} threads; test split: {test.height} closed questions\n")
    print("| model | open accuracy on | value |\n|---|---|---|")
    for model, what, value in rows:
        print(f"| {model} | {what} | {value:.3f} |")
    columns = list(next(iter(results.values())))
    print("\n| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for model, scores in results.items():
        print(f"| {model} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
