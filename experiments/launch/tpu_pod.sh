#!/usr/bin/env bash
# Train lime_jax on a Cloud TPU VM pod slice: every worker runs the same `lime-jax train`, and
# jax.distributed finds the other workers itself (`--distributed`).
#
#   experiments/launch/tpu_pod.sh create            # the slice, then the repo + venv on every worker
#   experiments/launch/tpu_pod.sh run CONFIG [section.key=value ...]
#   experiments/launch/tpu_pod.sh logs              # follow worker 0's log (the only one that logs)
#   experiments/launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v5litepod-16, v4-32,
# v5p-32), RUNTIME_VERSION, PROJECT (default: gcloud's), REPO_URL, CKPT_DIR (a gs:// bucket
# that every worker can write: checkpoints must be on a path all hosts share).
# Not run by the lime_jax authors: no TPU was available when this was written.
set -euo pipefail

TPU_NAME="${TPU_NAME:-lime-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-https://github.com/your-org/lime_jax.git}"
CKPT_DIR="${CKPT_DIR:-}"
LOG="lime_jax_train.log"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project "${PROJECT}")
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" \
      --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}"
    on_all_workers "set -e; [ -d lime_jax ] || git clone ${REPO_URL} lime_jax; cd lime_jax; \
      python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
      .venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    shift
    config="${1:?usage: tpu_pod.sh run CONFIG [section.key=value ...]}"
    shift
    extra=("$@")
    if [[ -n "${CKPT_DIR}" ]]; then
      extra+=("run.checkpoint_dir=${CKPT_DIR}")
    fi
    # printf %q keeps every override one word through the remote shell.
    quoted=""
    if ((${#extra[@]})); then
      quoted="$(printf ' %q' "${extra[@]}")"
    fi
    on_all_workers "cd lime_jax && nohup .venv/bin/lime-jax train --distributed \
      --config ${config} mesh.fsdp=-1 run.progress=false${quoted} > ~/${LOG} 2>&1 &"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" \
      --worker=0 --command "tail -F ~/${LOG}"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone "${ZONE}" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
