#!/usr/bin/env bash
# Issue 8's single-GPU evidence in one device call (< 10 min), on a 1- or 2-GPU machine:
#   GPU 0: the sparse-branch backward kernel's GPU tests, then bench/train.py (dense+LoRA baseline
#          and SALAD fwd+bwd per sample, same run) -> $OUT/train-<tag>.json/.md
#   GPU 1 (GPU 0 afterwards on a 1-GPU machine): data-free distillation on the pretrained toy of
#          issue 10 (fidelity-carry/), sparse-only vs LoRA vs param-matched LoRA vs SALAD
#          -> $OUT/fidelity-<tag>-distill.json/.md
# Carry: .comfy-carry, .whl (bench/prepare_gpu_carry.sh) and fidelity-carry (bench/fidelity_gpu.sh).
# Env: TAG (results tag, default h100-tritonbwd), FRAMES ("77 21"), DISTILL_STEPS (300).
set -o pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
TAG="${TAG:-h100-tritonbwd}"
source bench/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv

distill() {
  [ -f fidelity-carry/toy-state.json ] || { echo "distill: no fidelity-carry/toy-state.json, skipped"; return; }
  $PY -m bench.fidelity import-carry --src fidelity-carry --run /tmp/fidelity-run
  timeout -s TERM "${DISTILL_TIMEOUT:-400}" $PY -m bench.fidelity compare --run /tmp/fidelity-run --results "$OUT" \
    --tag "$TAG-distill" --objective distill --modes topk --variants sparse_only lora lora_matched salad \
    --ft-steps "${DISTILL_STEPS:-300}" > "$OUT/fidelity-distill.log" 2>&1
  echo "distill rc=$?"; grep compare "$OUT/fidelity-distill.log"
}

if [ "$NGPU" -ge 2 ]; then CUDA_VISIBLE_DEVICES=1 distill > "$OUT/distill-summary.txt" 2>&1 & fi
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -s TERM 180 $PY -m pytest tests/test_block_sparse_attn_bwd.py -q -m gpu -p no:cacheprovider 2>&1 \
    | tee "$OUT/train-bwd-gpu-tests.log" | tail -15
  # shellcheck disable=SC2086
  timeout -s TERM "${TRAIN_TIMEOUT:-300}" $PY bench/train.py --out "$OUT" --frames ${FRAMES:-77 21} --distill-steps 0 \
    --cases salad_full_topk_90 --deadline-s 240 --tag "$TAG" 2>&1 | tee "$OUT/train-bench.log" | grep -E '^\{|rror' | cut -c1-300
)
if [ "$NGPU" -ge 2 ]; then wait; else distill > "$OUT/distill-summary.txt" 2>&1; fi
cat "$OUT/distill-summary.txt"
cat "$OUT"/fidelity-*distill.md 2>/dev/null | tail -20
