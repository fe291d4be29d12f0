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
SCORE = config.get("score", {})
SCORE_SHARDS = SCORE.get("shards", SHARDS)
# CheXbert label F1 of the reports (score.clinical.chexbert): its local weights are inputs of score_gather, so a
# missing checkpoint or BERT folder is named before any job runs.
CHEXBERT = (SCORE.get("clinical") or {}).get("chexbert") or {}
PRESET_OF_FORMAT = {"phantom": "phantom", "slake": "slake", "vqarad": "vqarad", "pathvqa": "pathvqa"}
ENV = "../../envs/a3tune.yaml"
CONVERTED_MODEL = f"models/converted/{MODEL_NAME}"

if MODEL.get("path") and MODEL.get("source"):
    raise WorkflowError("model: set either path (an HF Llava folder) or source (an original LLaVA-Med folder), not both")
if MODEL.get("source") and not MODEL.get("source_format"):
    raise WorkflowError("model.source is set: set model.source_format too (llava-med-v1.5 or llava-med-v1)")


wildcard_constraints:
    ds="|".join(re.escape(name) for name in DATASETS),
    shard=r"\d+",
    seed=r"\d+",
    method="|".join(method_presets()),
    run=r"base|[A-Za-z0-9_]+-seed\d+(\+[a-z]+)?",


def dataset(wildcards):
    return DATASETS[wildcards.ds]


def root_of(ds):
    """The data root: the configured path, or the generator's output for the phantom set."""
    entry = DATASETS[ds]
    if entry["format"] == "phantom":
        return f"data/{ds}/raw"
    return entry["root"]


def dataset_root(wildcards):
    return root_of(wildcards.ds)


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
    """The base Med-LVLM folder: the configured HF checkpoint, the conversion of an original one, or
    the demo's stand-in for phantom data."""
    if MODEL.get("path"):
        return MODEL["path"]
    if MODEL.get("source"):
        return CONVERTED_MODEL
    if dataset(wildcards)["format"] != "phantom":
        raise WorkflowError(
            f"data set {wildcards.ds!r}: set model.path to a local HF Llava checkpoint, or model.source and "
            "model.source_format to an original LLaVA-Med folder"
        )
    return f"models/demo_lvlm/{wildcards.ds}"


def tune_preset(wildcards):
    """The data set's training preset: configured, or named after its format (r2gen needs one)."""
    entry = dataset(wildcards)
    if "preset" in entry:
        return entry["preset"]
    if entry["format"] not in PRESET_OF_FORMAT:
        raise WorkflowError(f"data set {wildcards.ds!r}: set datasets.{wildcards.ds}.preset (iu_xray or mimic_cxr)")
    return PRESET_OF_FORMAT[entry["format"]]


def score_runs():
    """The scored runs: the base model, every tuned run, and the baselines on the plain-LoRA runs."""
    seeds = TUNE.get("seeds", [0])
    runs = ["base"] + [f"{method}-seed{seed}" for method in TUNE.get("methods", []) for seed in seeds]
    if "lora" in TUNE.get("methods", []):
        runs += [f"lora-seed{seed}+{baseline}" for baseline in SCORE.get("baselines", []) for seed in seeds]
    return runs


def run_adapter(wildcards):
    """The adapter folder a run is scored with (none for the base model)."""
    if wildcards.run == "base":
        return []
    method, rest = wildcards.run.split("-seed", 1)
    return f"runs/{method}/{wildcards.ds}/seed-{rest.split('+')[0]}/adapter"


def run_baseline(wildcards):
    return wildcards.run.split("+", 1)[1] if "+" in wildcards.run else ""


def model_spec(wildcards, input):
    """The base model's spec for a3tune.models.registry.lvlm_from_config: folder, dtype and device."""
    spec = {"path": input.model, "dtype": MODEL.get("dtype", "auto"), "device": MODEL.get("device", "cpu")}
    return json.dumps(spec, sort_keys=True)


def overlay_settings():
    """For each data set: the runs whose attention the report overlays (base + first seed of each method)."""
    seed = TUNE.get("seeds", [0])[0]
    runs = ["base"] + [f"{method}-seed{seed}" for method in TUNE.get("methods", [])]
    return [
        {
            "dataset": ds,
            "runs": [[run, f"results/{run}/{ds}/attention.parquet"] for run in runs],
            "samples": f"data/{ds}/samples.parquet",
            "images": f"data/{ds}/images.parquet",
            "root": root_of(ds),
            "grid": LABELS["grid"],
            "n": SCORE.get("overlays", 6),
        }
        for ds in DATASETS
    ]


def all_targets():
    targets = []
    for ds in DATASETS:
        targets += [f"data/{ds}/samples.parquet", f"data/{ds}/images.parquet"]
        targets += [f"labels/{ds}/labels.parquet", f"results/labels/{ds}/overlays"]
        targets += [f"probe/{MODEL_NAME}/{ds}/heads.parquet", f"results/probe/{MODEL_NAME}/{ds}/heads.png"]
        for method in TUNE.get("methods", []):
            targets += [f"runs/{method}/{ds}/seed-{seed}/train_log.parquet" for seed in TUNE.get("seeds", [0])]
        targets += [f"results/{run}/{ds}/metrics.json" for run in score_runs()]
    targets += ["results/summary.md", "results/figures"]
    return targets
