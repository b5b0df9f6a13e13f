# Sourced by the bench/*_gpu.sh scripts: the environment of a GPU machine that has torch and
# Triton but not ComfyUI. ComfyUI's Python tree comes as .comfy-carry/ComfyUI and its missing
# pure-Python dependencies as .whl/*.whl (both from bench/prepare_gpu_carry.sh), installed into
# /tmp/site. Sets PY (python3 unless given), PYTHONUNBUFFERED, COMFYUI_PATH (the carried tree
# unless given) and PYTHONPATH (/tmp/site first).
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1 COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.comfy-carry/ComfyUI}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
