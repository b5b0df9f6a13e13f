"""Triton backward of ReLU linear attention (paper eq. 3; training, issue 8).

With phi = relu, S = sum_j phi(k_j)^T v_j [D, Dv], z = sum_j phi(k_j) [D],
den_i = phi(q_i) . z + eps and o_i = phi(q_i) S / den_i, the gradients given dO are, with
t_i = dO_i S^T and a_i = dO_i . o_i = phi(q_i) . t_i / den_i:

    dq_i = (t_i - a_i z) / den_i * [q_i > 0]
    dS   = sum_i phi(q_i)^T dO_i / den_i          dz = -sum_i phi(q_i) a_i / den_i
    dk_j = (v_j dS^T + dz) * [k_j > 0]            dv_j = phi(k_j) dS

1. S, z: the forward's split-N state kernel (linear_attn/triton.py), recomputed from k and v.
2. ``_dq_kernel``, per (range of rows, batch x head): dq, and dS^T, dz summed in fp32 over the
   range, fp32 atomic adds across ranges.
3. ``_dkdv_kernel``, per (range of rows, batch x head): dk and dv.

Every N-long product runs on tensor cores in the inputs' 16-bit dtype: its [N, D] operand is
exact there (q, k, v, dO or their relu) and its fp32 operand is split into 16-bit halves,
hi + lo (~16 mantissa bits, as the forward's apply), scaled by a power of two so fp16 cannot
overflow. Nothing of size [N, D] is made in fp32; the extra memory is S, dS^T (fp32
[B, H, D, Dv]) and z, dz. fp32 inputs take the torch formulas instead (naive.py): they are
already fp32, and cuBLAS multiplies them exactly where these kernels would round to 16 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse_attn.triton import cast_out, interpreting
from ..layout import out_like, rowmajor
from .naive import DEFAULT_EPS
from .triton import linear_state_triton

# What the kernels take: tl.arange and tl.dot need power-of-two dims >= 16; the fp32 [Dv, D]
# dS^T accumulator of D = 128 already takes 64 registers a thread at 8 warps.
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)
# Launch settings, not swept: the GPU tests pass on an H100 and the training step uses them
# (bench/results/train-NOTES.md); bench/attention.py's linear_bwd case times them but has not run
# yet. The sm_90 code for D = Dv = 128 keeps its registers (ptxas: dq 240 a thread, no spills;
# dk/dv 255, 56 bytes spilled), pipelines the tile loads and uses wgmma for the products with 128
# rows. 64-row dq tiles spilled 280 bytes; 32-row dk/dv tiles fell back to mma.sync.
DQ_LAUNCH = dict(BN=32, num_stages=2)
DKDV_LAUNCH = dict(BN=64, num_warps=4, num_stages=2)
# Rows per dq and dk/dv program (their dS^T and dz partials meet in fp32 atomics).
ROWS_PER_PROGRAM = 1024
# This backward is chosen by SALAD_BACKWARD_BACKEND (kernels/autograd.py), so errors point there.
ADVICE = "Try SALAD_BACKWARD_BACKEND=torch."

# Tests set this: gradients start as NaN so an unwritten element can't pass.
POISON_OUTPUTS = False


def unsupported_reason(dtype: torch.dtype, head_dim: int, value_dim: int) -> str | None:
    """Why these kernels cannot take such inputs ("Expected ..., got ..."), or None if they can.
    Needs no tensors, so kernels/autograd.py can decide from q's metadata (also fake tensors)."""
    if dtype not in DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"Expected a dtype in (float16, bfloat16) for the Triton linear-attention backward, got {name}"
    if head_dim not in HEAD_DIMS or value_dim not in HEAD_DIMS:
        return (f"Expected head dims in {HEAD_DIMS} for the Triton linear-attention backward, "
                f"got {head_dim} (q, k) and {value_dim} (v)")
    return None


@triton.jit
def _split(x, dtype: tl.constexpr):
    """fp32 x = m (hi + lo) with hi, lo in the 16-bit ``dtype`` (two products then keep ~16
    mantissa bits) and m the power of two above max|x|: exact scaling, no fp16 overflow."""
    top = tl.max(tl.max(tl.abs(x), 1), 0).to(tl.int32, bitcast=True)
    m = ((top & 0x7F800000) + 0x00800000).to(tl.float32, bitcast=True)
    xs = x / m
    hi = xs.to(dtype)
    lo = (xs - hi.to(tl.float32)).to(dtype)
    return hi, lo, m


@triton.jit
def _dot_split(a, hi, lo, m, DOT_F32: tl.constexpr):
    """a @ (m (hi + lo)) in fp32, for ``a`` exact in hi's dtype (see _split)."""
    if DOT_F32:  # the CPU interpreter multiplies bf16 as raw uint16: upcast there only
        a = a.to(tl.float32)
        return tl.dot(a, lo.to(tl.float32), tl.dot(a, hi.to(tl.float32))) * m
    return tl.dot(a, lo, tl.dot(a, hi)) * m


@triton.jit
def _dq_kernel(
    Q, DO, S, Z, DQ, DST, DZ,
    sqb, sqh, sqn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    H, N, ROWS, eps,
    BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DOT_F32: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    dtype = Q.dtype.element_ty
    # S^T [Dv, D], split once for the whole range (t = dO S^T)
    st_hi, st_lo, st_m = _split(tl.load(S + bh * D * DV + offs_d[None, :] * DV + offs_dv[:, None]), dtype)
    z = tl.load(Z + bh * D + offs_d)
    dst = tl.zeros([DV, D], tl.float32)
    dz = tl.zeros([D], tl.float32)
    start = split * ROWS
    for r in range(start, tl.minimum(start + ROWS, N), BN):
        rows = r + offs_n
        ok = rows < N
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdon + offs_dv[None, :], mask=ok[:, None], other=0.0)
        fq = tl.maximum(q.to(tl.float32), 0.0)
        den = tl.sum(fq * z[None, :], 1) + eps  # eq. 3's denominator, as the forward's
        t = _dot_split(do, st_hi, st_lo, st_m, DOT_F32)
        a = tl.sum(fq * t, 1) / den  # dO . o
        dq = tl.where(q > 0, (t - a[:, None] * z[None, :]) / den[:, None], 0.0)
        tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + offs_d[None, :],
                 cast_out(dq, DQ.dtype.element_ty, DOT_F32), mask=ok[:, None])
        p = fq / den[:, None]  # masked rows: 0
        p_hi, p_lo, p_m = _split(p, dtype)
        dst += _dot_split(tl.trans(do), p_hi, p_lo, p_m, DOT_F32)
        dz -= tl.sum(p * a[:, None], 0)
    tl.atomic_add(DST + bh * DV * D + offs_dv[:, None] * D + offs_d[None, :], dst)
    tl.atomic_add(DZ + bh * D + offs_d, dz)


@triton.jit
def _dkdv_kernel(
    K, V, DST, DZ, DK, DVO,
    skb, skh, skn, svb, svh, svn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
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
    dtype = K.dtype.element_ty
    # dS^T [Dv, D] for dk = v dS^T; its transpose dS for dv = phi(k) dS
    st_hi, st_lo, m = _split(tl.load(DST + bh * DV * D + offs_dv[:, None] * D + offs_d[None, :]), dtype)
    s_hi, s_lo = tl.trans(st_hi), tl.trans(st_lo)
    dz = tl.load(DZ + bh * D + offs_d)
    start = split * ROWS
    for r in range(start, tl.minimum(start + ROWS, N), BN):
        rows = r + offs_n
        ok = rows < N
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_dv[None, :], mask=ok[:, None], other=0.0)
        dk = tl.where(k > 0, _dot_split(v, st_hi, st_lo, m, DOT_F32) + dz[None, :], 0.0)
        tl.store(DK + b * sdkb + h * sdkh + rows[:, None] * sdkn + offs_d[None, :],
                 cast_out(dk, DK.dtype.element_ty, DOT_F32), mask=ok[:, None])
        dv = _dot_split(tl.maximum(k, 0.0).to(dtype), s_hi, s_lo, m, DOT_F32)
        tl.store(DVO + b * sdvb + h * sdvh + rows[:, None] * sdvn + offs_dv[None, :],
                 cast_out(dv, DVO.dtype.element_ty, DOT_F32), mask=ok[:, None])


def linear_attention_backward_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``linear_attention`` (any backend: they all compute the same function).

    Any [B, H, N, D] strides; gradients come back in each input's dtype and layout (a Wan
    [B, N, H, D] view stays one)."""
    problem = unsupported_reason(q.dtype, q.shape[-1], v.shape[-1])
    if problem is None and k.shape[-1] != q.shape[-1]:
        problem = f"Expected k's head dim equal to q's ({q.shape[-1]}), got {k.shape[-1]}"
    if problem is not None:
        raise ValueError(f"{problem}. {ADVICE}")
    if len({t.dtype for t in (q, k, v, grad_out)}) != 1:
        raise ValueError(
            "Expected q, k, v and grad_out in one dtype, got "
            f"{[str(t.dtype) for t in (q, k, v, grad_out)]}. Try casting them to q's dtype."
        )
    b, h, n, d = q.shape
    dv_dim = v.shape[-1]
    # Allocated from the caller's tensors, so the layout matches the custom op's fake.
    dq, dk, dv = out_like(q, d), out_like(k, d), out_like(v, dv_dim)
    if POISON_OUTPUTS:
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    q, k, v, grad_out = (rowmajor(t) for t in (q, k, v, grad_out))
    state, z = linear_state_triton(k, v)
    dst = torch.zeros(b, h, dv_dim, d, device=q.device, dtype=torch.float32)
    dz = torch.zeros(b, h, d, device=q.device, dtype=torch.float32)
    rows = ROWS_PER_PROGRAM
    grid = (triton.cdiv(n, rows), b * h)
    shapes = dict(D=d, DV=dv_dim, DOT_F32=interpreting())
    _dq_kernel[grid](
        q, grad_out, state, z, dq, dst, dz,
        q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, n, rows, float(eps), **shapes, **DQ_LAUNCH, num_warps=8 if d * dv_dim >= 128 * 128 else 4,
    )
    _dkdv_kernel[grid](
        k, v, dst, dz, dk, dv,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        h, n, rows, **shapes, **DKDV_LAUNCH,
    )
    return dq, dk, dv
