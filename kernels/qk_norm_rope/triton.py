"""One Triton pass for q/k RMSNorm + RoPE: reads the projection once (bf16), writes the
RoPE'd [B, N, H, D] tensor once. The stock path makes ~6 passes, 4 of them in fp32.

One program per token row: sum of squares over all C channels in fp32, scale by rsqrt and
the norm weight, round to x's dtype (as the stock RMSNorm output is), then rotate each
(even, odd) pair with the token's 2x2 RoPE matrix in fp32 and round once more."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, f_ptr, out_ptr,
    stride_xb, stride_xn, stride_fb, stride_fn, stride_ob, stride_on,
    n_tokens, eps,
    C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    bi = row // n_tokens
    ni = row % n_tokens
    p = tl.arange(0, BLOCK)  # pair index over the row: channel 2p and 2p + 1
    ok = p < C // 2
    x_row = x_ptr + bi * stride_xb + ni * stride_xn
    x0 = tl.load(x_row + 2 * p, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x0 * x0, 0) + tl.sum(x1 * x1, 0)) / C + eps)
    w0 = tl.load(w_ptr + 2 * p, mask=ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * p + 1, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y0 = (x0 * rstd * w0).to(dt).to(tl.float32)
    y1 = (x1 * rstd * w1).to(dt).to(tl.float32)
    # freqs[b, n, 0, j, r, c] for pair j = p % (D/2) of its head: out_r = f[r,0] y0 + f[r,1] y1
    f_row = f_ptr + bi * stride_fb + ni * stride_fn + (p % HALF_D) * 4
    f00 = tl.load(f_row, mask=ok, other=0.0).to(tl.float32)
    f01 = tl.load(f_row + 1, mask=ok, other=0.0).to(tl.float32)
    f10 = tl.load(f_row + 2, mask=ok, other=0.0).to(tl.float32)
    f11 = tl.load(f_row + 3, mask=ok, other=0.0).to(tl.float32)
    o_row = out_ptr + bi * stride_ob + ni * stride_on
    tl.store(o_row + 2 * p, (f00 * y0 + f01 * y1).to(dt), mask=ok)
    tl.store(o_row + 2 * p + 1, (f10 * y0 + f11 * y1).to(dt), mask=ok)


def qk_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:
    b, n, c = x.shape
    d = c // num_heads
    if x.stride(-1) != 1:
        x = x.contiguous()
    f = freqs
    if f.shape[-3:] != (d // 2, 2, 2) or f.shape[1] != n:
        raise ValueError(f"Expected RoPE freqs [B, {n}, 1, {d // 2}, 2, 2], got {tuple(f.shape)}. Try backend='torch'.")
    if f.stride(-1) != 1 or f.stride(-2) != 2 or f.stride(-3) != 4:
        f = f.contiguous()
    w = weight.to(device=x.device).contiguous()
    out = torch.empty(b, n, num_heads, d, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(c // 2)
    _qk_norm_rope_kernel[(b * n,)](
        x, w, f, out,
        x.stride(0), x.stride(1), f.stride(0) if f.shape[0] > 1 else 0, f.stride(1),
        out.stride(0), out.stride(1),
        n, float(eps),
        C=c, HALF_D=d // 2, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out
