#!/usr/bin/env bash
# The clean-install check: build a wheel of this tree, install it (not editable) into a fresh virtual
# environment outside the source tree, and from another directory run `molmo2-jax plan` on the 8B preset and
# `molmo2-jax build-synthetic` on a tiny set. The fresh environment reads the dependencies from an existing one
# (default .venv) through a .pth line, so nothing is downloaded or reinstalled.
#   bash scripts/check_install.sh [ENV]
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(realpath "${1:-.venv}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }

mkdir "$work/src" && cp -r pyproject.toml README.md molmo2_jax "$work/src"  # a build writes beside its sources
"$base/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
"$base/bin/python" -m venv --without-pip "$work/env"
# the dependencies: ENV's site-packages as a plain path (its .pth files, e.g. an editable molmo2_jax, stay unread)
purelib "$base" > "$(purelib "$work/env")/dependencies.pth"
"$base/bin/pip" --python "$work/env/bin/python" install -q --no-deps --no-index "$work"/dist/molmo2_jax-*.whl

cd "$work"
env/bin/python -c 'import molmo2_jax, sys; assert molmo2_jax.__file__.startswith(sys.prefix), molmo2_jax.__file__'
env/bin/python -c 'from molmo2_jax.training.config import load_train_config; load_train_config("molmo2-8b-sft")'
# plan compiles the step in 1-2 minutes; the tests' persistent compilation cache makes a rerun take seconds
JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/molmo2-jax/jax-cache}" \
    env/bin/molmo2-jax plan --model molmo2-8b --mesh fsdp=8 --batch 8 --seq 1024 text.num_layers=2
env/bin/molmo2-jax build-synthetic --out synthetic --num-train 12 --num-eval 4 --image-size 224 --crop-size 224 \
    --vocab-size 400
echo "clean install: ok"
