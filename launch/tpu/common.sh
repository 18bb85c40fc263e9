# shellcheck shell=bash disable=SC2034  # the scripts that source this read its variables
# Helpers shared by the Cloud TPU scripts (sourced, never run): the flags that
# name a slice, where setup.sh puts things on each worker, and `tpu_vm`.

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# Every TPU script takes these; --project defaults to gcloud's configured project.
TPU_FLAGS=(name zone project)
NAME="" ZONE="" PROJECT=""

# Layout on every worker, relative to the login user's home directory.
REMOTE_REPO=clippy_jax            # the code
REMOTE_VENV=clippy_jax_venv       # its Python environment
REMOTE_LOG=clippy_jax_train.log   # train.sh's output
# JAX 0.10 needs Python 3.11+, newer than the TPU VM images' python3 (3.10):
# setup.sh has uv provide it. Keep the jax pin in step with requirements.txt.
PYTHON_VERSION=3.11
JAX_TPU='jax[tpu]==0.10.2'

# tpu_vm SUBCOMMAND ARG...: gcloud compute tpus tpu-vm SUBCOMMAND ARG... --zone=ZONE [--project=PROJECT]
tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}
