"""Triton backward of block-sparse flash attention over a BlockSelection (training, issue 8).

FlashAttention-2's backward (Dao 2023, Alg. 2) restricted to the kept (query block, key block)
pairs. P is recomputed from q, k and the forward's fp32 log-sum-exp, so nothing of size [N, N]
is ever stored:

1. ``delta = rowsum(dO * O) - dLSE`` in fp32 (one program per (row tile, batch x head)).
   Subtracting the LSE output's gradient makes it exact for that output too, at no cost:
   dS = P * (dP - delta) + P * dLSE.
2. dK, dV: one program per (key tile, batch x head). Its K and V tiles and fp32 dK/dV
   accumulators stay resident while it loops over the query blocks that kept its key block,
   read from a CSR transpose of the selection (built in torch, O(nnz), sync-free). Each
   program owns its rows of dK/dV, so there are no atomics.
3. dQ: one program per (query tile, batch x head), looping over the query block's
   ``kv_indices`` exactly like the forward. Recomputing S and dP here (two more matmuls than
   a fused dQ with atomics) keeps the hot loops free of atomics and order-independent, so
   gradients are deterministic.

Tiles are min(block_size, 64) on each side: a 128-token block is walked as 2 x 2 tiles of 64.
Extra memory beyond the gradients: the CSR transpose (int32, about the size of kv_indices)
and delta (fp32 [B, H, N]). Per-head token orders (ST-SWA temporal heads) are read through
``token_order`` inside the kernels, like the forward's "gather" mode; see ``_launch_grads``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import out_like, rowmajor
from ..selection import BlockSelection, valid_mask
from .triton import LOG2E, cast_out, interpreting

LOG2E_JIT = tl.constexpr(LOG2E)  # the forward's LSE is natural-log; the kernels use exp2

# Tests set this: gradients (and delta) start as NaN so an unwritten element can't pass.
POISON_OUTPUTS = False

# Largest tile edge. 64 x 64 keeps the fp32 dK/dV accumulators of a D=128 tile in registers.
MAX_TILE = 64
# Launch settings per kernel and head dim, no autotuning (shapes vary per call in training).
# bench/attention_bwd.py --sweep on an H100 (1.3B shape, N 31200, D 128, Top-K 90%): dK/dV 4
# warps 3 stages + dQ 4 warps 2 stages 5.12 ms for the whole backward, against 9.08 ms with 8
# warps for both (8 warps was 1.3-2x slower in every pairing). D = 256 keeps 8 warps: its two
# fp32 [64, 256] accumulators need the registers.
NUM_WARPS_DKDV = {16: 4, 32: 4, 64: 4, 128: 4, 256: 8}
NUM_WARPS_DQ = {16: 4, 32: 4, 64: 4, 128: 4, 256: 8}
NUM_STAGES_DKDV = 3
NUM_STAGES_DQ = 2
HEAD_DIMS = tuple(NUM_WARPS_DKDV)
# What the kernels take (head dims: those with launch settings above; the forward's block sizes).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (16, 32, 64, 128)
# This backward is chosen by SALAD_BACKWARD_BACKEND (kernels/autograd.py), so errors point there.
ADVICE = "Try SALAD_BACKWARD_BACKEND=torch."


def unsupported_reason(dtype: torch.dtype, head_dim: int, value_dim: int, block_size: int) -> str | None:
    """Why these kernels cannot take such inputs ("Expected ..., got ..."), or None if they can.
    Needs no tensors, so kernels/autograd.py can decide from q's metadata (also fake tensors)."""
    if dtype not in DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"Expected a dtype in (float32, float16, bfloat16) for the Triton backward, got {name}"
    if head_dim not in HEAD_DIMS or value_dim not in HEAD_DIMS:
        return (f"Expected head dims in {HEAD_DIMS} for the Triton backward, "
                f"got {head_dim} (q, k) and {value_dim} (v)")
    if block_size not in BLOCK_SIZES:
        return f"Expected block_size in {BLOCK_SIZES} for the Triton backward, got {block_size}"
    if dtype == torch.float32 and max(head_dim, value_dim) > 128:
        # fp32 tiles at 256 need ~279 KB of shared memory per program (sm_90 has 227 KB)
        return (f"Expected head dims <= 128 for the Triton backward in float32, "
                f"got {head_dim} (q, k) and {value_dim} (v)")
    return None


@triton.jit
def _mma_operand(x, dtype: tl.constexpr, DOT_F32: tl.constexpr):
    """x rounded to the input dtype for tl.dot. Under the CPU interpreter (DOT_F32) the dot
    runs in fp32, so round and widen again: the interpreter multiplies bf16 as raw integers."""
    if DOT_F32:
        return cast_out(x, dtype, True).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _token_rows(order_row, pos, ok, HAS_ORDER: tl.constexpr):
    """Memory rows of working-order positions ``pos``: through the head's token order (ST-SWA
    temporal heads) when there is one, else the positions themselves."""
    rows = pos
    if HAS_ORDER:  # constexpr: one branch is compiled, so the two dtypes never meet
        rows = tl.load(order_row + pos, mask=ok, other=0)
    return rows


@triton.jit
def _bsa_bwd_delta_kernel(
    O, DO, GLSE, DELTA,
    sob, soh, son, sdob, sdoh, sdon, sgb, sgh,
    H, N,
    TILE: tl.constexpr, DV: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * TILE + tl.arange(0, TILE)
    ok = rows < N
    offs_dv = tl.arange(0, DV)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdon + offs_dv[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GLSE + b * sgb + h * sgh + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + rows, delta, mask=ok)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVG, QB_IDS, QB_START, QB_COUNT, ORDER,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    slb, slh, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, s_oh,
    H, N, NB, qk_scale, scale,
    BS: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_ORDER: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    SUB: tl.constexpr = BS // TILE  # tiles per block along one side
    pid_n = tl.program_id(0)  # key tile
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    pos_n = pid_n * TILE + offs
    n_ok = pos_n < N
    rows_n = _token_rows(ORDER + h * s_oh, pos_n, n_ok, HAS_ORDER)
    k = tl.load(K + b * skb + h * skh + rows_n[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + rows_n[:, None] * svn + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + b * slb + h * slh
    delta_base = DELTA + bh * N
    csr = bh * NB + pid_n // SUB
    start = tl.load(QB_START + csr)
    count = tl.load(QB_COUNT + csr)

    dk = tl.zeros([TILE, D], tl.float32)
    dv = tl.zeros([TILE, DV], tl.float32)
    # Key rows past N (k = v = 0) only produce garbage in their own dK/dV rows, which are
    # never stored; query rows past N load q = dO = 0 and so add nothing: no masks needed here.
    for j in range(count * SUB):
        q_block = tl.load(QB_IDS + start + j // SUB)
        pos_m = q_block * BS + (j % SUB) * TILE + offs
        m_ok = pos_m < N
        rows_m = _token_rows(ORDER + h * s_oh, pos_m, m_ok, HAS_ORDER)
        q = tl.load(q_base + rows_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        do = tl.load(do_base + rows_m[:, None] * sdon + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + rows_m, mask=m_ok, other=0.0) * LOG2E_JIT
        delta = tl.load(delta_base + rows_m, mask=m_ok, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Transposed scores (keys x queries), so dV += P^T dO and dK += dS^T Q need no transpose.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        dv += tl.dot(_mma_operand(p_t, Q.dtype.element_ty, DOT_F32), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(_mma_operand(ds_t, Q.dtype.element_ty, DOT_F32), q, input_precision=PRECISION)

    dk *= scale
    tl.store(DK + b * sdkb + h * sdkh + rows_n[:, None] * sdkn + offs_d[None, :],
             cast_out(dk, DK.dtype.element_ty, DOT_F32), mask=n_ok[:, None])
    tl.store(DVG + b * sdvb + h * sdvh + rows_n[:, None] * sdvn + offs_dv[None, :],
             cast_out(dv, DVG.dtype.element_ty, DOT_F32), mask=n_ok[:, None])


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KVI, KVC, ORDER,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    slb, slh, sdqb, sdqh, sdqn, s_ib, s_ih, s_im, s_cb, s_ch, s_oh,
    H, N, qk_scale, scale,
    BS: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_ORDER: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    SUB: tl.constexpr = BS // TILE
    pid_m = tl.program_id(0)  # query tile
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    pos_m = pid_m * TILE + offs
    m_ok = pos_m < N
    rows_m = _token_rows(ORDER + h * s_oh, pos_m, m_ok, HAS_ORDER)
    q = tl.load(Q + b * sqb + h * sqh + rows_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows_m[:, None] * sdon + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + rows_m, mask=m_ok, other=0.0) * LOG2E_JIT
    delta = tl.load(DELTA + bh * N + rows_m, mask=m_ok, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kvi = KVI + b * s_ib + h * s_ih + (pid_m // SUB) * s_im
    count = tl.load(KVC + b * s_cb + h * s_ch + pid_m // SUB)

    dq = tl.zeros([TILE, D], tl.float32)
    for j in range(count * SUB):
        key_block = tl.load(kvi + j // SUB)
        pos_n = key_block * BS + (j % SUB) * TILE + offs
        n_ok = pos_n < N
        rows_n = _token_rows(ORDER + h * s_oh, pos_n, n_ok, HAS_ORDER)
        k = tl.load(k_base + rows_n[:, None] * skn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + rows_n[:, None] * svn + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # Key columns past N must be zeroed: exp2(0 - lse) can overflow to inf, and inf * (k = 0)
        # would put NaN into real rows of dQ.
        p = tl.where(n_ok[None, :], tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_mma_operand(ds, Q.dtype.element_ty, DOT_F32), k, input_precision=PRECISION)

    dq *= scale
    tl.store(DQ + b * sdqb + h * sdqh + rows_m[:, None] * sdqn + offs_d[None, :],
             cast_out(dq, DQ.dtype.element_ty, DOT_F32), mask=m_ok[:, None])


def transpose_selection(selection: BlockSelection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the selection's transpose: for each (batch x head, key block), the query blocks
    that kept it.

    Returns (q_block_ids int32 [B*H*n_blocks*max_kv], start int32 [B*H*n_blocks],
    count int32 [B*H*n_blocks]); key block kb of head bh reads
    ``q_block_ids[start[bh*n_blocks + kb] :][: count[...]]``, ascending. O(nnz) memory, one sort,
    no host synchronisation (padding entries sort last and are never read).
    """
    b, h, nb, max_kv = selection.kv_indices.shape
    device = selection.kv_indices.device
    kept = valid_mask(selection)
    head = torch.arange(b * h, device=device).view(b, h, 1, 1)
    query_block = torch.arange(nb, device=device).view(1, 1, nb, 1)
    column = head * nb + selection.kv_indices.long()  # (batch x head, key block), flat
    # One int64 key per kept pair, ordered by (column, query block); padding gets the largest.
    n_columns = b * h * nb
    sort_key = torch.where(kept, column * nb + query_block, n_columns * nb).flatten()
    q_block_ids = (sort_key.sort().values % nb).to(torch.int32)
    counts = torch.zeros(n_columns + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, torch.where(kept, column, n_columns).flatten(), kept.flatten().to(torch.int32))
    counts = counts[:n_columns]
    starts = (counts.cumsum(0, dtype=torch.int32) - counts).contiguous()
    return q_block_ids, starts, counts.contiguous()


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def block_sparse_attention_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``block_sparse_attention`` given the forward's ``out`` and fp32 ``lse``.

    Any [B, H, N, D] strides; gradients come back in each input's dtype and layout (a Wan
    [B, N, H, D] view stays one). ``grad_lse`` (fp32 [B, H, N]) is the gradient of the LSE
    output, or None when nothing differentiates through it.
    """
    problem = unsupported_reason(q.dtype, q.shape[-1], v.shape[-1], selection.block_size)
    if problem is None and k.shape[-1] != q.shape[-1]:
        problem = f"Expected k's head dim equal to q's ({q.shape[-1]}), got {k.shape[-1]}"
    if problem is not None:
        raise ValueError(f"{problem}. {ADVICE}")
    if len({t.dtype for t in (q, k, v, out, grad_out)}) != 1:
        raise ValueError(
            "Expected q, k, v, out and grad_out in one dtype, got "
            f"{[str(t.dtype) for t in (q, k, v, out, grad_out)]}. Try casting them to q's dtype."
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Allocated from the caller's tensors, so the layout matches the custom op's fake.
    grads = out_like(q, q.shape[-1]), out_like(k, k.shape[-1]), out_like(v, v.shape[-1])
    q, k, v, out, grad_out, lse = (rowmajor(t) for t in (q, k, v, out, grad_out, lse))
    if grad_lse is not None:  # e.g. an expanded (stride 0) gradient of lse.sum()
        grad_lse = rowmajor(grad_lse)
    _launch_grads(grads, grad_out, q, k, v, out, lse, grad_lse, selection, scale)
    return grads


def _launch_grads(grads, grad_out, q, k, v, out, lse, grad_lse, selection, scale):
    """Fill grads = (dq, dk, dv): delta, then dK/dV, then dQ."""
    b, h, n, d = q.shape
    dv_dim = v.shape[-1]
    bs = selection.block_size
    tile = min(bs, MAX_TILE)
    n_tiles = triton.cdiv(n, tile)
    dot_f32 = interpreting()
    # fp32 inputs get true fp32 products (tl.dot would use TF32); 16-bit inputs are unaffected.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Token orders are gathered inside the kernels (rows read and written through token_order)
    # rather than by permuted copies of q, k, v, out, dO and dq, dk, dv: every row is written by
    # exactly one program, and it saves eight tensor-sized copies per layer.
    order = selection.token_order
    has_order = order is not None
    order = order.contiguous() if has_order else selection.kv_counts  # dummy pointer when unused
    order_stride = order.stride(0) if has_order else 0

    dq, dk, dv = grads
    delta = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    if POISON_OUTPUTS:
        for t in (dq, dk, dv, delta):
            t.fill_(float("nan"))

    has_grad_lse = grad_lse is not None
    glse = grad_lse if has_grad_lse else lse
    _bsa_bwd_delta_kernel[(n_tiles, b * h)](
        out, grad_out, glse, delta,
        *_strides3(out), *_strides3(grad_out), glse.stride(0), glse.stride(1),
        h, n,
        TILE=tile, DV=dv_dim, HAS_GRAD_LSE=has_grad_lse,
    )

    q_block_ids, q_block_start, q_block_count = transpose_selection(selection)
    common = dict(BS=bs, TILE=tile, D=d, DV=dv_dim, HAS_ORDER=has_order, DOT_F32=dot_f32,
                  PRECISION=precision)
    qkv_strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
                   lse.stride(0), lse.stride(1))
    qk_scale = scale * LOG2E
    _bsa_bwd_dkdv_kernel[(n_tiles, b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, q_block_ids, q_block_start, q_block_count, order,
        *qkv_strides, *_strides3(dk), *_strides3(dv), order_stride,
        h, n, selection.n_blocks, qk_scale, scale,
        num_warps=NUM_WARPS_DKDV[d], num_stages=NUM_STAGES_DKDV, **common,
    )
    kvi, kvc = selection.kv_indices, selection.kv_counts
    kvi = kvi if kvi.stride(-1) == 1 else kvi.contiguous()
    kvc = kvc if kvc.stride(-1) == 1 else kvc.contiguous()
    _bsa_bwd_dq_kernel[(n_tiles, b * h)](
        q, k, v, grad_out, lse, delta, dq, kvi, kvc, order,
        *qkv_strides, *_strides3(dq), *_strides3(kvi), kvc.stride(0), kvc.stride(1), order_stride,
        h, n, qk_scale, scale,
        num_warps=NUM_WARPS_DQ[d], num_stages=NUM_STAGES_DQ, **common,
    )


__all__ = ["block_sparse_attention_backward_triton", "transpose_selection", "unsupported_reason"]
