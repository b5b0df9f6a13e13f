"""The whole SALAD combine (the ``salad::salad_attention`` op) for backends with no fused
path: the sparse op, the linear op and Proj one after another, in fp32. The Triton version
lives in triton.py."""

from __future__ import annotations

import torch

from ..linear_attn.naive import DEFAULT_EPS, linear_apply_torch, linear_attention_state
from ..selection import BlockSelection
from .naive import block_sparse_attention_torch


def salad_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    linear_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    out, _ = block_sparse_attention_torch(q, k, v, selection, scale)
    return _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale, linear_state)


def salad_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    linear_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    from .flex import block_sparse_attention_flex

    out, _ = block_sparse_attention_flex(q, k, v, selection, scale)
    return _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale, linear_state)


def _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale, linear_state) -> torch.Tensor:
    """O_s + c * (O_l W^T + b) over head-merged rows (Alg. 1), fp32, in out's dtype and layout.
    linear_state: (S, z) already made, or None to make them from k and v."""
    b, h, n, dv = out.shape
    state, z = linear_attention_state(k, v) if linear_state is None else linear_state
    lin = linear_apply_torch(q, state, z, eps)  # rounded to q's dtype, as the unfused path feeds Proj
    proj = lin.float().transpose(1, 2).reshape(b, n, h * dv) @ proj_weight.float().t()
    if proj_bias is not None:
        proj = proj + proj_bias.float()
    if linear_scale is not None:
        proj = proj * linear_scale.float().view(b, 1, 1)
    result = torch.empty_like(out)
    result.copy_(out.float() + proj.view(b, n, h, dv).transpose(1, 2))
    return result
