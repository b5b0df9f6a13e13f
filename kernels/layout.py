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
    if _wan_layout(q):
        return torch.empty(b, n, h, dv, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(b, h, n, dv, dtype=dtype, device=q.device)


def rowmajor(x: torch.Tensor) -> torch.Tensor:
    """x if its last dimension is contiguous (what the Triton kernels index), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _wan_layout(q: torch.Tensor) -> bool:
    b, h, n, _ = q.shape
    return h > 1 and n > 1 and q.stride(1) < q.stride(2)


def into_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x if it already has ``out_like(like)``'s strides, else a copy laid out that way.

    Checks strides without allocating (an extra output-sized buffer would double peak memory)."""
    b, h, n, dv = x.shape
    if _wan_layout(like):
        want = (n * h * dv, dv, h * dv, 1)
    else:
        want = (h * n * dv, n * dv, dv, 1)
    if x.stride() == want or x.numel() == 0:
        return x
    return out_like(like, dv, x.dtype).copy_(x)
