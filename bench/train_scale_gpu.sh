#!/usr/bin/env bash
# One device call on an nvidia-h100-x4 (or -x2) machine: bench/train_scale.py under torchrun on
# 1, 2, 4 GPUs (those present) in turn, each launch under its own time limit, records merged into
# $OUT/train-scale-<device>.json (+ .md) so the 2- and 4-GPU records carry scaling efficiency vs
# the 1-GPU run of this same call. Copy $OUT's json/md into bench/results/ afterwards.
#
# Carry: .comfy-carry (ComfyUI tree), .whl (torchsde, trampoline, sageattention wheels), as
# bench/e2e_gpu.sh. Defaults: Wan2.1-1.3B, 480x832x77, global batch 8, DDP: ~6 min, <= 8.5 min.
#   bash bench/train_scale_gpu.sh                          # 1.3B, 77 frames (paper recipe shape)
#   FRAMES=21 bash bench/train_scale_gpu.sh                # quick: ~3 min
#   MODEL=14b FRAMES=21 bash bench/train_scale_gpu.sh      # 14B, FSDP2 (a separate call)
# Env: MODEL (1.3b|14b), FRAMES, NS ("1 2 4"), STEPS (timed steps at most, 2), T_1/T_2/T_4/T_8
# (seconds per launch; the script trims timed steps to fit), extra args go to train_scale.py.
set -o pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
MODEL="${MODEL:-1.3b}"
FRAMES="${FRAMES:-77}"
# NVLink multicast stays off (KINDS.md: it can take the host's shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
source bench/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# One summary log and one launch log per model, so a call running both models returns few files
# (the device tool brings back at most 8).
LOG="$OUT/train-scale-gpu-$MODEL.txt"
LAUNCHES="$OUT/train-scale-$MODEL-launches.log"
: > "$LAUNCHES"
{
  date -u; echo "MODEL=$MODEL FRAMES=$FRAMES NGPU=$NGPU args: $*"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv
  nvidia-smi topo -m
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
} 2>&1 | tee "$LOG"
declare -A T=([1]="${T_1:-220}" [2]="${T_2:-150}" [4]="${T_4:-120}" [8]="${T_8:-110}")
for N in ${NS:-1 2 4}; do
  if [ "$N" -gt "$NGPU" ]; then echo "skip N=$N: $NGPU GPU(s)" | tee -a "$LOG"; continue; fi
  t=${T[$N]:-120}
  echo "== N=$N MODEL=$MODEL FRAMES=$FRAMES limit ${t}s" | tee -a "$LOG" "$LAUNCHES"
  start=$(date +%s)
  timeout -s TERM -k 15 "$t" $PY -m torch.distributed.run --standalone --nproc-per-node "$N" \
    bench/train_scale.py --model "$MODEL" --frames "$FRAMES" --steps "${STEPS:-2}" --budget-s "$((t - 25))" \
    --out "$OUT" --run-dir "/tmp/salad-train-scale-$N" "$@" 2>&1 | tee "/tmp/train-scale-$MODEL-n$N.log" >> "$LAUNCHES"
  rc=${PIPESTATUS[0]}  # written to $OUT as it runs: a launch cut off by the call's limit still comes back
  echo "==== N=$N rc=$rc" >> "$LAUNCHES"
  grep -E '\[train_scale\]|Error|error:|OutOfMemory' "/tmp/train-scale-$MODEL-n$N.log" | tail -14 | tee -a "$LOG"
  echo "== N=$N rc=$rc $(( $(date +%s) - start ))s" | tee -a "$LOG"
  [ "$rc" -ne 0 ] && tail -20 "/tmp/train-scale-$MODEL-n$N.log" | tee -a "$LOG"
done
cat "$OUT"/train-scale-h*.md 2>/dev/null | tail -40 || true
