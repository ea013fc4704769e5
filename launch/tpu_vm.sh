#!/usr/bin/env bash
# Train on one Cloud TPU VM slice: create (or reuse) it, copy the code, install, and start
# `python -m glm_jax.train` on every worker at once.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type v5p-32 \
#       --workdir gs://BUCKET/runs/NAME [options] [-- key=value ...]
#
# Options:
#   --name NAME               TPU VM name (required)
#   --zone ZONE               zone (required)
#   --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16 (required unless the VM exists)
#   --version VERSION         TPU software version (default tpu-ubuntu2204-base;
#                             v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#   --project PROJECT         gcloud project (default: gcloud's configured one)
#   --spot                    create a Spot VM (preemptible; rerun this script to resume)
#   --config PATH             config YAML, relative to the repo (default configs/glm-tiny.yaml)
#   --workdir gs://...        checkpoints + config.yaml; a rerun resumes from it
#   --git-url URL [--git-ref REF]  clone this on the workers instead of copying the checkout
#   --env KEY=VALUE           extra environment for the training processes (repeatable)
#   --skip-create             the VM exists: do not describe/create it
#   --skip-setup              code and packages are in place: only start training
#   --detach                  start training under nohup (log: ~/glm_jax_train.log on each worker)
#   --dry-run                 print the commands instead of running them
#   -- key=value ...          config overrides passed to glm_jax.train
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

NAME= ZONE= ACCEL= VERSION=tpu-ubuntu2204-base PROJECT= SPOT=0 CONFIG= WORKDIR=
GIT_URL= GIT_REF= SKIP_CREATE=0 SKIP_SETUP=0 DETACH=0 ENV_VARS=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --git-url) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --git-ref) need_value "$@"; GIT_REF=$2; shift 2 ;;
    --env) need_value "$@"; [[ $2 == *=* ]] || die "--env wants KEY=VALUE, got $2"; ENV_VARS+=("$2"); shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "launch: unknown argument $1" >&2; usage 2 ;;
  esac
done
[[ -n $NAME && -n $ZONE ]] || die "--name and --zone are required (see --help)"
GCLOUD_ARGS=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then GCLOUD_ARGS+=(--project "$PROJECT"); fi

create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_ARGS[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
if [[ $SPOT == 1 ]]; then create+=(--spot); fi
if [[ $SKIP_CREATE == 0 ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    note "creates the VM unless 'gcloud compute tpus tpu-vm describe $NAME' finds it"
    [[ -n $ACCEL ]] || die "--accelerator-type is required to create $NAME"
    run "${create[@]}"
  elif gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_ARGS[@]}" >/dev/null 2>&1; then
    note "reusing TPU VM $NAME"
  else
    [[ -n $ACCEL ]] || die "--accelerator-type is required to create $NAME"
    run "${create[@]}"
  fi
fi

if [[ $SKIP_SETUP == 0 ]]; then
  copy_code "$NAME"
  setup_workers "$NAME"
fi

check_workdir "$WORKDIR"
note "every worker runs the same command; glm_jax.parallel.distributed.initialize() joins them"
tpu_ssh "$NAME" "$(remote_train "$(train_command "$REMOTE_PYTHON" "$CONFIG" "$WORKDIR" "${OVERRIDES[@]}")")"
