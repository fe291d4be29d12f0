# Config validation and input functions shared by every stage. No stage logic lives here.
import json
import re

from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]
ENV = "../../envs/a3tune.yaml"


wildcard_constraints:
    ds="|".join(re.escape(name) for name in DATASETS),


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


def all_targets():
    targets = []
    for ds in DATASETS:
        targets += [f"data/{ds}/samples.parquet", f"data/{ds}/images.parquet"]
    return targets
