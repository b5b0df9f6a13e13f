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
        "triton": "block_select.triton:select_topk_blocks_triton",
        "torch": "block_select.naive:select_topk_blocks_naive",
    },
    "select_topk_pooled": {
        "triton": "block_select.triton:select_topk_pooled_triton",
        "torch": "block_select.naive:select_topk_pooled_naive",
    },
    "linear_state_pooled": {
        "triton": "linear_attn.triton:linear_state_pooled_triton",
        "torch": "linear_attn.naive:linear_state_pooled_torch",
    },
    "sliding_window_blocks": {
        "triton": "block_select.triton:sliding_window_blocks_triton",
        "torch": "block_select.naive:sliding_window_blocks_naive",
    },
    "block_sparse_attention": {
        "triton": "block_sparse_attn.triton:block_sparse_attention_triton",
        "flex": "block_sparse_attn.flex:block_sparse_attention_flex",
        "torch": "block_sparse_attn.naive:block_sparse_attention_torch",
    },
    "linear_attention": {
        "triton": "linear_attn.triton:linear_attention_triton",
        "torch": "linear_attn.naive:linear_attention_torch",
    },
    "linear_state": {
        "triton": "linear_attn.triton:linear_state_triton",
        "torch": "linear_attn.naive:linear_attention_state",
    },
    # Alg. 1's combine for inference (kernels.salad_attention): the sparse branch plus c * b_p,
    # then the linear branch through Proj added in place.
    "salad_sparse": {
        "triton": "block_sparse_attn.triton:salad_sparse_triton",
        "flex": "block_sparse_attn.fused:salad_sparse_flex",
        "torch": "block_sparse_attn.fused:salad_sparse_torch",
    },
    "salad_linear_add": {
        "triton": "block_sparse_attn.triton:salad_linear_add_triton",
        "torch": "block_sparse_attn.fused:salad_linear_add_torch",
    },
    # Wan's q/k RMSNorm + RoPE in one pass (SaladSelfAttention.qkv on CUDA).
    "qk_norm_rope": {
        "triton": "qk_norm_rope.triton:qk_norm_rope_triton",
        "torch": "qk_norm_rope.naive:qk_norm_rope_torch",
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
    if backend == "flex":  # compiled by Inductor, which needs Triton on CUDA
        return flex_available() and triton_available() and device.type == "cuda"
    return False


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def resolve_backend(op: str, requested: str, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device`` for the user's ``requested`` choice.

    ``auto`` can be overridden for the whole process with the environment variable
    SALAD_KERNEL_BACKEND (triton | flex | torch). A forced backend that cannot run here falls to
    the next one in PREFERENCE, with a one-line warning; an op with no implementation for the
    forced backend (e.g. linear_attention under "flex") quietly uses the next one.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"Expected backend in {BACKEND_CHOICES}, got {requested!r}. Try 'auto'.")
    if requested == "auto":
        override = os.environ.get("SALAD_KERNEL_BACKEND", "auto")
        requested = override if override in BACKEND_CHOICES else "auto"
    available = IMPLEMENTATIONS[op]
    if requested == "auto" and device.type != "cuda":
        return "torch"  # the Triton interpreter is for tests that ask for it, not a CPU fast path
    order = PREFERENCE if requested == "auto" else PREFERENCE[PREFERENCE.index(requested):]
    chosen = next(
        (b for b in order if b in available and backend_usable(b, device)), "torch"
    )
    wanted_triton = requested in ("auto", "triton") and "triton" in available
    if wanted_triton and device.type == "cuda" and not triton_available():
        _warn_once("SALAD: Triton is not installed; using slower kernels (pip install triton).")
    elif requested not in ("auto", chosen) and requested in available:
        _warn_once(f"SALAD: backend {requested!r} cannot run {op} on {device.type}; using {chosen!r}.")
    return chosen


@functools.cache
def load_implementation(op: str, backend: str):
    module_name, func_name = IMPLEMENTATIONS[op][backend].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, func_name)


def implementation(op: str, requested: str, device: torch.device):
    backend = resolve_backend(op, requested, device)
    try:
        return load_implementation(op, backend)
    except Exception as exc:  # a broken Triton/Inductor install must not take the node down
        if backend == "torch":
            raise
        _warn_once(f"SALAD: the {backend} backend failed to load ({type(exc).__name__}: {exc}); using torch.")
        return load_implementation(op, "torch")
