#!/usr/bin/env bash
# Stream the training log of one worker (worker 0 by default) until Ctrl-C.
#
# Usage: launch/tpu/logs.sh --name=NAME --zone=ZONE [--worker=N] [--project=PROJECT] [--dry-run]
#
#   --name=NAME          slice name
#   --zone=ZONE          its zone
#   --worker=N           which worker's log (default 0, the one that writes summaries)
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command instead of running it
#   --help               show this help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" worker)
WORKER=0
parse_flags "$@"
require name zone worker

tpu_vm ssh "$NAME" --worker="$WORKER" --command "tail -n 100 -f ~/$REMOTE_LOG"
