#!/usr/bin/env bash
# Train on one machine with all its GPUs (or those --gpus lists) in a single JAX
# process. Run it from the repository root with the project's venv active.
#
# Usage: launch/gpu/single_node.sh --config=FILE --workdir=DIR [--gpus=LIST] [--python=PY] [-- MAIN_ARGS...]
#
#   --config=FILE        config file, e.g. configs/demo.py
#   --workdir=DIR        checkpoints and summaries: a local directory or gs://...
#   --gpus=LIST          GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all)
#   --python=PY          Python interpreter (default python, the active venv's)
#   --dry-run            print the command, with its environment, instead of running it
#   --help               show this help
#   -- MAIN_ARGS...      passed on to clippy_jax.main, e.g. -- --config.train.steps=1000
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${GPU_FLAGS[@]}" gpus)
GPUS=""
parse_flags "$@"
require config workdir python

env_vars=("${GPU_ENV[@]}")
if [[ -n $GPUS ]]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
run env "${env_vars[@]}" "$PYTHON" -m clippy_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${PASSTHROUGH[@]}"
