#!/usr/bin/env bash
# One accelerator check, under 8 minutes on one H100/H200 (lime_jax/studies/accelerator_check.py):
# the 1.2B-class 16-layer and the deep 64-layer setups, baseline and LIMe, bf16 with
# attention_impl=dot_product, synthetic tokens. Installs nothing: it needs a Python with jax (with
# its CUDA plugin) and this repository's dependencies already there ($PYTHON, default python3).
# Writes ${OUT:-accelerator_check.json}: tokens/s, MFU, LIMe/baseline step ratio, peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-accelerator_check.json}"
# Let XLA take the memory it needs; a preallocated 75% would hide the peak.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$PYTHON" -m lime_jax.studies.accelerator_check \
  --repo . --out "$OUT" --steps "${STEPS:-5}"
