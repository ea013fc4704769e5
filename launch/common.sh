# Shared helpers for the launch scripts (sourced, not run).
#
# run CMD...     runs CMD, or with DRY_RUN=1 prints it (shell-quoted) instead
# quote ARGS...  the arguments as one shell-quoted string (for remote --command strings)
# die MSG        prints "launch: MSG" to stderr and exits 2

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "launch: $*" >&2
  exit 2
}

quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# note MSG: a comment line in the dry-run listing (and on stderr when running for real).
note() {
  if [[ $DRY_RUN == 1 ]]; then echo "# $*"; else echo "# $*" >&2; fi
}

# need_value FLAG VALUE: fail unless a flag that takes a value got one.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

# repo_root: the checkout these scripts belong to.
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# jax_version: the jax pin from requirements.txt (jax[tpu] must match it).
jax_version() {
  sed -n 's/^jax==//p' "$(repo_root)/requirements.txt"
}

# train_command PYTHON CONFIG WORKDIR OVERRIDE...: the training command line, quoted
# (PYTHON is kept as written, so that a remote ~ still expands).
train_command() {
  local python=$1 config=$2 workdir=$3
  shift 3
  local cmd=(-m glm_jax.train)
  if [[ -n $config ]]; then cmd+=(--config "$config"); fi
  if [[ -n $workdir ]]; then cmd+=("workdir=$workdir"); fi
  echo "$python $(quote "${cmd[@]}" "$@")"
}

# --- Cloud TPU VMs (tpu_vm.sh, multislice.sh) -------------------------------------
# Remote layout on every worker: the code in ~/glm_jax, a Python 3.11 venv in ~/glm_jax_venv.

REMOTE_DIR='~/glm_jax'
REMOTE_PYTHON='~/glm_jax_venv/bin/python'

# pack_repo ROOT TARBALL: the checkout's files (tracked and untracked, minus .gitignore'd).
pack_repo() {
  local root=$1 out=$2
  if [[ $DRY_RUN == 1 ]]; then
    echo "git -C $(quote "$root") ls-files -co --exclude-standard | tar -C $(quote "$root") -czf $(quote "$out") -T -"
    return
  fi
  echo "+ packing $root into $out" >&2
  git -C "$root" ls-files -z -co --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $root/$f ]] && printf '%s\0' "$f"; done |
    tar -C "$root" --null -T - -czf "$out"
}

# tpu_ssh NODE COMMAND: run COMMAND on every worker of NODE at once.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$1" "${GCLOUD_ARGS[@]}" --worker=all --command "$2"
}

# copy_code NODE: the local checkout (or GIT_URL at GIT_REF) into ~/glm_jax on every worker.
copy_code() {
  local node=$1
  if [[ -n ${GIT_URL:-} ]]; then
    local url ref
    url=$(quote "$GIT_URL")
    ref=$(quote "${GIT_REF:-HEAD}")
    tpu_ssh "$node" "set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet origin; else git clone --quiet $url $REMOTE_DIR; fi; git -C $REMOTE_DIR checkout --quiet --detach $ref"
  else
    local tarball=${TMPDIR:-/tmp}/glm_jax-code-$$.tgz
    if [[ -z ${CODE_PACKED:-} ]]; then  # once per launch, however many slices
      pack_repo "$(repo_root)" "$tarball"
      CODE_PACKED=1
      if [[ $DRY_RUN != 1 ]]; then trap "rm -f $(quote "$tarball")" EXIT; fi
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$node:glm_jax.tgz" "${GCLOUD_ARGS[@]}" --worker=all
    tpu_ssh "$node" "set -e; mkdir -p $REMOTE_DIR; tar -xzf ~/glm_jax.tgz -C $REMOTE_DIR"
  fi
}

# setup_workers NODE: Python 3.11 (via uv) and requirements.txt with jax[tpu] on every worker.
setup_workers() {
  local jax_tpu
  jax_tpu=$(quote "jax[tpu]==$(jax_version)")
  tpu_ssh "$1" "set -e; cd $REMOTE_DIR; export PATH=\$HOME/.local/bin:\$PATH; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; [ -x $REMOTE_PYTHON ] || uv venv --python 3.11 ~/glm_jax_venv; uv pip install --python $REMOTE_PYTHON -r requirements.txt $jax_tpu"
}

# remote_train TRAIN_CMD: the command string that starts training in ~/glm_jax on a worker,
# with GLM_JAX_DISTRIBUTED=1 and the ENV_VARS array exported; detached (nohup, log in
# ~/glm_jax_train.log) when DETACH=1.
remote_train() {
  local envs
  envs=$(quote GLM_JAX_DISTRIBUTED=1 "${ENV_VARS[@]}")
  if [[ ${DETACH:-0} == 1 ]]; then
    echo "cd $REMOTE_DIR && nohup env $envs $1 > ~/glm_jax_train.log 2>&1 < /dev/null &"
  else
    echo "cd $REMOTE_DIR && env $envs $1"
  fi
}

# check_workdir WORKDIR: every host must see the same checkpoint directory.
check_workdir() {
  if [[ -z $1 ]]; then
    note "no --workdir: no checkpoints, and a preempted run starts over"
  elif [[ $1 != gs://* ]]; then
    note "warning: --workdir $1 is not on gs://; every host must see the same directory"
  fi
}
