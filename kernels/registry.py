"""Backend registry: which implementation of each op runs, chosen triton -> flex -> torch by
device and availability, or forced by the user (the node's ``backend`` widget).

Nothing here touches a GPU or imports Triton at import time: implementations are imported on
first use, so a machine without Triton gets one warning and the torch path, never a crash.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os

import torch

log = logging.getLogger("salad")

BACKEND_CHOICES = ("auto", "triton", "flex", "torch")

# op -> backend -> "module:function" (relative to this package). Backends missing for an op
# fall through to the next in PREFERENCE.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "select_topk_blocks": {
        "torch": "block_select.naive:select_topk_blocks_naive",
    },
    "block_sparse_attention": {
        "torch": "block_sparse_attn.naive:block_sparse_attention_torch",
    },
    "linear_attention": {
        "torch": "linear_attn.naive:linear_attention_torch",
    },
}
PREFERENCE = ("triton", "flex", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def backend_usable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available() and (device.type == "cuda" or triton_interpreting())
    if backend == "flex":
        return flex_available() and device.type == "cuda"
    return False


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def resolve_backend(op: str, requested: str, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device`` for the user's ``requested`` choice.

    A forced backend that cannot run here falls to the next one in PREFERENCE, with a warning.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"Expected backend in {BACKEND_CHOICES}, got {requested!r}. Try 'auto'.")
    available = IMPLEMENTATIONS[op]
    order = PREFERENCE if requested == "auto" else PREFERENCE[PREFERENCE.index(requested):]
    chosen = next(
        (b for b in order if b in available and backend_usable(b, device)), "torch"
    )
    if requested not in ("auto", chosen):
        if requested == "triton" and not triton_available():
            _warn_once("SALAD: Triton is not installed; using the torch backend (pip install triton).")
        else:
            _warn_once(f"SALAD: backend {requested!r} cannot run {op} on {device.type}; using {chosen!r}.")
    return chosen


@functools.cache
def load_implementation(op: str, backend: str):
    module_name, func_name = IMPLEMENTATIONS[op][backend].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, func_name)


def implementation(op: str, requested: str, device: torch.device):
    return load_implementation(op, resolve_backend(op, requested, device))
