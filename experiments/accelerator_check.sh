#!/usr/bin/env bash
# One accelerator check, under 8 minutes on one H100/H200 (lime_jax/studies/accelerator_check.py):
# the 1.2B-class 16-layer and the deep 64-layer setups, baseline and LIMe, bf16 with
# attention_impl=dot_product, synthetic tokens. Installs nothing from the network: it needs a
# Python with jax (with its CUDA plugin) and this repository's dependencies ($PYTHON, default
# python3). Wheels in .whl/ (experiments/device_wheels.sh, for a machine that lacks some of them
# and has no network) are installed from there into a temporary folder first.
# Writes ${OUT:-accelerator_check.json} (a folder: accelerator_check.json in it) after every
# point: tokens/s, MFU, LIMe/baseline step ratio, peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-accelerator_check.json}"
SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="$(mktemp -d)"
  trap 'rm -rf "$SITE"' EXIT
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" .whl/*.whl
fi
# Let XLA take the memory it needs; a preallocated 75% would hide the peak.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$PYTHON" \
  -m lime_jax.studies.accelerator_check --repo . --out "$OUT" --steps "${STEPS:-5}"
