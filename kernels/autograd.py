"""Autograd for the SALAD custom ops (training, issue 8).

- ``salad::block_sparse_attention``: the backend comes from SALAD_BACKWARD_BACKEND, read when
  the forward runs (so setup saves what that backward needs):
  - "triton": FlashAttention-2-style kernels (block_sparse_attn/triton_bwd.py) that recompute P
    from q, k and the forward's saved ``out`` and fp32 ``lse``; no forward recompute. Wrapped
    as the custom op ``salad::block_sparse_attention_backward`` so torch.compile can trace it.
    Needs CUDA tensors, or TRITON_INTERPRET=1 on CPU (the tests).
  - "flex": recompute the forward with FlexAttention on the same block mask and use its fused
    backward (CUDA). If Inductor fails to build it, one warning and the torch path from then on.
  - "torch": recompute with the chunked torch reference ``block_sparse_attention_torch`` and
    differentiate it.
  - "auto" (default): triton on CUDA when Triton is installed and its backward takes the
    inputs (dtype, head dims, block size: ``triton_bwd.unsupported_reason``), else flex on CUDA,
    else torch.
  An explicit choice that cannot run on the inputs (device; for triton also dtype, head dims,
  block size) raises ValueError when the forward runs.
  The gradient of the log-sum-exp output is exact on the triton and torch paths and ignored on
  the flex path (SALAD never differentiates through it). Unused output gradients are not
  materialised (``ctx.set_materialize_grads(False)``): a loss on ``out`` alone reaches the
  backward with grad_lse None, so no [B, H, N] fp32 zeros are allocated and read.
- ``salad::linear_attention``: analytic gradients that recompute only the state S, z (one pass
  over k and v), not the output (formulas in linear_attn/triton_bwd.py). SALAD_BACKWARD_BACKEND
  again, read when the forward runs: "triton" (kernels that keep q, k, v in their 16-bit dtype
  and multiply on tensor cores; wrapped as the custom op ``salad::linear_attention_backward``)
  or "torch" (the fp32 formulas of ``linear_attention_backward_torch``). "auto" and "flex" (there is no flex version) take triton
  on CUDA when Triton is installed and its kernels take the inputs, else torch; fp32 inputs
  always take torch (cuBLAS multiplies them exactly), as do q, k, v of mixed dtypes. An explicit
  "triton" that cannot run raises ValueError when the forward runs. The triton path sums dS and
  dz over row ranges with fp32 atomics, so its gradients are not bit-for-bit reproducible.
- ``salad::select_topk_blocks``: integer indices, no gradient.
The forward stays on the fast (Triton) path. Kept between forward and backward: q, k, v and the
selection, plus ``out`` and ``lse`` for the triton backward.
"""

from __future__ import annotations

import functools
import os

import torch

from .block_sparse_attn.naive import block_sparse_attention_torch
from .layout import out_like
from .linear_attn.naive import linear_attention_backward_torch
from .registry import backend_usable, flex_available, triton_available
from .selection import BlockSelection

# "auto" (triton on CUDA, else flex on CUDA, else torch), "triton", "flex" or "torch".
BACKWARD_ENV = "SALAD_BACKWARD_BACKEND"
BACKWARD_CHOICES = ("auto", "triton", "flex", "torch")


def backward_backend(
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    value_dim: int | None = None,
    block_size: int | None = None,
) -> str:
    """The block-sparse attention backward that SALAD_BACKWARD_BACKEND selects for inputs on
    ``device``. With the inputs' dtype, q/k and v head dims and block size given (the op's
    setup passes q's and v's), "auto" takes triton only when its backward supports them, and an
    explicit "triton" that does not raises; left out, they are not checked."""
    choice = os.environ.get(BACKWARD_ENV, "auto")
    if choice not in BACKWARD_CHOICES:
        raise ValueError(f"Expected {BACKWARD_ENV} in {BACKWARD_CHOICES}, got {choice!r}. Try 'auto'.")
    if choice == "auto":
        if device.type == "cuda" and triton_available() and _triton_backward_problem(
                dtype, head_dim, value_dim, block_size) is None:
            return "triton"
        if device.type == "cuda" and flex_available():
            return "flex"
        return "torch"
    if not backend_usable(choice, device):
        needs = "CUDA tensors (or TRITON_INTERPRET=1)" if choice == "triton" else "CUDA tensors and Triton"
        raise ValueError(
            f"Expected {needs} for {BACKWARD_ENV}={choice}, got {device.type} tensors. "
            f"Try {BACKWARD_ENV}=torch."
        )
    if choice == "triton":
        problem = _triton_backward_problem(dtype, head_dim, value_dim, block_size)
        if problem is not None:
            raise ValueError(f"{problem}. Try {BACKWARD_ENV}=torch.")
    return choice


def _triton_backward_problem(dtype, head_dim, value_dim, block_size) -> str | None:
    """Why the Triton backward cannot take these inputs, or None (also when any is unknown:
    not checked). Only called with Triton installed: triton_bwd imports it."""
    if None in (dtype, head_dim, value_dim, block_size):
        return None
    from .block_sparse_attn.triton_bwd import unsupported_reason

    return unsupported_reason(dtype, head_dim, value_dim, block_size)


def _grads(outputs, inputs, grad_outputs):
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


# -- block-sparse attention -------------------------------------------------------------------
def _bsa_setup(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, token_order, block_size, _query_group, scale, backend = inputs
    ctx.backward_backend = backward_backend(q.device, dtype=q.dtype, head_dim=q.shape[-1],
                                            value_dim=v.shape[-1], block_size=block_size)
    # An unused output's gradient stays None instead of zeros (see _bsa_backward).
    ctx.set_materialize_grads(False)
    # Only the triton backward reads the forward's results; the others recompute them.
    out, lse = output if ctx.backward_backend == "triton" else (None, None)
    ctx.save_for_backward(q, k, v, kv_indices, kv_counts, token_order, out, lse)
    ctx.block_size, ctx.scale = block_size, scale


def _bsa_backward(ctx, grad_out, grad_lse):
    """grad_out or grad_lse is None when that output took no part in the loss (grads are not
    materialised). Inputs that need a gradient still get a tensor (zeros where nothing flows,
    as before), so ``autograd.grad(lse, v)`` does not call v unused."""
    saved = ctx.saved_tensors  # once: checkpointing allows a single unpack
    grads = _bsa_input_grads(ctx, saved, grad_out, grad_lse)
    grads = [torch.zeros_like(x) if g is None and needed else g
             for g, x, needed in zip(grads, saved[:3], ctx.needs_input_grad)]
    return (*grads, None, None, None, None, None, None, None)


def _bsa_input_grads(ctx, saved, grad_out, grad_lse):
    """(dq, dk, dv), each possibly None (no gradient)."""
    q, k, v, kv_indices, kv_counts, token_order, out, lse = saved
    if grad_out is None and (grad_lse is None or ctx.backward_backend == "flex"):
        return None, None, None  # (flex ignores grad_lse)
    selection = BlockSelection(kv_indices, kv_counts, ctx.block_size, q.shape[2], token_order)
    if ctx.backward_backend == "triton":
        if grad_out is None:  # a loss on lse alone (rare): the kernels need a dO
            grad_out = torch.zeros_like(out)
        return _bsa_backward_triton_op(
            grad_out, q, k, v, out, lse, grad_lse, kv_indices, kv_counts, token_order,
            ctx.block_size, ctx.scale)
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        if ctx.backward_backend == "flex" and not _FLEX_BROKEN:
            try:
                return _flex_grads(qd, kd, vd, selection, ctx.scale, grad_out)
            except Exception as exc:  # a broken Inductor must not stop training: torch path
                _flex_failed(exc)
        out, lse = block_sparse_attention_torch(qd, kd, vd, selection, ctx.scale)
        return _grads((out, lse), (qd, kd, vd), (grad_out, grad_lse))


# A custom op (with a fake) rather than a direct call, so torch.compile / AOTAutograd can trace
# the backward: a raw Triton launch cannot take fake tensors.
@torch.library.custom_op("salad::block_sparse_attention_backward", mutates_args=())
def _bsa_backward_triton_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    token_order: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .block_sparse_attn.triton_bwd import block_sparse_attention_backward_triton

    selection = BlockSelection(kv_indices, kv_counts, block_size, q.shape[2], token_order)
    return block_sparse_attention_backward_triton(grad_out, q, k, v, out, lse, selection, scale, grad_lse)


@_bsa_backward_triton_op.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, kv_indices, kv_counts, token_order, block_size, scale):
    return out_like(q, q.shape[-1]), out_like(k, k.shape[-1]), out_like(v, v.shape[-1])


_FLEX_BROKEN = False


@functools.cache
def _flex_train():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(q, k, v, selection, scale):
    """Differentiable FlexAttention on the selection's block mask (working order in and out).
    On torch 2.11 / H100 its backward does not lower at 64-token blocks, with Flex's default
    tiles ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N") or with 64/32-wide
    tiles given as kernel_options ("NoValidChoicesError"); _bsa_input_grads then warns once and
    takes the torch path (bench/results/attention-bwd-h100.md)."""
    from .block_sparse_attn.flex import block_mask_from_selection

    return _flex_train()(q, k, v, block_mask=block_mask_from_selection(selection), scale=scale)


def _flex_grads(qd, kd, vd, selection, scale, grad_out):
    """FlexAttention fwd + its fused bwd on the same block mask (no LSE output: SALAD never
    differentiates through it here)."""
    from .block_sparse_attn.naive import from_working_order, to_working_order

    order = selection.token_order
    qw, kw, vw = (to_working_order(t, order) for t in (qd, kd, vd))
    out = from_working_order(flex_sparse_attention(qw, kw, vw, selection, scale), order)
    return _grads((out,), (qd, kd, vd), (grad_out,))


def _flex_failed(exc: Exception) -> None:
    global _FLEX_BROKEN
    import logging

    _FLEX_BROKEN = True
    logging.getLogger("salad").warning(
        "SALAD: FlexAttention backward failed (%s: %s); using the torch backward.", type(exc).__name__, exc)


# -- linear attention ---------------------------------------------------------------------------
def linear_backward_backend(device: torch.device, dtypes: tuple[torch.dtype, ...], head_dim: int,
                            value_dim: int) -> str:
    """The salad::linear_attention backward ("triton" or "torch") that SALAD_BACKWARD_BACKEND
    selects for inputs on ``device`` with q's, k's and v's dtypes and the q/k and v head dims."""
    choice = backward_backend(device)  # checks the variable, and an explicit choice's device
    if choice == "flex":  # no FlexAttention version of this backward
        choice = "triton" if triton_available() else "torch"
    if choice == "torch" or dtypes[0] == torch.float32:
        return "torch"
    from .linear_attn.triton_bwd import ADVICE, unsupported_reason

    problem = unsupported_reason(dtypes[0], head_dim, value_dim)
    if problem is None and len(set(dtypes)) != 1:  # the kernels multiply q, k, v in one dtype
        problem = f"Expected q, k and v in one dtype, got {[str(t).removeprefix('torch.') for t in dtypes]}"
    if problem is None:
        return "triton"
    if os.environ.get(BACKWARD_ENV) == "triton":
        raise ValueError(f"{problem}. {ADVICE}")
    return "torch"


def _lin_setup(ctx, inputs, output):
    q, k, v, eps, backend = inputs
    ctx.backward_backend = linear_backward_backend(q.device, (q.dtype, k.dtype, v.dtype),
                                                   q.shape[-1], v.shape[-1])
    ctx.save_for_backward(q, k, v)
    ctx.eps = eps


def _lin_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    if ctx.backward_backend == "triton":
        dq, dk, dv = _lin_backward_triton_op(grad_out, q, k, v, ctx.eps)
    else:
        dq, dk, dv = linear_attention_backward_torch(grad_out, q, k, v, ctx.eps)
    return dq, dk, dv, None, None


# A custom op (with a fake) for the same reason as salad::block_sparse_attention_backward.
@torch.library.custom_op("salad::linear_attention_backward", mutates_args=())
def _lin_backward_triton_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .linear_attn.triton_bwd import linear_attention_backward_triton

    return linear_attention_backward_triton(grad_out, q, k, v, eps)


@_lin_backward_triton_op.register_fake
def _(grad_out, q, k, v, eps):
    return out_like(q, q.shape[-1]), out_like(k, k.shape[-1]), out_like(v, v.shape[-1])


# -- selection ----------------------------------------------------------------------------------
def _sel_setup(ctx, inputs, output):
    pass


def _sel_backward(ctx, grad_idx, grad_counts):
    return (None,) * 6  # q, k, block_size, topk, query_group, backend: int ids carry no gradient


def register() -> None:
    from . import ops  # noqa: F401  (defines the ops)

    torch.library.register_autograd("salad::block_sparse_attention", _bsa_backward, setup_context=_bsa_setup)
    torch.library.register_autograd("salad::linear_attention", _lin_backward, setup_context=_lin_setup)
    torch.library.register_autograd("salad::select_topk_blocks", _sel_backward, setup_context=_sel_setup)


register()
