# shellcheck shell=bash disable=SC2034  # the scripts that source this read its variables
# Helpers shared by every script under launch/ (sourced, never run): flag
# parsing, --help, errors and the dry-run aware `run`.
#
# A script lists its flags, gives them defaults, then parses:
#   VALUE_FLAGS=(zone accelerator-type)  # --zone=Z or --zone Z sets $ZONE,
#   SWITCH_FLAGS=(spot)                  # --accelerator-type sets $ACCELERATOR_TYPE; --spot sets SPOT=1
#   ZONE="" ACCELERATOR_TYPE="" SPOT=0
#   parse_flags "$@"
# --help (prints the script's leading comment block) and --dry-run are built
# in; the arguments after `--` are kept in PASSTHROUGH.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$(basename "$0"): needs bash 4.4 or newer (on macOS: brew install bash)" >&2
  exit 2
fi

# DRY_RUN=1 in the environment works like --dry-run (sbatch scripts get it that way too);
# exported, so that scripts run by a script dry-run along with it.
case ${DRY_RUN:-0} in
  0) export DRY_RUN=0 ;;
  *) export DRY_RUN=1 ;;
esac
VALUE_FLAGS=()
SWITCH_FLAGS=()
PASSTHROUGH=()

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# usage: the comment block at the top of the script (shebang and #SBATCH lines skipped).
usage() {
  awk 'NR > 1 && !/^#/ { exit } /^#( |$)/ { sub(/^# ?/, ""); print }' "$0"
}

# shell_quote ARG: ARG as one shell word, bare when that is safe (the rule of Python's shlex.quote).
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_cmd ARG...: one line that a shell splits back into exactly ARG...
quote_cmd() {
  local arg words=()
  for arg; do
    words+=("$(shell_quote "$arg")")
  done
  echo "${words[*]}"
}

# run CMD...: print CMD under --dry-run, run it otherwise.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    "$@"
  fi
}

# run_pipeline STRING: the same for a shell pipeline (run with bash -o pipefail).
run_pipeline() {
  if ((DRY_RUN)); then
    echo "$1"
  else
    bash -o pipefail -c "$1"
  fi
}

# flag_var FLAG: the variable a flag sets (accelerator-type -> ACCELERATOR_TYPE).
flag_var() {
  local var=${1//-/_}
  echo "${var^^}"
}

contains() {
  local needle=$1 item
  shift
  for item; do
    [[ $item == "$needle" ]] && return 0
  done
  return 1
}

parse_flags() {
  local arg flag
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        PASSTHROUGH=("$@")
        return
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --*=*)
        flag=${arg%%=*}
        flag=${flag#--}
        contains "$flag" "${SWITCH_FLAGS[@]}" && die "flag --$flag takes no value"
        contains "$flag" "${VALUE_FLAGS[@]}" || die "unknown flag --$flag (see --help)"
        printf -v "$(flag_var "$flag")" '%s' "${arg#*=}"
        ;;
      --*)
        flag=${arg#--}
        if contains "$flag" "${SWITCH_FLAGS[@]}"; then
          printf -v "$(flag_var "$flag")" 1
        elif contains "$flag" "${VALUE_FLAGS[@]}"; then
          [[ $# -gt 0 && $1 != --* ]] || die "flag --$flag needs a value"
          printf -v "$(flag_var "$flag")" '%s' "$1"
          shift
        else
          die "unknown flag --$flag (see --help)"
        fi
        ;;
      *) die "unexpected argument '$arg' (flags look like --name=VALUE; see --help)" ;;
    esac
  done
}

# require FLAG...: stop unless every FLAG was given a non-empty value.
require() {
  local flag var
  for flag; do
    var=$(flag_var "$flag")
    [[ -n ${!var:-} ]] || die "missing required flag --$flag"
  done
}
