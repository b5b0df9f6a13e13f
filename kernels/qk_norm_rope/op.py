"""``salad::qk_norm_rope`` custom op (fake implementation for torch.compile), dispatched
through the backend registry like the other SALAD ops, and its autograd (training).

Backward: dx on the backend the forward ran on (the registry's choice, including its fallback
to torch): the Triton kernel, wrapped as the custom op ``salad::qk_norm_rope_backward`` so
torch.compile / AOTAutograd can trace it, or autograd through the torch reference. The norm
weight's gradient (SALAD keeps it frozen) is plain torch, only when the weight requires grad.
freqs get none: Wan's are constants."""

from __future__ import annotations

import torch

from ..registry import implementation
from .naive import qk_norm_rope_backward_torch, qk_norm_rope_torch, qk_norm_rope_weight_grad


@torch.library.custom_op("salad::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float, backend: str
) -> torch.Tensor:
    return implementation("qk_norm_rope", backend, x.device)(x, weight, freqs, num_heads, eps)


@_qk_norm_rope_op.register_fake
def _(x, weight, freqs, num_heads, eps, backend):
    b, n, c = x.shape
    return x.new_empty((b, n, num_heads, c // num_heads))


@torch.library.custom_op("salad::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_triton_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    from .triton import qk_norm_rope_backward_triton

    return qk_norm_rope_backward_triton(grad, x, weight, freqs, num_heads, eps)


@_qk_norm_rope_backward_triton_op.register_fake
def _(grad, x, weight, freqs, num_heads, eps):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, weight, freqs, num_heads, eps, backend = inputs
    if freqs.requires_grad:
        raise ValueError(
            "Expected RoPE freqs that do not require grad (qk_norm_rope has no freqs gradient), "
            "got freqs with requires_grad=True. Try freqs.detach()."
        )
    ctx.save_for_backward(x, weight, freqs)
    ctx.num_heads, ctx.eps = num_heads, eps
    ctx.triton = implementation("qk_norm_rope", backend, x.device) is not qk_norm_rope_torch


def _backward(ctx, grad):
    x, weight, freqs = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        backward = _qk_norm_rope_backward_triton_op if ctx.triton else qk_norm_rope_backward_torch
        dx = backward(grad, x, weight, freqs, ctx.num_heads, ctx.eps)
    if ctx.needs_input_grad[1]:
        dw = qk_norm_rope_weight_grad(grad, x, freqs, ctx.eps).to(weight)
    return dx, dw, None, None, None, None


torch.library.register_autograd("salad::qk_norm_rope", _backward, setup_context=_setup_context)


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm over x's C channels (weight [C]) then Wan's 3D RoPE per head, differentiable
    in x and weight.

    x [B, N, C] -> [B, N, H, D] contiguous, x's dtype; freqs [B or 1, N, 1, D/2, 2, 2]."""
    return _qk_norm_rope_op(x, weight, freqs, int(num_heads), float(eps), backend)
