"""Triton block selection: Top-K (pool + score + top-k, no [N, N] tensor) and the ST-SWA block
index. Loaded only through the registry, so importing Triton happens on first use.

Top-K runs in two launches:
1. ``_pool_kernel``: mean-pools q and k blocks into fp32 [B, H, nb, D] (q) and [B, H, D, nb]
   (k, transposed so the scoring kernel reads it coalesced).
2. ``_topk_kernel``: per (batch, head, tile of query blocks) scores the whole key-block row in
   registers, finds the k-th largest score by a 32-step bisection over the score's sortable
   int32 bits (ties broken by lowest block id), and writes the chosen ids ascending.
The only intermediate is block-level (nb x D); the nb x nb score matrix never leaves registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selection import BlockSelection, num_blocks
from .naive import window_radius_blocks

INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)
# "torch": Triton pooling, then cuBLAS block scores + torch.topk. The fused kernel below took
# 642 ms at the 14B shape on an H100 (whole-row int64 register tile; see KERNEL_NOTES). "triton": the fused
# pool-score-bisection kernel (kept for small nb and further work).
TOPK_IMPL = "torch"

# Tests set this: outputs start as -1 so an unwritten index can't pass.
POISON_OUTPUTS = False


@triton.jit
def _pool_kernel(
    Q, K, QP, KPT,
    sqb, sqh, sqn, skb, skh, skn,
    H, N, NB,
    BS: tl.constexpr, D: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BS + tl.arange(0, BS)
    cols = tl.arange(0, D)
    ok = rows < N
    count = tl.minimum(N - blk * BS, BS).to(tl.float32)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :], mask=ok[:, None], other=0.0)
    k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + cols[None, :], mask=ok[:, None], other=0.0)
    qm = tl.sum(q.to(tl.float32), axis=0) / count
    km = tl.sum(k.to(tl.float32), axis=0) / count
    tl.store(QP + (bh * NB + blk) * D + cols, qm)
    tl.store(KPT + bh * D * NB + cols * NB + blk, km)


@triton.jit
def _topk_kernel(
    QP, KPT, IDX, CNT,
    NB, TOPK,
    BQ: tl.constexpr, NBP: tl.constexpr, D: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BQ + tl.arange(0, BQ)
    cols = tl.arange(0, NBP)
    row_ok = rows < NB
    col_ok = cols < NB
    acc = tl.zeros([BQ, NBP], dtype=tl.float32)
    qp = QP + bh * NB * D + rows * D
    kpt = KPT + bh * D * NB + cols
    for d in range(D):
        qv = tl.load(qp + d, mask=row_ok, other=0.0)
        kv = tl.load(kpt + d * NB, mask=col_ok, other=0.0)
        acc += qv[:, None] * kv[None, :]
    # Sortable keys: int32 order == float order. Diagonal forced to the top.
    bits = acc.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(rows[:, None] == cols[None, :], INT32_MAX, key)
    valid = col_ok[None, :] & row_ok[:, None]
    key = tl.where(valid, key, INT32_MIN)
    key64 = key.to(tl.int64)
    lo = tl.full([BQ], INT32_MIN, tl.int64)
    hi = tl.full([BQ], INT32_MAX, tl.int64)
    # Largest T with count(key >= T) >= TOPK.
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum(((key64 >= mid[:, None]) & valid).to(tl.int32), axis=1)
        enough = cnt >= TOPK
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    gt = (key64 > lo[:, None]) & valid
    eq = (key64 == lo[:, None]) & valid
    need = TOPK - tl.sum(gt.to(tl.int32), axis=1)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=1)
    sel = gt | (eq & (eq_rank <= need[:, None]))
    pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
    out = IDX + (bh * NB + rows[:, None]) * TOPK + pos
    tl.store(out, cols[None, :] + tl.zeros([BQ, NBP], tl.int32), mask=sel)
    tl.store(CNT + bh * NB + rows, tl.zeros([BQ], tl.int32) + TOPK, mask=row_ok)


def mean_pool_blocks_triton(q: torch.Tensor, k: torch.Tensor, block_size: int):
    """(fp32 [B, H, nb, D] pooled q, fp32 [B, H, D, nb] pooled k transposed)."""
    b, h, n, d = q.shape
    if q.stride(3) != 1 or k.stride(3) != 1:
        q, k = q.contiguous(), k.contiguous()
    nb = num_blocks(n, block_size)
    qp = torch.empty(b, h, nb, d, device=q.device, dtype=torch.float32)
    kpt = torch.empty(b, h, d, nb, device=q.device, dtype=torch.float32)
    _pool_kernel[(nb, b * h)](
        q, k, qp, kpt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, n, nb, BS=block_size, D=d, num_warps=4,
    )
    return qp, kpt


def select_topk_blocks_triton(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int
) -> BlockSelection:
    """Same contract as select_topk_blocks_naive: exactly k_eff ids per row, ascending."""
    b, h, n, d = q.shape
    nb = num_blocks(n, block_size)
    k_eff = max(1, min(int(topk), nb))
    qp, kpt = mean_pool_blocks_triton(q, k, block_size)
    if TOPK_IMPL == "torch":
        # Block-level scores [nb, nb] (never token-level) through cuBLAS fp32, torch.topk, sort.
        scores = qp @ kpt
        scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
        top = scores.topk(k_eff, dim=-1, sorted=False).indices.sort(dim=-1).values
        idx = top.to(torch.int32)
        cnt = torch.full((b, h, nb), k_eff, device=q.device, dtype=torch.int32)
        return BlockSelection(idx, cnt, block_size, n)
    nbp = triton.next_power_of_2(nb)
    bq = max(1, min(16, 16384 // nbp))
    idx = torch.empty(b, h, nb, k_eff, device=q.device, dtype=torch.int32)
    cnt = torch.empty(b, h, nb, device=q.device, dtype=torch.int32)
    if POISON_OUTPUTS:
        idx.fill_(-1)
        cnt.fill_(-1)
    _topk_kernel[(triton.cdiv(nb, bq), b * h)](
        qp, kpt, idx, cnt, nb, k_eff, BQ=bq, NBP=nbp, D=d, num_warps=8 if nbp >= 1024 else 4,
    )
    return BlockSelection(idx, cnt, block_size, n)


@triton.jit
def _window_kernel(IDX, CNT, RADIUS, H, NB, MAXKV, BQ: tl.constexpr, KP: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    r = tl.load(RADIUS + h)
    rows = tile * BQ + tl.arange(0, BQ)
    slots = tl.arange(0, KP)
    row_ok = rows < NB
    start = tl.maximum(rows - r, 0)
    stop = tl.minimum(rows + r, NB - 1)
    count = stop - start + 1
    ids = start[:, None] + slots[None, :]
    ids = tl.where(slots[None, :] < count[:, None], ids, start[:, None])
    ptr = IDX + (bh * NB + rows[:, None]) * MAXKV + slots[None, :]
    tl.store(ptr, ids, mask=row_ok[:, None] & (slots[None, :] < MAXKV))
    tl.store(CNT + bh * NB + rows, count, mask=row_ok)


def sliding_window_blocks_triton(
    batch: int,
    seq_len: int,
    block_size: int,
    windows: torch.Tensor,
    token_order: torch.Tensor | None,
    device=None,
) -> BlockSelection:
    """Same contract as sliding_window_blocks_naive, built compactly (no nb x nb mask)."""
    nb = num_blocks(seq_len, block_size)
    radii = [min(nb, window_radius_blocks(int(w), block_size)) for w in windows.tolist()]
    h = len(radii)
    max_kv = max(1, max(min(nb, 2 * r + 1) for r in radii))
    radius = torch.tensor(radii, dtype=torch.int32, device=device)
    idx = torch.empty(batch, h, nb, max_kv, dtype=torch.int32, device=device)
    cnt = torch.empty(batch, h, nb, dtype=torch.int32, device=device)
    if POISON_OUTPUTS:
        idx.fill_(-1)
        cnt.fill_(-1)
    bq = 16
    kp = triton.next_power_of_2(max_kv)
    _window_kernel[(triton.cdiv(nb, bq), batch * h)](idx, cnt, radius, h, nb, max_kv, BQ=bq, KP=kp)
    return BlockSelection(idx, cnt, block_size, seq_len, token_order)
