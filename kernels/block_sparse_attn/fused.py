"""The whole SALAD combine (the ``salad::salad_attention`` op) for backends with no fused
path: the sparse op, the linear op and Proj one after another, in fp32. The Triton version
lives in triton.py."""

from __future__ import annotations

import torch

from ..linear_attn.naive import DEFAULT_EPS, linear_attention_torch
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
) -> torch.Tensor:
    out, _ = block_sparse_attention_torch(q, k, v, selection, scale)
    return _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale)


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
) -> torch.Tensor:
    from .flex import block_sparse_attention_flex

    out, _ = block_sparse_attention_flex(q, k, v, selection, scale)
    return _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale)


def _combine(out, q, k, v, eps, proj_weight, proj_bias, linear_scale) -> torch.Tensor:
    """O_s + c * (O_l W^T + b) over head-merged rows (Alg. 1), fp32, in out's dtype and layout."""
    b, h, n, dv = out.shape
    lin = linear_attention_torch(q, k, v, eps)  # rounded to q's dtype, as the fused path feeds Proj
    proj = lin.float().transpose(1, 2).reshape(b, n, h * dv) @ proj_weight.float().t()
    if proj_bias is not None:
        proj = proj + proj_bias.float()
    if linear_scale is not None:
        proj = proj * linear_scale.float().view(b, 1, 1)
    result = torch.empty_like(out)
    result.copy_(out.float() + proj.view(b, n, h, dv).transpose(1, 2))
    return result
