#!/usr/bin/env bash
# Start training on every worker of a TPU slice, in the background: each worker
# runs `python -m clippy_jax.main` under nohup and appends its output to
# ~/clippy_jax_train.log (follow it with logs.sh). The workers find each other
# by themselves; a run resumes from the last checkpoint in its workdir.
#
# Usage: launch/tpu/train.sh --name=NAME --zone=ZONE --config=FILE --workdir=gs://BUCKET/DIR [-- MAIN_ARGS...]
#
#   --name=NAME          slice name
#   --zone=ZONE          its zone
#   --config=FILE        config file, relative to the repository root (e.g. configs/demo.py)
#   --workdir=gs://...   checkpoints and summaries; must be on GCS, every worker writes there
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the gcloud command instead of running it
#   --help               show this help
#   -- MAIN_ARGS...      passed on to clippy_jax.main, e.g. -- --config.train.steps=1000
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" config workdir)
CONFIG="" WORKDIR=""
parse_flags "$@"
require name zone config workdir
[[ $WORKDIR == gs://?* ]] || die "--workdir must be a gs:// path (every worker writes checkpoints there), got '$WORKDIR'"

main_args=$(quote_cmd -m clippy_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${PASSTHROUGH[@]}")
tpu_vm ssh "$NAME" --worker=all \
  --command "cd ~/$REMOTE_REPO && nohup ~/$REMOTE_VENV/bin/python $main_args >> ~/$REMOTE_LOG 2>&1 < /dev/null &"
