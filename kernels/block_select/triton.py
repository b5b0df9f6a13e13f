"""Triton block selection: Top-K (pool + score + top-k, no [N, N] tensor) and the ST-SWA block
index. Loaded only through the registry, so importing Triton happens on first use.

Top-K runs in two launches (the first is skipped when the linear-state pass pooled already:
``select_topk_pooled_triton``, fed by ``linear_attn.triton.linear_state_pooled_triton``):
1. ``_pool_kernel``: mean-pools q and k blocks into fp32 [B, H, nb, D] (q) and [B, H, D, nb]
   (k, transposed so the scoring kernel reads it coalesced).
2. ``_topk_kernel``: per (batch, head, tile of BQ rows: a row is one query block, or two with
   ``query_group`` 2, scored by their token-weighted mean) scores the whole key-block row in
   registers (fp32 FMA over d), maps each score to a uint32 key with the same order, finds the
   k-th largest key by a radix select from the most significant bit (stops once exactly k keys
   clear the threshold), breaks ties at the threshold by lowest block id, and writes the chosen
   ids ascending (for each query block of the row).
The only intermediate is block-level (nb x D); the nb x nb score matrix never leaves registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selection import BlockSelection, num_blocks, own_key_blocks, pool_query_groups, repeat_query_groups
from .naive import topk_keep_count, window_radius_blocks

# "triton" (default): the fused score + radix-select kernel below. H100, pooling included:
# 1.3B (nb 512, k 51) 0.20-0.23 ms vs 0.48 ms for the torch path timed in the same run; 14B
# (nb 1182, k 118) 2.08 ms with _topk_launch's settings vs 3.45 ms for the torch path (another
# run); identical ids at both shapes (select-topk-h100-s4-sweep.json, KERNEL_NOTES).
# "torch": Triton pooling, then cuBLAS fp32 block scores + torch.topk + sort; the fallback.
TOPK_IMPL = "triton"

# Longer rows take the "torch" path: a [16, 4096] fp32 k̄ᵀ chunk fills shared memory.
TOPK_TRITON_MAX_BLOCKS = 4096

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
def _score_keys(
    QP, KPT, bh, rows, row_ok, c0, NB, SEQ,
    BQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, BSZ: tl.constexpr,
):
    """uint32 keys [BQ, S] for key blocks c0 .. c0 + S - 1, ordered like the fp32 scores.

    Row r is query blocks G r .. G r + G - 1 (G = 2: their token-weighted mean pooled q). The
    diagonal (the G key blocks row r overlaps) gets the largest key (always kept), columns past
    NB get 0 and real columns at least 1, so padding never reaches the threshold."""
    cols = c0 + tl.arange(0, S)
    col_ok = cols < NB
    dk = tl.arange(0, DC)
    qp = QP + (bh * NB + G * rows[:, None]) * D + dk[None, :]
    kpt = KPT + bh * D * NB + dk[:, None] * NB + cols[None, :]
    if G == 2:  # tokens in the two blocks (the second may be partial or past the end)
        w0 = tl.minimum(SEQ - 2 * rows * BSZ, BSZ).to(tl.float32)
        w1 = tl.minimum(tl.maximum(SEQ - (2 * rows + 1) * BSZ, 0), BSZ).to(tl.float32)
        second_ok = row_ok & (2 * rows + 1 < NB)
    acc = tl.zeros([BQ, S], dtype=tl.float32)
    for d0 in range(0, D, DC):
        # fp32 FMA dot (no TF32): register-blocked outer products over DC-deep chunks staged in
        # shared memory; a plain loop over d spent most of its issue slots loading q̄.
        qc = tl.load(qp + d0, mask=row_ok[:, None], other=0.0)
        if G == 2:
            q1 = tl.load(qp + D + d0, mask=second_ok[:, None], other=0.0)
            qc = (qc * w0[:, None] + q1 * w1[:, None]) / (w0 + w1)[:, None]
        kc = tl.load(kpt + d0 * NB, mask=col_ok[None, :], other=0.0)
        acc = tl.dot(qc, kc, acc, input_precision="ieee")
    bits = acc.to(tl.uint32, bitcast=True)
    # Negative floats: flip all bits (larger magnitude -> smaller key); others: set the sign bit.
    key = bits ^ tl.where(bits >= 0x80000000, 0xFFFFFFFF, 0x80000000)
    key = tl.where(rows[:, None] == cols[None, :] // G, 0xFFFFFFFF, key)
    # Key 0 is reserved for padding (only the all-ones NaN maps there; it is clamped to 1).
    return tl.where(col_ok[None, :], tl.maximum(key, 1), 0), cols


@triton.jit
def _count_ge(key, t):
    return tl.sum((key >= t[:, None]).to(tl.int32), axis=1)


@triton.jit
def _count_tied_below(key, cols, t, bound):
    """Per row: keys equal to t in columns below bound."""
    return tl.sum(((key == t[:, None]) & (cols[None, :] < bound[:, None])).to(tl.int32), axis=1)


@triton.jit
def _store_selected(IDX, out_row, key, cols, t, lim, row_ok, first):
    """Write the ids with key > t, or key == t and id < lim, at slots first, first + 1, ...;
    returns how many were written per row."""
    sel = (key > t[:, None]) | ((key == t[:, None]) & (cols[None, :] < lim[:, None]))
    sel_i = sel.to(tl.int32)
    pos = first[:, None] + tl.cumsum(sel_i, axis=1) - 1
    ids = cols[None, :] + tl.zeros_like(sel_i)
    tl.store(IDX + out_row[:, None] + pos, ids, mask=sel & row_ok[:, None])
    return tl.sum(sel_i, axis=1)


@triton.jit
def _topk_kernel(
    QP, KPT, IDX, CNT,
    NB, NQ, SEQ, TOPK,
    BQ: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, CB: tl.constexpr,
    D: tl.constexpr, DC: tl.constexpr, G: tl.constexpr, BSZ: tl.constexpr,
):
    # NQ rows of G query blocks each; a row's list is written for each of its blocks.
    # A row is two power-of-two column segments, S1 + S2 (see _topk_segments).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BQ + tl.arange(0, BQ)
    row_ok = rows < NQ
    key1, cols1 = _score_keys(QP, KPT, bh, rows, row_ok, 0, NB, SEQ, BQ, S1, D, DC, G, BSZ)
    key2, cols2 = _score_keys(QP, KPT, bh, rows, row_ok, S1, NB, SEQ, BQ, S2, D, DC, G, BSZ)

    # Radix select: t = the largest value with count(key >= t) >= TOPK, built from the top bit
    # down. A row is done once exactly TOPK keys are >= t (its top-k set is then fixed), so the
    # loop usually stops well before 32 passes.
    t = tl.zeros([BQ], dtype=tl.uint32)
    cnt = tl.zeros([BQ], dtype=tl.int32) + (S1 + S2)
    todo = tl.sum((row_ok & (cnt != TOPK)).to(tl.int32), axis=0)
    bit = tl.zeros([], dtype=tl.int32) + 31
    while (bit >= 0) & (todo > 0):
        cand = t | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        c = _count_ge(key1, cand) + _count_ge(key2, cand)
        take = c >= TOPK
        t = tl.where(take, cand, t)
        cnt = tl.where(take, c, cnt)
        todo = tl.sum((row_ok & (cnt != TOPK)).to(tl.int32), axis=0)
        bit -= 1

    # cnt = count(key >= t) > TOPK only when several keys equal t exactly: keep the lowest ids
    # among them. lim = the largest id bound with count(key == t and id < lim) <= need, by the
    # same bisection over the CB bits of a column id (2^CB > S1 + S2). Without ties every key
    # equal to t is kept.
    lim = tl.zeros([BQ], dtype=tl.int32) + ((1 << CB) - 1)
    if tl.max(tl.where(row_ok, cnt, TOPK), axis=0) > TOPK:
        tied = _count_tied_below(key1, cols1, t, lim) + _count_tied_below(key2, cols2, t, lim)
        need = TOPK - (cnt - tied)
        lim = tl.zeros([BQ], dtype=tl.int32)
        for i in range(CB):
            bound = lim | (1 << (CB - 1 - i))
            n = _count_tied_below(key1, cols1, t, bound) + _count_tied_below(key2, cols2, t, bound)
            lim = tl.where(n <= need, bound, lim)

    for i in tl.static_range(G):
        block = G * rows + i
        block_ok = row_ok & (block < NB)
        out_row = (bh * NB + block) * TOPK
        n1 = _store_selected(IDX, out_row, key1, cols1, t, lim, block_ok, tl.zeros([BQ], dtype=tl.int32))
        _store_selected(IDX, out_row, key2, cols2, t, lim, block_ok, n1)
        tl.store(CNT + bh * NB + block, tl.zeros([BQ], dtype=tl.int32) + TOPK, mask=block_ok)


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


def _topk_segments(nb: int) -> tuple[int, int]:
    """Two power-of-two column segments covering nb key blocks: the largest power of two below
    nb, then the rest rounded up (1182 -> 1024 + 256, not 2048; 512 -> 256 + 256). The second is
    at least 16 and a quarter of the first: narrower dots compile to poor code."""
    s1 = 16 if nb <= 32 else 1 << ((nb - 1).bit_length() - 1)
    return s1, max(16, s1 // 4, triton.next_power_of_2(max(nb - s1, 1)))


def _topk_launch(s1: int, s2: int, query_group: int = 1) -> tuple[int, int, int]:
    """(BQ rows per program, num_warps, num_stages) for rows of s1 + s2 columns.

    Every program reads all of k̄ᵀ (D x nb fp32) from L2, so BQ is as large as pays. Swept on an
    H100 (bench/results/select-topk-h100-s4-sweep.json, kernel time without pooling): 1.3B
    (256 + 256 columns) BQ 8, 4 warps, 3 stages 0.067 ms (next best 0.084); 14B (1024 + 256)
    BQ 16, 8 warps, 3 stages 1.38 ms, BQ 8 / 16 warps 1.96 ms, BQ 2 / 4 warps 2.58 ms. A k̄ᵀ
    chunk takes 64 * s1 bytes of shared memory a stage: pipelined up to s1 = 1024 only.
    Rows of two query blocks (``query_group`` 2, half as many rows) past 512 columns take 1
    stage: 14B 0.815 vs 0.942 ms with 3, ids identical (select-topk-h100-s10-q128-sweep.txt;
    only the 14B width was measured)."""
    width = s1 + s2
    if width <= 512:
        return 8, 4, 3
    return (16 if width <= 1280 else 8), 8, (3 if s1 <= 1024 and query_group == 1 else 1)


def select_topk_blocks_triton(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, query_group: int = 1
) -> BlockSelection:
    """Same contract as select_topk_blocks_naive: exactly k_eff ids per row, ascending."""
    qp, kpt = mean_pool_blocks_triton(q, k, block_size)
    return select_topk_pooled_triton(qp, kpt, block_size, topk, q.shape[2], query_group)


def select_topk_pooled_triton(
    qp: torch.Tensor, kpt: torch.Tensor, block_size: int, topk: int, seq_len: int, query_group: int = 1
) -> BlockSelection:
    """Same contract as select_topk_pooled_naive (pooled fp32 q [B, H, nb, D] and k
    transposed [B, H, D, nb], e.g. from the linear-state kernel)."""
    b, h, nb, d = qp.shape
    k_eff = topk_keep_count(topk, nb, query_group)
    qp, kpt = (t.to(torch.float32).contiguous() for t in (qp, kpt))  # the scores are fp32 FMA
    nq = -(-nb // query_group)
    if TOPK_IMPL == "torch" or nb > TOPK_TRITON_MAX_BLOCKS:
        # Block-level scores [nq, nb] (never token-level) through cuBLAS fp32, torch.topk, sort.
        scores = pool_query_groups(qp, seq_len, block_size, query_group) @ kpt
        scores.masked_fill_(own_key_blocks(nq, nb, query_group, qp.device), float("inf"))
        top = scores.topk(k_eff, dim=-1, sorted=False).indices.sort(dim=-1).values
        idx = top.to(torch.int32)
        cnt = torch.full((b, h, nq), k_eff, device=qp.device, dtype=torch.int32)
        return BlockSelection(*repeat_query_groups(idx, cnt, query_group, nb), block_size, seq_len,
                              query_group=query_group)
    if d % 16:
        raise ValueError(
            f"Expected a head dim that is a multiple of 16 for the Triton Top-K kernel, got {d}. "
            "Try select_topk_blocks(..., backend='torch')."
        )
    s1, s2 = _topk_segments(nb)
    bq, num_warps, num_stages = _topk_launch(s1, s2, query_group)
    idx = torch.empty(b, h, nb, k_eff, device=qp.device, dtype=torch.int32)
    cnt = torch.empty(b, h, nb, device=qp.device, dtype=torch.int32)
    if POISON_OUTPUTS:
        idx.fill_(-1)
        cnt.fill_(-1)
    _topk_kernel[(triton.cdiv(nq, bq), b * h)](
        qp, kpt, idx, cnt, nb, nq, seq_len, k_eff,
        BQ=bq, S1=s1, S2=s2, CB=(s1 + s2).bit_length(), D=d, DC=16, G=query_group, BSZ=block_size,
        num_warps=num_warps, num_stages=num_stages,
    )
    return BlockSelection(idx, cnt, block_size, seq_len, query_group=query_group)


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
