#!/usr/bin/env bash
# Wheels of what experiments/accelerator_check.sh needs beyond a GPU machine's usual image
# (Python 3.12, x86-64, with jax, flax, optax, orbax-checkpoint, chex, numpy, pyyaml, tqdm,
# matplotlib, tokenizers, pyarrow and safetensors, but no grain), for a machine without network:
# run this where pip reaches the registry, copy the repository with its .whl/ folder there, and
# accelerator_check.sh installs them from .whl/. Versions: those this repository's tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
ls .whl
