"""Sparse + linear branch together (the ``salad::salad_attention`` op) for backends with no
fused kernel: the two ops back to back. The Triton version lives in triton.py."""

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
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    linear_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse = block_sparse_attention_torch(q, k, v, selection, scale)
    return _biased(out, out_bias), lse, _scaled(linear_attention_torch(q, k, v, eps), linear_scale)


def _scaled(x: torch.Tensor, linear_scale: torch.Tensor | None) -> torch.Tensor:
    if linear_scale is None:
        return x
    return (x.float() * linear_scale.float().view(-1, 1, 1, 1)).to(x.dtype)


def _biased(out: torch.Tensor, out_bias: torch.Tensor | None) -> torch.Tensor:
    """out [B, H, N, Dv] + out_bias [B, H * Dv] (per head, the same for every token), in fp32."""
    if out_bias is None:
        return out
    b, h, _, dv = out.shape
    return (out.float() + out_bias.float().view(b, h, 1, dv)).to(out.dtype)


def salad_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    linear_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .flex import block_sparse_attention_flex

    out, lse = block_sparse_attention_flex(q, k, v, selection, scale)
    return _biased(out, out_bias), lse, _scaled(linear_attention_torch(q, k, v, eps), linear_scale)
