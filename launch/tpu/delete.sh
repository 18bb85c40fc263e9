#!/usr/bin/env bash
# Delete a Cloud TPU VM or pod slice (without asking for confirmation).
#
# Usage: launch/tpu/delete.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]
#
#   --name=NAME          slice name
#   --zone=ZONE          its zone
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command instead of running it
#   --help               show this help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}")
parse_flags "$@"
require name zone

tpu_vm delete "$NAME" --quiet
