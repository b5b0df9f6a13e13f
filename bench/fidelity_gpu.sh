#!/usr/bin/env bash
# Issue 10 on one GPU, one device call per phase (each < 10 min). Carry: .comfy-carry (ComfyUI
# tree), .whl (ComfyUI's missing pip deps, as bench/e2e_gpu.sh), and from call 2 on the carried
# toy checkpoint folder (fidelity-carry, bf16 shards ~53 MiB; it must be under the repo, ignored).
#   call 1: PHASE=pretrain BUDGET=540 bash bench/fidelity_gpu.sh        -> $OUT/toy-*.safetensors
#   (copy the returned toy-* files into ./fidelity-carry, then)
#   call 2: PHASE=rest BUDGET=120 bash bench/fidelity_gpu.sh            -> results json/md/png
# PHASE=all runs everything in one call (BUDGET s of pretraining first).
set -o pipefail
OUT="${OUT:-bench/results}"
RUN="${RUN:-/tmp/fidelity-run}"
source bench/gpu_env.sh
[ -f fidelity-carry/toy-state.json ] && $PY -m bench.fidelity import-carry --src fidelity-carry --run "$RUN"
R=(--run "$RUN" --results "$OUT")
case "${PHASE:-all}" in
  pretrain)
    $PY -m bench.fidelity pretrain "${R[@]}" --budget-s "${BUDGET:-540}" 2>&1 | tee "$OUT/fidelity-pretrain.log" | grep -v 'model_type\|manual cast' | tail -40
    $PY -m bench.fidelity export-carry --run "$RUN" --dest "$OUT" ;;
  rest)
    [ "${BUDGET:-0}" != 0 ] && $PY -m bench.fidelity pretrain "${R[@]}" --budget-s "$BUDGET" 2>&1 | tail -5
    $PY -m bench.fidelity structure "${R[@]}" 2>&1 | tail -5
    timeout -s TERM "${COMPARE_TIMEOUT:-420}" $PY -m bench.fidelity compare "${R[@]}" "$@" 2>&1 | tee "$OUT/fidelity-compare.log" | grep compare ;;
  all)
    $PY -m bench.fidelity all "${R[@]}" --budget-s "${BUDGET:-300}" "$@" 2>&1 | tee "$OUT/fidelity-all.log" | grep -v 'model_type\|manual cast' | tail -40 ;;
esac
cat "$OUT"/fidelity-*.md 2>/dev/null | tail -40
