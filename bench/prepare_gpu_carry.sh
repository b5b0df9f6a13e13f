#!/usr/bin/env bash
# Prepare what the GPU scripts carry to the device machine (it has torch + Triton, not ComfyUI):
#   .comfy-carry/ComfyUI  the ComfyUI Python tree without frontend, API nodes, tests or models (~7 MB)
#   .whl/                 pure-Python wheels ComfyUI's sampler path needs there (+ SageAttention 1.0.6)
# Both are ignored through .git/info/exclude. Then: run(carry=[".comfy-carry", ".whl"], ...).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash .ci/setup_comfyui.sh >&2
SRC="${COMFYUI_PATH:-$REPO/.comfy/ComfyUI}"
for p in /.comfy-carry/ /.whl/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
rm -rf .comfy-carry && mkdir -p .comfy-carry/ComfyUI
# Top-level folders only (./name), so code folders deeper down (comfy/ldm/models) stay; the
# tokenizer data files are large and unused by the diffusion-model path.
(cd "$SRC" && tar cf - --exclude=__pycache__ --exclude=./custom_nodes --exclude=./api_server --exclude=./app \
   --exclude=./comfy_api_nodes --exclude=./tests --exclude=./tests-unit --exclude=./models --exclude=./input \
   --exclude=./output --exclude=./temp --exclude=./user --exclude=./extra_model_paths.yaml --exclude='./.salad_*' \
   --exclude=./comfy/sd1_tokenizer/vocab.json --exclude=./comfy/text_encoders/llama_tokenizer/tokenizer.json \
   --exclude=./comfy/text_encoders/qwen25_tokenizer/merges.txt \
   --exclude=./comfy/text_encoders/qwen25_tokenizer/vocab.json --exclude=./comfy/text_encoders/t5_tokenizer/tokenizer.json .) \
  | (cd .comfy-carry/ComfyUI && tar xf -)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  torchsde==0.2.6 trampoline==0.1.2 sageattention==1.0.6
du -sh .comfy-carry .whl
