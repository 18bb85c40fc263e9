#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.
#
# Usage: launch/tpu/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options] [-- CONFIG_OVERRIDES...]
#
# With --config it first checks that the config's train step fits the slice, by
# compiling it with the TPU compiler on this machine (python -m clippy_jax.plan
# --tpu_type=TYPE; needs `pip install ".[aot]"` here, and takes minutes for the
# paper's model): a config that does not fit is refused, before any VM exists,
# with the plan's changes that do fit. Arguments after `--` are the run's config
# overrides (the same as train.sh's), applied to the check.
#
#   --name=NAME              slice name
#   --zone=ZONE              e.g. us-central2-b
#   --accelerator-type=TYPE  e.g. v4-8 (one VM) or v4-32 (a 4-worker pod slice)
#   --runtime-version=V      TPU VM software (default tpu-ubuntu2204-base; v5e takes
#                            v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   --spot                   a Spot slice: cheaper, may be preempted (see relaunch.sh)
#   --reserved               use the project's TPU reservation
#   --project=PROJECT        Google Cloud project (default: gcloud's configured one)
#   --config=FILE            check that this config fits the slice before creating it
#   --python=PATH            the Python with clippy_jax and its [aot] extra (default: python)
#   --dry-run                print the gcloud command instead of running it
#   --help                   show this help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" accelerator-type runtime-version config python)
SWITCH_FLAGS=(spot reserved)
ACCELERATOR_TYPE="" RUNTIME_VERSION=tpu-ubuntu2204-base SPOT=0 RESERVED=0 CONFIG="" PYTHON=python
parse_flags "$@"
require name zone accelerator-type runtime-version
if ((SPOT && RESERVED)); then
  die "--spot and --reserved exclude each other"
fi
if ((${#PASSTHROUGH[@]})) && [[ -z $CONFIG ]]; then
  die "config overrides after -- need --config (they are applied to its fit check)"
fi

if [[ -n $CONFIG ]]; then
  plan=("$PYTHON" -m clippy_jax.plan --config="$CONFIG" --tpu_type="$ACCELERATOR_TYPE" "${PASSTHROUGH[@]}")
  if ((DRY_RUN)); then
    quote_cmd "${plan[@]}"
  else
    echo "Checking that $CONFIG fits $ACCELERATOR_TYPE (compiling its train step for it)..." >&2
    status=0
    "${plan[@]}" || status=$?
    if ((status == 3)); then
      die "$CONFIG does not fit $ACCELERATOR_TYPE (the plan above): apply one of its changes that fit, or choose a larger slice; no VM was created"
    elif ((status != 0)); then
      die "the fit check of $CONFIG failed (exit $status, above); no VM was created"
    fi
  fi
fi

args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if ((SPOT)); then
  args+=(--spot)
elif ((RESERVED)); then
  args+=(--reserved)
fi
tpu_vm create "$NAME" "${args[@]}"
