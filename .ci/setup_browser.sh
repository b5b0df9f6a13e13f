#!/usr/bin/env bash
# Debian chromium for the browser test (tests/test_browser.py); idempotent.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "[setup] chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
  exit 0
fi
echo "[setup] installing Debian chromium"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
