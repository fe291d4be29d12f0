#!/usr/bin/env bash
# The real-size A³Tune step check on one CUDA GPU (7B shapes, bf16, 576 image tokens); prints one
# markdown table. `--cpu`: the same table at tiny sizes on the CPU (the test suite runs this).
# Other arguments go to bench/gpu_check.py (--layers, --batch, --tokens, --steps); see its docstring.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$repo/.venv/bin/python"
[[ -x "$python" ]] || python=python
exec "$python" "$repo/bench/gpu_check.py" "$@"
