#!/usr/bin/env bash
# One device call: GPU kernel tests, then the attention benchmark. Logs and results go to $OUT
# (or bench/results when OUT is unset). Usage: GIT_SHA=<sha> bash bench/attention_gpu.sh [bench args]
set -o pipefail
OUT="${OUT:-bench/results}"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest tests/test_kernels_triton.py -q -m gpu -p no:cacheprovider -rs 2>&1 | tee "$OUT/attention-gpu-tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-330}" $PY bench/attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/attention-bench.log" | grep -v '^{' | tail -60
