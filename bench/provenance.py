"""The commit a benchmark's records name (bench/attention.py, bench/e2e.py, their reports)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """GIT_SHA when set (by the caller, where the checkout's HEAD is stale: the device copy),
    else this checkout's HEAD, else "unknown"."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def short_commit(commit: str) -> str:
    """A full hex sha cut to 10 characters for report titles; anything else (a short sha with a
    suffix such as "4e16d69+wip", "unknown") as given."""
    return commit[:10] if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else commit
