"""Triton ReLU linear attention (paper eq. 3) with fp32 state.

1. ``_state_kernel``: split-N reduction of S = sum_j relu(k_j)^T v_j ([D, Dv]) and
   z = sum_j relu(k_j) ([D]) per (batch, head), fp32 accumulate. Each program writes its own
   fp32 partial; torch sums the partials (deterministic, and no fp32 atomics queueing on the
   same 64 KB). Column sums (z, and the Top-K pooling of q and k when asked: one pass instead
   of a separate pooling kernel) are tensor-core products with a ones tile.
2. ``_apply_kernel``: per query tile, relu(q) S / (relu(q) z + eps). The fp32 state is split
   into hi + lo 16-bit halves (``linear_prepare``), so two tensor-core products keep ~16
   mantissa bits (the standalone linear op, ``salad::linear_attention``).
   (v1 used a 3xTF32 fp32 product: 0.82 ms at the 1.3B shape, register-bound.)
3. ``_features_kernel`` + ``linear_fold_projection`` (SALAD's combine, ``kernels.salad_attention``): Alg. 1 projects the
   head-merged linear output, O_l W^T = sum_h relu(q_h) (S_h W_h^T) / den_h, so the projection
   is folded into the state ((S_hd / z_hd) W_h^T per head row d) and each row only needs its
   features relu(q_hd) z_hd / den_h in [0, 1]: one bandwidth pass over q and one GEMM, no apply
   products.
(An apply step in the sparse kernel's epilogue was slower: register pressure in its main loop.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse_attn.triton import cast_out, interpreting
from ..layout import out_like, rowmajor
from .naive import DEFAULT_EPS

# Rows per state program. H100 sweep (bench/results/linear-h100-s5-state.json), 1.3B / 14B:
# 1024 rows + fp32 atomics (session 4) 0.19 / 0.98 ms; 2048 rows, 4 warps, partials 0.13 / 0.70;
# + z as a ones product 0.10 / 0.64; + q and k pooling 0.14 / 0.93 (pooling alone: 0.12 / 0.68).
STATE_ROWS = 2048
# At most this many state programs (splits x B x H): when B x H is large (14B: 40 heads), splits
# get more rows instead, so the fp32 partials, the pass's only workspace, stay small (14B: 37
# splits, 97 MB -> 13, 34 MB). The pass peaks with q, k, v and the block's input alive.
STATE_PROGRAMS = 512


# Tests set this: outputs start as NaN so an unwritten element can't pass.
POISON_OUTPUTS = False


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """a @ b, fp32 accumulate. DOT_F32: the CPU interpreter multiplies bf16 as raw uint16, so
    operands are upcast there only; IEEE: fp32 operands (an fp32 model) multiply in full fp32,
    not TF32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _column_sums(x, ones, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """fp32 sums over the rows of x [BN, D] as a tensor-core product with ones [BN, 16] (every
    column of the product is the same exact sum; max picks one): a plain tl.sum over rows
    costs ~30 % of the state kernel at 1.3B in layout shuffles."""
    return tl.max(_dot(tl.trans(x), ones, DOT_F32, IEEE), 1)


@triton.jit
def _state_kernel(
    Q, K, V, SP, ZP, QP, KPT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, NB, ROWS,
    BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, POOL: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B * N * C can pass 2^31
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    acc = tl.zeros([D, DV], tl.float32)
    zacc = tl.zeros([D], tl.float32)
    ones = tl.full([BN, 16], 1.0, tl.float32).to(V.dtype.element_ty)
    start = split * ROWS
    for r in range(start, tl.minimum(start + ROWS, N), BN):
        rows = r + offs_n
        ok = rows < N
        k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + offs_d[None, :], mask=ok[:, None], other=0.0)
        fk = tl.maximum(k, 0.0).to(V.dtype.element_ty)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_dv[None, :], mask=ok[:, None], other=0.0)
        acc += _dot(tl.trans(fk), v, DOT_F32, IEEE)
        zacc += _column_sums(fk, ones, DOT_F32, IEEE)
        if POOL:  # BN = the selection's block size and ROWS a multiple of it: one block a step
            blk = r // BN
            count = tl.minimum(N - r, BN).to(tl.float32)
            tl.store(KPT + bh * D * NB + offs_d * NB + blk, _column_sums(k, ones, DOT_F32, IEEE) / count)
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=ok[:, None], other=0.0)
            tl.store(QP + (bh * NB + blk) * D + offs_d, _column_sums(q, ones, DOT_F32, IEEE) / count)
    part = split * tl.num_programs(1) + bh
    tl.store(SP + part * D * DV + offs_d[:, None] * DV + offs_dv[None, :], acc)
    tl.store(ZP + part * D + offs_d, zacc)


@triton.jit
def _head_rows(Q, sqb, sqh, sqn, H, N, BM: tl.constexpr, D: tl.constexpr):
    """This program's tile of query rows (program ids: row tile, b * H + h): (bh, b as int64, h,
    rows, rows < N, q [BM, D] with zeros past N)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B * N * C can pass 2^31
    h = bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
    return bh, b, h, rows, ok, q


@triton.jit
def _apply_kernel(
    Q, SHI, SLO, Z, EPS, O,
    sqb, sqh, sqn, sob, soh, son,
    H, N,
    BM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DOT_F32: tl.constexpr,
):
    bh, b, h, rows, ok, q = _head_rows(Q, sqb, sqh, sqn, H, N, BM, D)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    # relu(q) S / (relu(q) z + eps) (paper eq. 3), S = hi + lo (linear_prepare)
    fq = tl.maximum(q, 0.0).to(q.dtype)  # relu is exact in q's dtype
    s_off = bh * D * DV + offs_d[:, None] * DV + offs_dv[None, :]
    num = _dot(fq, tl.load(SHI + s_off), DOT_F32, False) + _dot(fq, tl.load(SLO + s_off), DOT_F32, False)
    z = tl.load(Z + bh * D + offs_d)
    den = tl.sum(fq.to(tl.float32) * z[None, :], 1) + tl.load(EPS + bh)
    out = num / den[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :],
             cast_out(out, O.dtype.element_ty, DOT_F32), mask=ok[:, None])


@triton.jit
def _features_kernel(
    Q, Z, F, SCALE,
    sqb, sqh, sqn, sfb, sfn,
    H, N, eps,
    BM: tl.constexpr, D: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    bh, b, h, rows, ok, q = _head_rows(Q, sqb, sqh, sqn, H, N, BM, D)
    offs_d = tl.arange(0, D)
    # relu(q_d) z_d / (relu(q) z + eps) [* scale[b]]: eq. 3's weights on the rows S_d / z_d of the
    # folded state; each lies in [0, 1], so no dtype can overflow.
    w = tl.maximum(q.to(tl.float32), 0.0) * tl.load(Z + bh * D + offs_d)[None, :]
    inv = 1.0 / (tl.sum(w, 1) + eps)
    if HAS_SCALE:
        inv = inv * tl.load(SCALE + b)
    tl.store(F + b * sfb + rows[:, None] * sfn + h * D + offs_d[None, :],
             cast_out(w * inv[:, None], F.dtype.element_ty, EMULATE_RNE), mask=ok[:, None])


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
    state, z, _, _ = _launch_state(None, k, v, None)
    return state, z


# Pooling walks one block per step of the state loop, so the block is the loop's row tile.
POOL_BLOCK_SIZES = (16, 32, 64, 128)


def linear_state_pooled_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int):
    """(S, z) as ``linear_state_triton`` plus the Top-K selection's mean-pooled blocks from the
    same pass: (fp32 [B, H, nb, D] pooled q, fp32 [B, H, D, nb] pooled k transposed), as
    ``block_select.triton.mean_pool_blocks_triton`` returns them. H100: 0.14 ms at 1.3B
    against 0.13 + 0.12 ms for the state and pooling kernels apart (linear-h100-s5-state.json).
    (q, k, v shapes are checked by the public op, ``kernels.linear_state_pooled``.)"""
    if block_size not in POOL_BLOCK_SIZES:
        raise ValueError(f"Expected block_size in {POOL_BLOCK_SIZES}, got {block_size}. Try backend='torch'.")
    return _launch_state(q, k, v, block_size)


def _launch_state(q, k, v, block_size):
    b, h, n, d = k.shape
    dv = v.shape[-1]
    k, v = rowmajor(k), rowmajor(v)
    pool = block_size is not None
    bn = block_size if pool else (64 if n >= 64 else 16)
    # Each split holds whole row tiles (and whole blocks when pooling).
    splits = max(1, min(triton.cdiv(n, STATE_ROWS), triton.cdiv(STATE_PROGRAMS, b * h)))
    rows = max(bn, triton.cdiv(triton.cdiv(n, splits), bn) * bn)
    splits = triton.cdiv(n, rows)
    # Every program writes its whole partial, so no poisoning is needed to catch gaps.
    parts = torch.empty(splits, b, h, d, dv, device=k.device, dtype=torch.float32)
    z_parts = torch.empty(splits, b, h, d, device=k.device, dtype=torch.float32)
    if pool:
        q = rowmajor(q)
        nb = triton.cdiv(n, block_size)
        qp = torch.empty(b, h, nb, d, device=k.device, dtype=torch.float32)
        kpt = torch.empty(b, h, d, nb, device=k.device, dtype=torch.float32)
        if POISON_OUTPUTS:
            qp.fill_(float("nan"))
            kpt.fill_(float("nan"))
    else:
        q, qp, kpt, nb = k, parts, parts, 1  # unused by the POOL=False kernel
    _state_kernel[(splits, b * h)](
        q, k, v, parts, z_parts, qp, kpt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        h, n, nb, rows, BN=bn, D=d, DV=dv, POOL=pool, DOT_F32=interpreting(),
        IEEE=v.dtype == torch.float32, num_warps=4, num_stages=2 if pool else 3,
    )
    return parts.sum(0), z_parts.sum(0), (qp if pool else None), (kpt if pool else None)


def linear_apply_triton(q, state, z, eps=DEFAULT_EPS):
    """relu(q) S / (relu(q) z + eps) in q's dtype and layout (S, z from linear_state_triton)."""
    b, h, n, d = q.shape
    q = rowmajor(q)
    hi, lo, zn, epsn = linear_prepare(state, z, eps, q.dtype)
    dv = hi.shape[-1]
    out = out_like(q, dv)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    bm = 64
    _apply_kernel[(triton.cdiv(n, bm), b * h)](
        q, hi, lo, zn, epsn, out,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, n, BM=bm, D=d, DV=dv, DOT_F32=interpreting(), num_warps=4, num_stages=2,
    )
    return out


def linear_fold_projection(state: torch.Tensor, z: torch.Tensor, proj_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proj folded into the state (Alg. 1): O_l W^T = sum_h sum_d f_hd (S_hd / z_hd) W_h^T with
    the features f_hd = relu(q_hd) z_hd / (relu(q_h) z_h + eps) of ``linear_features_triton``.

    Row d of S divided by z_d is a weighted mean of v rows (0 where z_d = 0, as S_d is then), so
    the folded rows are bounded by |v| |W| in any dtype, and the features lie in [0, 1]. The fold
    is one 16-bit batched product straight on W's head columns (a strided view, no copy of W);
    an fp32 fold (W cast and permuted) took 0.10 ms a layer at 1.3B. Returns W' [B, H * D, C_out]
    in ``dtype``, row h * D + d = (S_hd / z_hd) W_h^T."""
    b, h, d, dv = state.shape
    rows = torch.where(z[..., None] > 0, state / z[..., None].clamp_min(1e-30), 0.0).to(dtype)
    w_heads = proj_weight.to(dtype).view(proj_weight.shape[0], h, dv).permute(1, 2, 0)  # [H, Dv, C_out]
    folded = torch.matmul(rows.transpose(0, 1).reshape(h, b * d, dv), w_heads)  # [H, B * D, C_out]
    return folded.view(h, b, d, -1).transpose(0, 1).reshape(b, h * d, -1)


def linear_features_triton(q: torch.Tensor, z: torch.Tensor, eps: float, out_scale: torch.Tensor | None = None):
    """Head-merged rows relu(q_hd) z_hd / (relu(q_h) z_h + eps) [* out_scale[b]]: [B, N, H * D]
    contiguous in q's dtype (z fp32 [B, H, D]; see ``linear_fold_projection``)."""
    b, h, n, d = q.shape
    q = rowmajor(q)
    z = z.to(torch.float32).contiguous()
    f = torch.empty(b, n, h * d, device=q.device, dtype=q.dtype)
    if POISON_OUTPUTS:
        f.fill_(float("nan"))
    if out_scale is not None:
        out_scale = out_scale.to(torch.float32).contiguous()
    bm = 64
    _features_kernel[(triton.cdiv(n, bm), b * h)](
        q, z, f, out_scale if out_scale is not None else z,
        q.stride(0), q.stride(1), q.stride(2), f.stride(0), f.stride(1),
        h, n, float(eps), BM=bm, D=d, HAS_SCALE=out_scale is not None, EMULATE_RNE=interpreting(), num_warps=4,
    )
    return f


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Same contract as linear_attention_torch."""
    state, z = linear_state_triton(k, v)
    return linear_apply_triton(q, state, z, eps)
