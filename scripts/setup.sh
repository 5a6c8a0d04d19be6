#!/usr/bin/env bash
# Create the virtual environment (default .venv) with the runtime and the test/bench dependencies.
# torch/torchvision/transformers are only the reference for tests and benchmarks, never imported at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q -e '.[test]'
echo "environment ready: $venv"
