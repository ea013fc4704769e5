#!/usr/bin/env bash
# Train across several Cloud TPU slices (Multislice): request them as one queued resource,
# wait until it is ACTIVE, copy the code and install on every worker of every slice, and
# start `python -m glm_jax.train` everywhere at once.
#
#   launch/multislice.sh --name NAME --zone ZONE --accelerator-type v5p-128 --num-slices 2 \
#       --workdir gs://BUCKET/runs/NAME [options] [-- key=value ...]
#
# The TPU runtime sets the MEGASCALE_* variables (coordinator, slice count, slice id) on
# every worker; jax.distributed.initialize() reads them, and the slices talk over the
# data-center network (DCN). The mesh's data axis spans slices, and pipe spans
# mesh.dcn_pipe of them; keep mesh.model within one slice, e.g. mesh.data=-1 mesh.model=8,
# or mesh.pipe=4 mesh.dcn_pipe=4 mesh.model=8 on four slices; see launch/README.md.
#
# Options:
#   --name NAME               queued resource name; the slices are NAME-0 ... NAME-(N-1) (required)
#   --zone ZONE               zone (required)
#   --accelerator-type TYPE   slice type, e.g. v5p-128, v5litepod-256 (required)
#   --num-slices N            number of slices, at least 2 (required)
#   --version VERSION         TPU software version (default tpu-ubuntu2204-base)
#   --project PROJECT         gcloud project (default: gcloud's configured one)
#   --spot                    Spot capacity (preemptible; rerun this script to resume)
#   --config PATH             config YAML, relative to the repo
#   --workdir gs://...        checkpoints + config.yaml; a rerun resumes from it
#   --git-url URL [--git-ref REF]  clone this on the workers instead of copying the checkout
#   --env KEY=VALUE           extra environment for the training processes (repeatable)
#   --skip-create             the queued resource exists and is ACTIVE
#   --skip-setup              code and packages are in place: only start training
#   --detach                  start training under nohup (log: ~/glm_jax_train.log on each worker)
#   --dry-run                 print the commands instead of running them
#   -- key=value ...          config overrides passed to glm_jax.train
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

NAME= ZONE= ACCEL= SLICES= VERSION=tpu-ubuntu2204-base PROJECT= SPOT=0 CONFIG= WORKDIR=
GIT_URL= GIT_REF= SKIP_CREATE=0 SKIP_SETUP=0 DETACH=0 ENV_VARS=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --num-slices) need_value "$@"; SLICES=$2; shift 2 ;;
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
[[ $SLICES =~ ^[0-9]+$ && $SLICES -ge 2 ]] || die "--num-slices must be 2 or more (one slice: launch/tpu_vm.sh)"
GCLOUD_ARGS=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then GCLOUD_ARGS+=(--project "$PROJECT"); fi
NODES=()
for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done

if [[ $SKIP_CREATE == 0 ]]; then
  [[ -n $ACCEL ]] || die "--accelerator-type is required"
  create=(gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_ARGS[@]}" --accelerator-type "$ACCEL"
          --runtime-version "$VERSION" --node-count "$SLICES" --node-prefix "$NAME")
  if [[ $SPOT == 1 ]]; then create+=(--spot); fi
  state=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_ARGS[@]}" --format 'value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    note "creates the queued resource unless '${state[*]:0:6}' finds it"
    run "${create[@]}"
    note "then polls until the state is ACTIVE:"
    run "${state[@]}"
  else
    if ! "${state[@]}" >/dev/null 2>&1; then run "${create[@]}"; fi
    while true; do
      s=$("${state[@]}")
      echo "launch: queued resource $NAME is $s" >&2
      case $s in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $NAME is $s; delete it and rerun" ;;
      esac
      sleep 30
    done
  fi
fi

if [[ $SKIP_SETUP == 0 ]]; then
  for node in "${NODES[@]}"; do
    copy_code "$node"
    setup_workers "$node"
  done
fi

check_workdir "$WORKDIR"
note "all ${SLICES} slices start together; glm_jax.parallel.distributed.initialize() joins them over DCN"
command=$(remote_train "$(train_command "$REMOTE_PYTHON" "$CONFIG" "$WORKDIR" "${OVERRIDES[@]}")")
pids=()
for node in "${NODES[@]}"; do
  if [[ $DRY_RUN == 1 ]]; then
    tpu_ssh "$node" "$command"
  else
    tpu_ssh "$node" "$command" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
