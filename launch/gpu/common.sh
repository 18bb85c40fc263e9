# shellcheck shell=bash disable=SC2034  # the scripts that source this read its variables
# Helpers shared by the GPU scripts (sourced, never run): their common flags,
# the environment every training process gets, and the training command.

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

GPU_FLAGS=(config workdir python)
CONFIG="" WORKDIR="" PYTHON=python

# Let JAX preallocate 90% of each GPU (its default is 75%); a value already in
# the environment wins.
# XLA flags of JAX's GPU performance guide (docs.jax.dev/en/latest/gpu_performance_tips.html): the
# latency-hiding scheduler overlaps the gradient all-reduces (and FSDP's all-gathers / reduce-scatters)
# with the backward pass, on the highest-priority stream, in groups of up to 128 MiB rather than one
# collective per tensor. Flags already in XLA_FLAGS come after these and win.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
)
GPU_ENV=(
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  "XLA_FLAGS=${GPU_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
)

