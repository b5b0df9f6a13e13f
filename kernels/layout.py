"""Output layout shared by every backend and the custom ops' fake implementations."""

from __future__ import annotations

import torch


def out_like(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empty [B, H, N, dv] output laid out like q.

    When q is a [B, H, N, D] view of a [B, N, H, D] tensor (Wan's layout), the output is such a
    view too, so ``out.transpose(1, 2).reshape(B, N, H * dv)`` costs no copy. Otherwise it is
    contiguous. Real and fake (torch.compile) implementations both use this, so strides agree.
    """
    b, h, n, _ = q.shape
    dtype = q.dtype if dtype is None else dtype
    if h > 1 and n > 1 and q.stride(1) < q.stride(2):
        return torch.empty(b, n, h, dv, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(b, h, n, dv, dtype=dtype, device=q.device)


def into_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x if it already has ``out_like(like)``'s strides, else a copy laid out that way."""
    target = out_like(like, x.shape[-1], x.dtype)
    if x.stride() == target.stride():
        return x
    return target.copy_(x)
