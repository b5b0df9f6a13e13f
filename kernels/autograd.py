"""Autograd for the SALAD custom ops (training, issue 8).

Backward recomputes the forward with a differentiable implementation and differentiates it:
- ``salad::block_sparse_attention``: FlexAttention with the same block mask on CUDA (its own
  fused backward), else the chunked torch reference ``block_sparse_attention_torch``.
- ``salad::linear_attention``: the fp32 torch reference ``linear_attention_torch``.
- ``salad::select_topk_blocks``: integer indices, no gradient.
The forward stays on the fast (Triton) path; the recompute is local to one layer's backward,
so nothing extra is kept alive between forward and backward beyond q, k, v and the selection.
Gradient of the log-sum-exp output is included on the torch path and ignored on the flex path
(SALAD never differentiates through it).
"""

from __future__ import annotations

import functools
import os

import torch

from .block_sparse_attn.naive import block_sparse_attention_torch
from .linear_attn.naive import linear_attention_torch
from .registry import flex_available
from .selection import BlockSelection

# "auto" (flex on CUDA, torch elsewhere), "flex" or "torch".
BACKWARD_ENV = "SALAD_BACKWARD_BACKEND"


def _use_flex(device: torch.device) -> bool:
    choice = os.environ.get(BACKWARD_ENV, "auto")
    if choice == "torch":
        return False
    return device.type == "cuda" and flex_available()


def _grads(outputs, inputs, grad_outputs):
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


# -- block-sparse attention -------------------------------------------------------------------
def _bsa_setup(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, token_order, block_size, scale, backend = inputs
    ctx.save_for_backward(q, k, v, kv_indices, kv_counts, token_order)
    ctx.block_size, ctx.scale = block_size, scale


def _bsa_backward(ctx, grad_out, grad_lse):
    q, k, v, kv_indices, kv_counts, token_order = ctx.saved_tensors
    selection = BlockSelection(kv_indices, kv_counts, ctx.block_size, q.shape[2], token_order)
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        if _use_flex(q.device) and not _FLEX_BROKEN:
            try:
                return (*_flex_grads(qd, kd, vd, selection, ctx.scale, grad_out), None, None, None, None, None, None)
            except Exception as exc:  # a broken Inductor must not stop training: torch path
                _flex_failed(exc)
        out, lse = block_sparse_attention_torch(qd, kd, vd, selection, ctx.scale)
        dq, dk, dv = _grads((out, lse), (qd, kd, vd), (grad_out, grad_lse))
    return dq, dk, dv, None, None, None, None, None, None


_FLEX_BROKEN = False


@functools.cache
def _flex_train():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_grads(qd, kd, vd, selection, scale, grad_out):
    """FlexAttention fwd + its fused bwd on the same block mask. No kernel_options and no LSE
    output: the forward path's BLOCK_M/BLOCK_N=64 + return_lse failed to lower for the backward
    on H100 / torch 2.11 (bench/results/train-h100.md), so Flex picks its own tile sizes here."""
    from .block_sparse_attn.flex import block_mask_from_selection
    from .block_sparse_attn.naive import from_working_order, to_working_order

    order = selection.token_order
    qw, kw, vw = (to_working_order(t, order) for t in (qd, kd, vd))
    out = _flex_train()(qw, kw, vw, block_mask=block_mask_from_selection(selection), scale=scale)
    out = from_working_order(out, order)
    return _grads((out,), (qd, kd, vd), (grad_out,))


def _flex_failed(exc: Exception) -> None:
    global _FLEX_BROKEN
    import logging

    _FLEX_BROKEN = True
    logging.getLogger("salad").warning(
        "SALAD: FlexAttention backward failed (%s: %s); using the torch backward.", type(exc).__name__, exc)


# -- linear attention ---------------------------------------------------------------------------
def _lin_setup(ctx, inputs, output):
    q, k, v, eps, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.eps = eps


def _lin_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = linear_attention_torch(qd, kd, vd, ctx.eps)
        dq, dk, dv = _grads((out,), (qd, kd, vd), (grad_out,))
    return dq, dk, dv, None, None


# -- selection ----------------------------------------------------------------------------------
def _sel_setup(ctx, inputs, output):
    pass


def _sel_backward(ctx, grad_idx, grad_counts):
    return None, None, None, None, None


def register() -> None:
    from . import ops  # noqa: F401  (defines the ops)

    torch.library.register_autograd("salad::block_sparse_attention", _bsa_backward, setup_context=_bsa_setup)
    torch.library.register_autograd("salad::linear_attention", _lin_backward, setup_context=_lin_setup)
    torch.library.register_autograd("salad::select_topk_blocks", _sel_backward, setup_context=_sel_setup)


register()
