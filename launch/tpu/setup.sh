#!/usr/bin/env bash
# Install clippy_jax on every worker of a TPU slice: fetch the code, create a
# Python venv and pip install requirements.txt and jax[tpu]. Safe to re-run: it
# replaces the code and updates the venv.
#
# Usage: launch/tpu/setup.sh --name=NAME --zone=ZONE (--repo-url=URL [--branch=BRANCH] | --source-dir=DIR)
#
#   --name=NAME          slice name
#   --zone=ZONE          its zone
#   --repo-url=URL       git clone URL on every worker (it must be reachable from there)
#   --branch=BRANCH      branch or tag to clone (default main)
#   --source-dir=DIR     ship this local checkout instead: the files git does not ignore
#                        (uncommitted changes included, .venv and the like left out) are
#                        packed into one tarball, copied to every worker with
#                        `gcloud compute tpus tpu-vm scp --worker=all` and unpacked
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --dry-run            print the commands instead of running them
#   --help               show this help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

VALUE_FLAGS=("${TPU_FLAGS[@]}" repo-url branch source-dir)
REPO_URL="" BRANCH=main SOURCE_DIR=""
parse_flags "$@"
require name zone branch
if [[ -n $REPO_URL && -n $SOURCE_DIR ]] || [[ -z $REPO_URL && -z $SOURCE_DIR ]]; then
  die "give exactly one of --repo-url and --source-dir"
fi

if [[ -n $REPO_URL ]]; then
  fetch="rm -rf ~/$REMOTE_REPO"
  fetch+=" && git clone --depth=1 --branch=$(shell_quote "$BRANCH") $(shell_quote "$REPO_URL") ~/$REMOTE_REPO"
else
  [[ -e $SOURCE_DIR/.git ]] || die "--source-dir $SOURCE_DIR is not a git checkout"
  tarball=${TMPDIR:-/tmp}/clippy_jax-$NAME.tgz
  src=$(shell_quote "$SOURCE_DIR")
  pack="git -C $src ls-files -z --cached --others --exclude-standard"
  pack+=" | tar -C $src --null --files-from=- --ignore-failed-read -czf $(shell_quote "$tarball")"
  run_pipeline "$pack"
  tpu_vm scp "$tarball" "$NAME:$REMOTE_REPO.tgz" --worker=all
  fetch="rm -rf ~/$REMOTE_REPO && mkdir ~/$REMOTE_REPO"
  fetch+=" && tar -xzf ~/$REMOTE_REPO.tgz -C ~/$REMOTE_REPO && rm ~/$REMOTE_REPO.tgz"
fi
install="python3 -m pip install --user uv"
install+=" && ~/.local/bin/uv venv --seed --allow-existing --python=$PYTHON_VERSION ~/$REMOTE_VENV"
install+=" && ~/$REMOTE_VENV/bin/pip install -r ~/$REMOTE_REPO/requirements.txt \"$JAX_TPU\""
tpu_vm ssh "$NAME" --worker=all --command "$fetch && $install"
