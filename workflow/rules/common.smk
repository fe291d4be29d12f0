# Config validation and input functions shared by every stage. No stage logic lives here.
import json
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from a3tune.tune.settings import method_presets


validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]
LABELS = config["labels"]
SAM = LABELS["sam"]
CLIP = LABELS["clip"]
SHARDS = config["shards"]
MODEL = config.get("model", {})
MODEL_NAME = MODEL.get("name", "demo")
PROBE = config.get("probe", {})
TUNE = config.get("tune", {})
PRESET_OF_FORMAT = {"phantom": "phantom", "slake": "slake", "vqarad": "vqarad", "pathvqa": "pathvqa"}
ENV = "../../envs/a3tune.yaml"


wildcard_constraints:
    ds="|".join(re.escape(name) for name in DATASETS),
    shard=r"\d+",
    seed=r"\d+",
    method="|".join(method_presets()),


def dataset(wildcards):
    return DATASETS[wildcards.ds]


def dataset_root(wildcards):
    """The data root: the configured path, or the generator's output for the phantom set."""
    entry = dataset(wildcards)
    if entry["format"] == "phantom":
        return f"data/{wildcards.ds}/raw"
    return entry["root"]


def dataset_options(wildcards):
    return json.dumps(dataset(wildcards).get("options", {}), sort_keys=True)


def clip_model(wildcards):
    """The CLIP folder of the refine stage: the configured one, or the demo CLIP for phantom data."""
    if CLIP.get("model_dir"):
        return CLIP["model_dir"]
    if dataset(wildcards)["format"] != "phantom":
        raise WorkflowError(f"data set {wildcards.ds!r}: set labels.clip.model_dir to a local BiomedCLIP folder")
    return f"models/demo_clip/{wildcards.ds}"


def base_model(wildcards):
    """The base Med-LVLM folder: the configured checkpoint, or the demo's stand-in for phantom data."""
    if MODEL.get("path"):
        return MODEL["path"]
    if dataset(wildcards)["format"] != "phantom":
        raise WorkflowError(f"data set {wildcards.ds!r}: set model.path to a local LLaVA-family checkpoint")
    return f"models/demo_lvlm/{wildcards.ds}"


def tune_preset(wildcards):
    """The data set's training preset: configured, or named after its format (r2gen needs one)."""
    entry = dataset(wildcards)
    if "preset" in entry:
        return entry["preset"]
    if entry["format"] not in PRESET_OF_FORMAT:
        raise WorkflowError(f"data set {wildcards.ds!r}: set datasets.{wildcards.ds}.preset (iu_xray or mimic_cxr)")
    return PRESET_OF_FORMAT[entry["format"]]


def all_targets():
    targets = []
    for ds in DATASETS:
        targets += [f"data/{ds}/samples.parquet", f"data/{ds}/images.parquet"]
        targets += [f"labels/{ds}/labels.parquet", f"results/labels/{ds}/overlays"]
        targets += [f"probe/{MODEL_NAME}/{ds}/heads.parquet", f"results/probe/{MODEL_NAME}/{ds}/heads.png"]
        for method in TUNE.get("methods", []):
            targets += [f"runs/{method}/{ds}/seed-{seed}/train_log.parquet" for seed in TUNE.get("seeds", [0])]
    return targets
