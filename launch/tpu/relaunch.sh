#!/usr/bin/env bash
# Watch a (Spot) TPU slice and bring training back after a preemption: every
# --poll-seconds it reads the slice state; when that is PREEMPTED or TERMINATED
# it deletes the slice, creates it again, runs setup.sh and train.sh, and
# training resumes from the last checkpoint in the gs:// workdir. A failed
# recovery is retried at the next poll. Stops with an error after
# --max-restarts recoveries; otherwise runs until interrupted (Ctrl-C), so run
# it in tmux/screen or under nohup on a machine that stays up.
#
# Usage: launch/tpu/relaunch.sh CREATE_FLAGS SETUP_FLAGS TRAIN_FLAGS [--max-restarts=N] [--poll-seconds=S] [-- MAIN_ARGS...]
#
# It takes the flags of create.sh, setup.sh and train.sh (the same values used to
# start the run) and passes each on to its script; they are checked up front.
#   --max-restarts=N     recoveries before giving up (default 10)
#   --poll-seconds=S     seconds between state checks (default 120)
#   --dry-run            print the state check and the commands of one recovery
#   --help               show this help
set -euo pipefail
here=$(dirname "$0")
# shellcheck source=common.sh
source "$here/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" accelerator-type runtime-version repo-url branch source-dir config workdir
  max-restarts poll-seconds)
SWITCH_FLAGS=(spot reserved)
# shellcheck disable=SC2034  # only passed on, through add_flags
ACCELERATOR_TYPE="" RUNTIME_VERSION="" REPO_URL="" BRANCH="" SOURCE_DIR="" CONFIG="" WORKDIR="" SPOT=0 RESERVED=0
MAX_RESTARTS=10 POLL_SECONDS=120
parse_flags "$@"
require name zone
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number, got '$MAX_RESTARTS'"
[[ $POLL_SECONDS =~ ^[1-9][0-9]*$ ]] || die "--poll-seconds must be a positive whole number, got '$POLL_SECONDS'"

# add_flags ARRAY FLAG...: append --FLAG=VALUE (or --FLAG for a switch that is on) for each FLAG given.
add_flags() {
  local -n out=$1
  local flag var
  for flag in "${@:2}"; do
    var=$(flag_var "$flag")
    if contains "$flag" "${SWITCH_FLAGS[@]}"; then
      if ((${!var})); then out+=("--$flag"); fi
    elif [[ -n ${!var} ]]; then
      out+=("--$flag=${!var}")
    fi
  done
}
slice_args=()
add_flags slice_args name zone project
create_args=("${slice_args[@]}")
add_flags create_args accelerator-type runtime-version spot reserved
setup_args=("${slice_args[@]}")
add_flags setup_args repo-url branch source-dir
train_args=("${slice_args[@]}")
add_flags train_args config workdir
if ((${#PASSTHROUGH[@]})); then
  train_args+=(-- "${PASSTHROUGH[@]}")
fi

# recover STATE: delete the slice (unless STATE is empty: it is gone), create it, set it up, train.
recover() {
  if [[ -n $1 ]]; then
    "$here/delete.sh" "${slice_args[@]}" || return
  fi
  "$here/create.sh" "${create_args[@]}" &&
    "$here/setup.sh" "${setup_args[@]}" &&
    "$here/train.sh" "${train_args[@]}"
}

if ((DRY_RUN)); then
  tpu_vm describe "$NAME" --format='value(state)'
  echo "# when the state is PREEMPTED or TERMINATED:"
  recover PREEMPTED
  exit
fi

# Check every step's flags now rather than at the first preemption.
"$here/create.sh" --dry-run "${create_args[@]}" >/dev/null
"$here/setup.sh" --dry-run "${setup_args[@]}" >/dev/null
"$here/train.sh" --dry-run "${train_args[@]}" >/dev/null

log() { echo "[$(date '+%F %T')] $*"; }

restarts=0 recovering=0 last_state=""
while :; do
  state=$(tpu_vm describe "$NAME" --format='value(state)' 2>/dev/null || true)
  if [[ $state != "$last_state" ]]; then
    log "slice $NAME: ${state:-not found (or the state could not be read)}"
    last_state=$state
  fi
  if [[ $state == PREEMPTED || $state == TERMINATED ]] || ((recovering)); then
    ((restarts < MAX_RESTARTS)) || die "slice $NAME needs a restart but --max-restarts=$MAX_RESTARTS are used up"
    restarts=$((restarts + 1))
    log "recovery $restarts of $MAX_RESTARTS: recreating $NAME and restarting training"
    if recover "$state"; then
      recovering=0
      log "training restarted"
    else
      recovering=1
      log "recovery failed; trying again in $POLL_SECONDS s"
    fi
  fi
  sleep "$POLL_SECONDS"
done
