#!/usr/bin/env bash
# The GPU train-step table of BENCHMARKS.md (JAX vs PyTorch at the paper's geometry), in one call on the
# lent GPU machine, which has jax, torch, timm and transformers but no registry, ml_collections or open_clip.
#
#   bash benchmarks/gpu.sh wheels   # here, once: the missing pure-Python packages into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh          # there: device tool run(command="bash benchmarks/gpu.sh", carry=[".whl"])
#
# Writes the tables, the JSON rows and the machine's description under $OUT (default /tmp/gpu_bench), and
# stops starting new runs once BUDGET_S seconds (default 420) have passed, so the call ends within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ml-collections==1.1.0 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13)
if [[ ${1:-} == wheels ]]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "${WHEELS[@]}"
  exit 0
fi

out=${OUT:-/tmp/gpu_bench}
budget=${BUDGET_S:-420}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# The environment launch/gpu/* give training (the XLA options come with the train step: clippy_jax/platforms.py).
# shellcheck source=launch/gpu/common.sh
source launch/gpu/common.sh
export "${GPU_ENV[@]}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"; } > "$out/machine.txt" 2>&1

# "preset batch frameworks" per run (RUNS, one run per line, replaces them): the paper's geometry with
# torch.compile, then the same model without dropping at 448 and 224.
mapfile -t runs <<<"${RUNS:-paper 128 jax,torch,torch_compile
paper_448_full 128 jax,torch
paper_224 128 jax,torch}"
start=$SECONDS
for run in "${runs[@]}"; do
  read -r preset batch frameworks <<<"$run"
  if (( SECONDS - start > budget )); then
    echo "skipped $preset: ${budget}s budget spent" | tee -a "$out/train_step.md"
    continue
  fi
  timeout $((budget + 60 - (SECONDS - start))) python3 benchmarks/train_step.py --preset="$preset" \
    --batch_size="$batch" --frameworks="$frameworks" --warmup=3 --steps=10 --json="$out/$preset.json" \
    2>&1 | tee -a "$out/train_step.md" || echo "$preset failed or timed out" | tee -a "$out/train_step.md"
done
echo "total ${SECONDS}s" | tee -a "$out/train_step.md"
