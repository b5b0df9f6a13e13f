"""``salad::qk_norm_rope`` custom op (fake implementation for torch.compile), dispatched
through the backend registry like the other SALAD ops."""

from __future__ import annotations

import torch

from ..registry import implementation


@torch.library.custom_op("salad::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float, backend: str
) -> torch.Tensor:
    return implementation("qk_norm_rope", backend, x.device)(x, weight, freqs, num_heads, eps)


@_qk_norm_rope_op.register_fake
def _(x, weight, freqs, num_heads, eps, backend):
    b, n, c = x.shape
    return x.new_empty((b, n, num_heads, c // num_heads))


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm over x's C channels (weight [C]) then Wan's 3D RoPE per head.

    x [B, N, C] -> [B, N, H, D] contiguous, x's dtype; freqs [B or 1, N, 1, D/2, 2, 2]."""
    return _qk_norm_rope_op(x, weight, freqs, int(num_heads), float(eps), backend)
