# a3tune: the A3Tune pipeline. Table of contents only; each stage lives in workflow/rules/.
#   snakemake --profile profiles/local     # the embedded phantom demo on this machine
#   snakemake --profile profiles/slurm     # a real cluster (edit config.yaml first)
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weak_labels.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/score.smk"


rule all:
    input:
        all_targets(),
    default_target: True


onsuccess:
    if os.path.exists("results/summary.md"):
        print(
            "a3tune: results table in results/summary.md, figures in results/figures/; "
            "the audit page: snakemake --report report.html"
        )
