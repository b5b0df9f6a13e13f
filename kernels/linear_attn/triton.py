"""Triton ReLU linear attention (paper eq. 3) with fp32 state.

1. ``_state_kernel``: split-N reduction of S = sum_j relu(k_j)^T v_j ([D, Dv]) and
   z = sum_j relu(k_j) ([D]) per (batch, head), fp32 accumulate, fp32 atomic adds across splits.
2. ``_apply_kernel``: per query tile, relu(q) S / (relu(q) z + eps). The fp32 state is split
   into hi + lo 16-bit halves (``linear_prepare``), so two tensor-core products keep ~16
   mantissa bits; optional per-sample ``out_scale`` (e.g. the SALAD gate) fused into the store.
   (v1 used a 3xTF32 fp32 product: 0.82 ms at the 1.3B shape, register-bound.)
(An apply step in the sparse kernel's epilogue was slower: register pressure in its main loop.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse_attn.triton import cast_out, interpreting
from ..layout import out_like, rowmajor
from .naive import DEFAULT_EPS

STATE_ROWS_PER_PROGRAM = 1024


# Tests set this: outputs start as NaN so an unwritten element can't pass.
POISON_OUTPUTS = False


@triton.jit
def _state_kernel(
    K, V, S, Z,
    skb, skh, skn, svb, svh, svn,
    H, N, ROWS,
    BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DOT_F32: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    acc = tl.zeros([D, DV], tl.float32)
    zacc = tl.zeros([D], tl.float32)
    start = split * ROWS
    for r in range(start, tl.minimum(start + ROWS, N), BN):
        rows = r + offs_n
        ok = rows < N
        kt = tl.load(K + b * skb + h * skh + rows[None, :] * skn + offs_d[:, None], mask=ok[None, :], other=0.0)
        kt = tl.maximum(kt, 0.0).to(V.dtype.element_ty)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_dv[None, :], mask=ok[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter multiplies bf16 as raw uint16: upcast there only
            acc += tl.dot(kt.to(tl.float32), v.to(tl.float32))
        else:
            acc += tl.dot(kt, v)
        zacc += tl.sum(kt.to(tl.float32), 1)
    tl.atomic_add(S + bh * D * DV + offs_d[:, None] * DV + offs_dv[None, :], acc)
    tl.atomic_add(Z + bh * D + offs_d, zacc)


@triton.jit
def _apply_kernel(
    Q, SHI, SLO, Z, EPS, O, SCALE,
    sqb, sqh, sqn, sob, soh, son,
    H, N,
    BM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BM + tl.arange(0, BM)
    ok = rows < N
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=ok[:, None], other=0.0)
    # relu(q) S / (relu(q) z + eps) [* scale[b]] (paper eq. 3), S = hi + lo (linear_prepare)
    fq = tl.maximum(q, 0.0).to(q.dtype)  # relu is exact in q's dtype
    s_off = bh * D * DV + offs_d[:, None] * DV + offs_dv[None, :]
    hi = tl.load(SHI + s_off)
    lo = tl.load(SLO + s_off)
    if DOT_F32:  # the CPU interpreter multiplies bf16 as raw uint16: upcast there only
        num = tl.dot(fq.to(tl.float32), hi.to(tl.float32)) + tl.dot(fq.to(tl.float32), lo.to(tl.float32))
    else:
        num = tl.dot(fq, hi) + tl.dot(fq, lo)
    z = tl.load(Z + bh * D + offs_d)
    den = tl.sum(fq.to(tl.float32) * z[None, :], 1) + tl.load(EPS + bh)
    out = num / den[:, None]
    if HAS_SCALE:
        out = out * tl.load(SCALE + b).to(tl.float32)
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :],
             cast_out(out, O.dtype.element_ty, DOT_F32), mask=ok[:, None])


def linear_prepare(state: torch.Tensor, z: torch.Tensor, eps: float, dtype: torch.dtype):
    """Split the fp32 state for two 16-bit tensor-core products: S/c = hi + lo (hi, lo in
    ``dtype``, ~16 mantissa bits together), with c = max|S| per head so fp16 cannot overflow.
    The ratio relu(q) S / (relu(q) z + eps) is unchanged by dividing S, z and eps by c.
    Returns (hi, lo [B, H, D, Dv] dtype; z/c fp32 [B, H, D]; eps/c fp32 [B, H])."""
    c = state.abs().amax(dim=(-2, -1)).clamp_min(1e-30)
    sn = state / c[..., None, None]
    hi = sn.to(dtype)
    lo = (sn - hi.float()).to(dtype)
    return hi, lo, (z / c[..., None]).contiguous(), (eps / c).contiguous()


def linear_state_triton(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S fp32 [B, H, D, Dv], z fp32 [B, H, D]), contiguous."""
    b, h, n, d = k.shape
    dv = v.shape[-1]
    k, v = rowmajor(k), rowmajor(v)
    state = torch.zeros(b, h, d, dv, device=k.device, dtype=torch.float32)
    z = torch.zeros(b, h, d, device=k.device, dtype=torch.float32)
    rows = STATE_ROWS_PER_PROGRAM
    bn = 64 if n >= 64 else 16
    _state_kernel[(triton.cdiv(n, rows), b * h)](
        k, v, state, z,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h, n, rows, BN=bn, D=d, DV=dv, DOT_F32=interpreting(), num_warps=8 if d * dv >= 128 * 128 else 4, num_stages=3,
    )
    return state, z


def linear_apply_triton(q, state, z, eps=DEFAULT_EPS, out_scale: torch.Tensor | None = None):
    """relu(q) S / (relu(q) z + eps), times ``out_scale`` (fp32 [B], optional) per sample."""
    return linear_apply_prepared(q, linear_prepare(state, z, eps, q.dtype), out_scale)


def linear_apply_prepared(q, prepared, out_scale: torch.Tensor | None = None):
    """linear_apply_triton with the state already split by ``linear_prepare`` (callers that
    apply one state to several row ranges split it once)."""
    b, h, n, d = q.shape
    q = rowmajor(q)
    hi, lo, zn, epsn = prepared
    dv = hi.shape[-1]
    out = out_like(q, dv)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if out_scale is not None:
        out_scale = out_scale.to(torch.float32).contiguous()
    bm = 64
    _apply_kernel[(triton.cdiv(n, bm), b * h)](
        q, hi, lo, zn, epsn, out, out_scale if out_scale is not None else zn,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, n, BM=bm, D=d, DV=dv, HAS_SCALE=out_scale is not None, DOT_F32=interpreting(),
        num_warps=4, num_stages=2,
    )
    return out


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Same contract as linear_attention_torch."""
    state, z = linear_state_triton(k, v)
    return linear_apply_triton(q, state, z, eps)
