"""The two halves of SALAD's combine (``kernels.salad_attention``): the sparse branch plus the
gated Proj bias (``salad::salad_sparse``), then the linear branch through Proj added in place
(``salad::salad_linear_add_``), for the flex and torch backends: the parts one after another,
the linear half in fp32. Triton's halves live in triton.py (the sparse kernel with the bias in
its epilogue, then the chunked linear half)."""

from __future__ import annotations

import torch
from einops import rearrange

from ..linear_attn.naive import DEFAULT_EPS, linear_apply_torch
from ..selection import BlockSelection
from .naive import block_sparse_attention_torch


def salad_sparse_flex(q, k, v, selection: BlockSelection, out_bias=None, scale=None) -> torch.Tensor:
    from .flex import block_sparse_attention_flex

    return _add_bias(block_sparse_attention_flex(q, k, v, selection, scale)[0], out_bias)


def salad_sparse_torch(q, k, v, selection: BlockSelection, out_bias=None, scale=None) -> torch.Tensor:
    return _add_bias(block_sparse_attention_torch(q, k, v, selection, scale)[0], out_bias)


def _add_bias(out: torch.Tensor, out_bias: torch.Tensor | None) -> torch.Tensor:
    """O_s + c * b_p: out_bias fp32 [B, H * Dv] per head-merged row."""
    if out_bias is None:
        return out
    b, h, _, dv = out.shape
    return (out.float() + out_bias.view(b, h, 1, dv)).to(out.dtype)


def salad_linear_add_torch(
    out: torch.Tensor,
    q: torch.Tensor,
    state: torch.Tensor,
    z: torch.Tensor,
    proj_weight: torch.Tensor,
    linear_scale: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> None:
    """out += c * O_l W_p^T over head-merged rows (Alg. 1): the linear half in fp32, its sum with
    out (the sparse half, already rounded) rounded once into out."""
    b, h = out.shape[:2]
    lin = linear_apply_torch(q, state, z, eps)  # rounded to q's dtype, as the unfused path feeds Proj
    proj = rearrange(lin.float(), "b h n d -> b n (h d)") @ proj_weight.float().t()
    if linear_scale is not None:
        proj = proj * linear_scale.float().view(b, 1, 1)
    out.copy_(out.float() + rearrange(proj, "b n (h d) -> b h n d", h=h))
