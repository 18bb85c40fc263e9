# shellcheck shell=bash disable=SC2034  # the scripts that source this read its variables
# Helpers shared by the GPU scripts (sourced, never run): their common flags,
# the environment every training process gets, and the training command.

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

GPU_FLAGS=(config workdir python)
CONFIG="" WORKDIR="" PYTHON=python

# Let JAX preallocate 90% of each GPU (its default is 75%); a value already in
# the environment wins. The XLA options of JAX's GPU performance guide come with
# the train step itself (clippy_jax/platforms.py, COMPILER_OPTIONS); flags in
# XLA_FLAGS, inherited, win over them.
GPU_ENV=(
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
)

