#!/usr/bin/env bash
# A lent GPU's measurements in one prepared call (the device time is short): jaxconv bench against the PyTorch
# twin on CUDA, float32 and bfloat16, MFU against the table's peak; steps per dispatch (one jitted step vs
# lax.scan); cold and warm time to first step of `jaxconv train`. Each part has its own time limit, so one part
# that overruns or fails leaves the others' numbers; JSON lines are written row by row.
#
#   OUT=DIR bash benchmarks/gpu_session.sh [PART ...]    # from the repository root, on the GPU host
#
# PARTs (default: the first session's set): environment bench_float32 bench_bfloat16 scan_mnist1d scan_mnist_lenet5
# replicas_vmap_vs_unroll time_to_first_step flops_traced bench_resnet50 bench_bf16_128 scan_fine train_default
#
# Expects the image's own jax/flax/optax/torch; .devcarry/ (not committed) may carry wheels of missing
# pure-Python packages (tensorboardX), the generated MNIST-1D (data/mnist1d.npz) and MNIST's IDX files (mnist/).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$PWD
# jaxconv.configs maps to configs/ only in an installed package: install it (no network, no dependencies) with
# any carried wheels, and run from outside the checkout so the installed copy is the one imported
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site \
  "$REPO" $(compgen -G ".devcarry/*.whl") || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export JAXCONV_DATA=$REPO/.devcarry/data
# JAX takes GPU memory as it needs it, not 75 % of the card at start, so the PyTorch twin in the same process
# gets what it needs too; peak_bytes_in_use (the bench's memory column) is measured either way
export XLA_PYTHON_CLIENT_PREALLOCATE=false
MNIST=$REPO/.devcarry/mnist
mkdir -p /tmp/gpu_run && cd /tmp/gpu_run || exit 1

part() {  # part NAME SECONDS COMMAND...: the command's output into the log, its exit status and time after it
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  start=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" 2>&1 | grep -v -E "^(WARNING|W[0-9]{4}|I[0-9]{4})" 
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
}

run_part() {
  case $1 in
  environment) part environment 30 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,memory.used --format=csv;
    python3 -c "import jax, jaxlib, flax, optax, torch; print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__); print(jax.devices())"' ;;
  bench_float32) part bench_float32 ${BENCH_F32_S:-220} python3 -m jaxconv bench --model all --mode train,inference \
    --batch-size 128 --compare torch --steps 20 --json "$OUT/bench_float32.jsonl" ;;
  bench_bfloat16) part bench_bfloat16 ${BENCH_BF16_S:-90} python3 -m jaxconv bench --model cifar_resnet18,resnet50 \
    --mode train --batch-size 256 --dtype float32,bfloat16 --compare torch --steps 20 --json "$OUT/bench_bfloat16.jsonl" ;;
  bench_resnet50) part bench_resnet50 ${BENCH_R50_S:-110} python3 -m jaxconv bench --model resnet50 --mode train,inference \
    --batch-size 256 --dtype float32,bfloat16 --compare torch --steps 10 --json "$OUT/bench_resnet50.jsonl" ;;
  bench_bf16_128) part bench_bf16_128 ${BENCH_BF16_128_S:-90} python3 -m jaxconv bench \
    --model cifar_vgg,resnet20,cifar_resnet18,resnet18 --mode train,inference --batch-size 128 --dtype bfloat16 \
    --compare torch --steps 10 --json "$OUT/bench_bf16_128.jsonl" ;;
  scan_mnist1d) part scan_mnist1d ${SCAN_S:-35} python3 $REPO/benchmarks/scan_vs_step.py --dataset mnist1d --batch 100 \
    --per-dispatch ${PER_DISPATCH:-1,8,all} ;;
  scan_mnist_lenet5) part scan_mnist_lenet5 ${SCAN_S:-35} python3 $REPO/benchmarks/scan_vs_step.py --dataset mnist \
    --model lenet5 --data-dir "$MNIST" --batch 128 --per-dispatch ${PER_DISPATCH:-1,8,all} ;;
  scan_fine) PER_DISPATCH=1,4,8,16,32,all run_part scan_mnist1d; PER_DISPATCH=1,4,8,16,32,all run_part scan_mnist_lenet5 ;;
  replicas_vmap_vs_unroll) part replicas_vmap_vs_unroll ${REPLICAS_S:-35} python3 \
    $REPO/benchmarks/replicas_vmap_vs_unroll.py --seeds 8 --rounds 5 ;;
  time_to_first_step) part time_to_first_step ${TTFS_S:-60} python3 $REPO/benchmarks/time_to_first_step.py ;;
  flops_traced) part flops_traced ${FLOPS_S:-60} python3 $REPO/benchmarks/flops_agreement.py ;;
  train_default) part train_default ${TRAIN_S:-60} bash -c "python3 -m jaxconv train --epochs 3 --out /tmp/gpu_run/auto \
    && python3 -m jaxconv train --epochs 3 --steps-per-dispatch 1 --out /tmp/gpu_run/one \
    && tail -n 1 /tmp/gpu_run/auto/metrics.jsonl /tmp/gpu_run/one/metrics.jsonl" ;;
  *) echo "unknown part $1"; return 2 ;;
  esac
}

PARTS=${*:-environment bench_float32 bench_bfloat16 scan_mnist1d scan_mnist_lenet5 replicas_vmap_vs_unroll time_to_first_step}
for p in $PARTS; do run_part "$p"; done 2>&1 | tee -a "$OUT/gpu_session.log"
