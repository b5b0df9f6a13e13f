#!/usr/bin/env bash
# One device call: the fused-kernel GPU tests, then bench/e2e.py for each model in MODELS.
# Carry: .comfy-carry (ComfyUI tree), .whl (torchsde, trampoline, sageattention wheels).
# Usage: MODELS="1.3b" STEPS=10 bash bench/e2e_gpu.sh [extra e2e.py args]
set -o pipefail
OUT="${OUT:-bench/results}"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv | tee "$OUT/e2e-gpu.txt"
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest tests/test_qk_norm_rope.py -q -m gpu -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/e2e-gpu.txt" | tail -5
for m in ${MODELS:-1.3b}; do
  case $m in
    14b) A=(--steps "${STEPS_14B:-3}" --warmup 1 --attn-steps 1 --cases "${CASES_14B:-salad_full_topk_90,salad_full_topk_90_drop20,salad_full_stswa_90}"); T=${TIMEOUT_14B:-220} ;;
    *) A=(--steps "${STEPS:-10}" --warmup 1); T=${TIMEOUT_13B:-200} ;;
  esac
  timeout -s TERM "$T" $PY bench/e2e.py --model "$m" "${A[@]}" --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/e2e-$m.log" | grep -v '^{' | grep -v 'torchaudio missing' | tail -25
done
cat "$OUT"/e2e-h*.md 2>/dev/null | tail -20
