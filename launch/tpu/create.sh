#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.
#
# Usage: launch/tpu/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options]
#
#   --name=NAME              slice name
#   --zone=ZONE              e.g. us-central2-b
#   --accelerator-type=TYPE  e.g. v4-8 (one VM) or v4-32 (a 4-worker pod slice)
#   --runtime-version=V      TPU VM software (default tpu-ubuntu2204-base; v5e takes
#                            v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   --spot                   a Spot slice: cheaper, may be preempted (see relaunch.sh)
#   --reserved               use the project's TPU reservation
#   --project=PROJECT        Google Cloud project (default: gcloud's configured one)
#   --dry-run                print the gcloud command instead of running it
#   --help                   show this help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" accelerator-type runtime-version)
SWITCH_FLAGS=(spot reserved)
ACCELERATOR_TYPE="" RUNTIME_VERSION=tpu-ubuntu2204-base SPOT=0 RESERVED=0
parse_flags "$@"
require name zone accelerator-type runtime-version
if ((SPOT && RESERVED)); then
  die "--spot and --reserved exclude each other"
fi

args=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if ((SPOT)); then
  args+=(--spot)
elif ((RESERVED)); then
  args+=(--reserved)
fi
tpu_vm create "$NAME" "${args[@]}"
