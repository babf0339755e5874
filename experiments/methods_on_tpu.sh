#!/usr/bin/env bash
# Every method of one setup on a TPU slice, by the TPU compiler from any machine (libtpu: the
# `.[tpu]` extra): one `lime-jax plan --topology` per configs/<SETUP>_*.yaml, then a table of
# each config over <SETUP>_none (lime_jax/studies/plan_table.py). Arguments are overrides for every
# config (e.g. model.attention_query_blocks=1). A 1.2B config compiles in 1.5-5 min on 2 cores.
#   SETUP=paper_1p2b TOPOLOGY=v5p:2x2x1 COST=scaled OUT=runs/methods_on_tpu \
#     bash experiments/methods_on_tpu.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP="${SETUP:-paper_1p2b}"
TOPOLOGY="${TOPOLOGY:-v5p:2x2x1}"
COST="${COST:-scaled}"
OUT="${OUT:-runs/methods_on_tpu/$SETUP}"
LIME_JAX="${LIME_JAX:-lime-jax}"
mkdir -p "$OUT"
for config in configs/"$SETUP"_*.yaml; do
  name="$(basename "$config" .yaml)"
  name="${name#"$SETUP"_}"
  echo "$name" >&2
  rm -f "$OUT/$name.json"  # a config that fails now must not keep an older run's row
  # A config that fails (out of memory on the slice, say) is logged and the others still run.
  JAX_PLATFORMS=cpu $LIME_JAX plan --topology "$TOPOLOGY" --config "$config" --cost "$COST" \
    --json "$OUT/$name.json" mesh.data=1 mesh.fsdp=-1 "$@" > "$OUT/$name.log" 2>&1 \
    || echo "$name failed: see $OUT/$name.log" >&2
done
"${PYTHON:-python3}" -m lime_jax.studies.plan_table "$OUT"
