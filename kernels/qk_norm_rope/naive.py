"""Reference: ComfyUI's Wan q/k path, written out. ``comfy.rmsnorm.rms_norm`` (torch's
``rms_norm`` over the whole C = H * D channels, weight cast to x's dtype), then
``comfy.ldm.flux.math.apply_rope1`` per head in the freqs' dtype (fp32), result in x's dtype."""

from __future__ import annotations

import torch


def qk_norm_rope_torch(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:
    """x [B, N, C] (the q or k projection), weight [C], freqs [B or 1, N, 1, D/2, 2, 2].

    Returns [B, N, H, D] in x's dtype, equal to ``apply_rope1(norm(x).view(B, N, H, D), freqs)``."""
    b, n, c = x.shape
    y = torch.nn.functional.rms_norm(x, (c,), weight=weight.to(device=x.device, dtype=x.dtype), eps=eps)
    y = y.view(b, n, num_heads, c // num_heads)
    y_ = y.to(freqs.dtype).reshape(*y.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * y_[..., 0]
    out.addcmul_(freqs[..., 1], y_[..., 1])
    return out.reshape(*y.shape).type_as(y)


def qk_norm_rope_backward_torch(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """dL/dx of ``qk_norm_rope_torch``: autograd through the reference (recomputed here)."""
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        out = qk_norm_rope_torch(xd, weight.detach(), freqs.detach(), num_heads, eps)
        return torch.autograd.grad(out, xd, grad)[0]


def qk_norm_rope_weight_grad(grad: torch.Tensor, x: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dweight [C] in fp32: sum over tokens of (F^T dy) * x * rstd. Only for a norm weight
    that requires grad (SALAD training keeps it frozen), so plain torch, not a kernel."""
    b, n, c = x.shape
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    # dy pair (r) back through the token's 2x2 rotation: dn_c = sum_r F[r, c] dy_r
    dy = grad.float().reshape(*grad.shape[:-1], -1, 2, 1)
    dn = (freqs.float() * dy).sum(-2).reshape(b, n, c)
    return (dn * xf * rstd).sum((0, 1))
