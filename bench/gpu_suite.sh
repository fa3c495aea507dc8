#!/usr/bin/env bash
# The engine's one GPU measurement: run it as a whole on a lent H100/H200 (no network, 15 device minutes in all,
# so the whole script is sized for ~9 minutes), then commit what it writes under bench/results/<device>/<date>/.
#
#   bash bench/gpu_suite.sh                 # everything, raw logs + JSON/markdown under $RESULTS
#   SUITE_BUDGET_S=300 bash bench/gpu_suite.sh   # a shorter budget: the later steps are skipped, and say so
#   RESULTS=/tmp/r bash bench/gpu_suite.sh  # where the results go (default bench/results/<device>/<date>)
#
# It uses the machine's own python3/torch/triton (the lent image has its own versions and no network; nothing is
# installed), builds the CUDA extension in place (csrc/, ~1 min for sm_90 alone), then runs, each under its own
# time limit so one hang cannot eat the lease:
#   1. the `gpu`-marked tests (model on CUDA vs float64, kernels' bf16 grids, decode grid, CUDA graphs)
#   2. softcap attention, head dim 256, 2B and 9B shapes (bench_attention --quick)
#   3. decode kernels vs their reference (bench_decode)
#   4. end-to-end training at florenz-0.4b and florenz-3.5b, padded eager emulation of the published code vs the
#      engine's configurations (bench/throughput.py --mode=train)
#   5. generation at florenz-3.5b, batch 1 and 64, cached + CUDA graph (bench/generate.py)
# Every step's stdout+stderr goes to its own log; a failed or timed-out step is recorded in summary.txt and the
# suite goes on. The exit status is the number of failed steps (0 = all ran).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-540}  # 9 minutes of wall time for the steps below
START=$(date +%s)
DEVICE_NAME=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
              2>/dev/null || echo unknown)
SLUG=$(echo "$DEVICE_NAME" | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g' | cut -c1-24)
RESULTS=${RESULTS:-bench/results/${SLUG:-unknown}/$(date -u +%Y-%m-%d)}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
failed=0

export PYTHONUNBUFFERED=1 FLORENZ_NO_AUTOTUNE=${FLORENZ_NO_AUTOTUNE:-1}  # first autotune config: minutes, not tens

log() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with a limit, capped by what is left of the budget
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
        log "SKIPPED  $name (budget of ${BUDGET}s spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        log "OK       $name (${dt}s)"
    else
        [ "$rc" -eq 124 ] && log "TIMEOUT  $name after ${dt}s (limit ${limit}s)" || log "FAILED   $name rc=$rc (${dt}s)"
        failed=$((failed + 1))
    fi
}

{
    echo "device: $DEVICE_NAME"
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
    git rev-parse HEAD 2>/dev/null
} > "$RESULTS/environment.txt"
log "gpu_suite: $DEVICE_NAME -> $RESULTS (budget ${BUDGET}s)"

step build_ext 150 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace
step pytest_gpu 150 $PY -m pytest -q -m gpu -x -p no:cacheprovider tests
step bench_attention 70 $PY bench/bench_attention.py --quick --out "$RESULTS"
step bench_attention_hopper 90 $PY bench/bench_attention.py --hopper --quick --out "$RESULTS"
step bench_decode 40 $PY bench/bench_decode.py --out "$RESULTS"
# eager configurations only: a compile of 0.4b / 3.5b would not fit these budgets (syncs / step come with each row)
step train_0.4b 80 $PY bench/throughput.py --preset=florenz-0.4b --mode=train --samples=64 --batch=32 --repeats=2 \
    --train_configs=published,triton,static-triton,dense-cached --out="$RESULTS/train-0.4b"
step train_3.5b 80 $PY bench/throughput.py --preset=florenz-3.5b --mode=train --samples=32 --batch=32 --repeats=1 \
    --train_configs=published,static-triton --out="$RESULTS/train-3.5b"
step generate_3.5b 60 $PY bench/generate.py --device cuda --preset florenz-3.5b --batch 1,64 --dtype bfloat16 \
    --cuda-graph --skip-uncached --out "$RESULTS"

log "done in $(( $(date +%s) - START ))s, $failed step(s) failed"
exit "$failed"
