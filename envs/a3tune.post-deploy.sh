#!/usr/bin/env bash
# Snakemake runs this inside the new conda environment, from the workflow's working directory
# (the checkout, unless --directory points elsewhere: then set A3TUNE_SRC to the checkout).
set -euo pipefail
python -m pip install --no-deps --editable "${A3TUNE_SRC:-.}"
