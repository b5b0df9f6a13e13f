#!/usr/bin/env bash
# One device call: the fused-kernel GPU tests, then bench/e2e.py for each model in MODELS.
# Carry: .comfy-carry (ComfyUI tree), .whl (torchsde, trampoline, sageattention wheels).
# Usage: MODELS="1.3b" STEPS=10 bash bench/e2e_gpu.sh [extra e2e.py args]
set -o pipefail
OUT="${OUT:-bench/results}"
export PYTHONUNBUFFERED=1 COMFYUI_PATH="$PWD/.comfy-carry/ComfyUI"
PY="${PY:-python3}"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv | tee "$OUT/e2e-gpu.txt"
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest tests/test_qk_norm_rope.py -q -m gpu -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/e2e-gpu.txt" | tail -5
for m in ${MODELS:-1.3b}; do
  case $m in 14b) S=${STEPS_14B:-3}; W=1 ;; *) S=${STEPS:-10}; W=2 ;; esac
  timeout "${BENCH_TIMEOUT:-400}" $PY bench/e2e.py --model "$m" --steps "$S" --warmup "$W" --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/e2e-$m.log" | grep -v '^{' | grep -v 'torchaudio missing' | tail -25
done
cat "$OUT"/e2e-h*.md 2>/dev/null | tail -20
