"""Hopper (sm_90) block-sparse flash attention forward in Gluon.

Same contract and numerics as ``_bsa_fwd_kernel`` in ``triton.py`` (fp32 online softmax with
exp2, natural-log LSE, optional per-head output bias), for rows that need no gather (no
``token_order``). What Gluon lets us write that the Triton kernel leaves to its compiler:

- K and V tiles arrive through a TMA ring with one mbarrier per slot; a slot is refilled as
  soon as the wgmma that read it has retired.
- Q sits in registers as the wgmma A operand (read from shared memory once).
- FA3 order (intra-warpgroup overlap): QK^T of key block j + 1 is issued before the softmax
  of block j + 1 is needed, and that softmax runs while P V of block j is in flight. O is only
  rescaled while no P V product is in flight; reading an in-flight accumulator makes ptxas
  serialise every wgmma (warning C7514), which ``tests/test_kernels_triton.py`` checks for.
- TMA reads 3-D views ([B, N, H * D] or [B * H, N, D]) so rows past N come back as zeros, as in
  the Triton kernel: a neighbouring batch's or head's Inf could otherwise reach P V as 0 * Inf.

H100, Top-K 90 %, against the Triton kernel in the same run: 1.3B shape 1.347 vs 1.539 ms, 14B
26.07 vs 27.09 ms (``bench/results/attention-h100-s6b.md``; notes in attention-NOTES.md, session 6).
The kernel is bound by L2 -> SM traffic (each 64-row query block streams its own 51 K/V
tiles): in an ablation run where it took 1.44 ms, it still took 1.31 ms without the softmax and
0.87 ms with neither loads nor softmax (``attention-h100-s6-ablation.json``).

Selections with ``query_group`` 2 (Top-K with 128-token query blocks) run
``_bsa_fwd_hopper_grouped_kernel``, which reads each K/V tile once for two query blocks.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
BLOCK_SIZES = (64,)  # one warpgroup's wgmma M
HEAD_DIMS = (64, 128)
STAGES = 2  # K/V ring depth: 3 measured the same (1.469 vs 1.470 ms) with 32 KiB more shared memory


@gluon.jit
def _load_tile(desc, ring, bars, slot, plane, row, col):
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [plane, row, col], bars.index(slot), ring.index(slot))


@gluon.jit
def _smem_tiles(q_desc, k_desc, v_desc, Q_TILES: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                D: gl.constexpr, DV: gl.constexpr):
    """Shared memory for Q_TILES query tiles and K/V rings of STAGES slots, as TMA fills them."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_TILES, 1, BS, D], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BS, D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BS, DV], v_desc.layout)
    return q_smem, k_ring, v_ring


@gluon.jit
def _tile(ring, slot, rows: gl.constexpr, cols: gl.constexpr):
    """Ring slot ``slot`` ([1, rows, cols], as TMA fills it) as the [rows, cols] wgmma operand."""
    return ring.index(slot).reshape([rows, cols])


@gluon.jit
def _softmax_step(s, m_i, l_i, kb, N, qk_scale, BS: gl.constexpr, s_layout: gl.constexpr):
    """Online softmax over key block ``kb`` (exp2, log2(e) folded into qk_scale)."""
    if kb * BS + BS > N:  # the sequence's partial last block
        cols = kb * BS + gl.arange(0, BS, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < N, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _program(scal, GROUP: gl.constexpr):
    """This program's query block (``GROUP`` 1) or pair of blocks (2), batch, head, key-list
    pointer and list length (counts: last dimension contiguous, one per 64-row block)."""
    O, LSE, KVI, KVC, OBIAS, sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, H, N, plane_b, plane_h, col_h, col_hv, qk_scale = scal
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kvi = KVI + b * s_ib + h * s_ih + pid * s_im  # the host scales s_im by GROUP
    count = gl.load(KVC + b * s_cb + h * s_ch + GROUP * pid)
    return pid, b, h, kvi, count


@gluon.jit
def _recycle(desc, ring, full, empty, slot, i, kvi, count, plane, col, BS: gl.constexpr, PRODUCER: gl.constexpr):
    """Ring slot ``slot`` is free again (the wgmma that read it retired): release it to the
    producer warp, or, without one, fill it with key block ``i`` of the list if there is one."""
    if PRODUCER:
        mbarrier.arrive(empty.index(slot), count=1)
    elif i < count:
        _load_tile(desc, ring, full, slot, plane, gl.load(kvi + i) * BS, col)


@gluon.jit
def _attend_query_block(smem, bars, scal, prog, WG: gl.constexpr, GROUP: gl.constexpr, BS: gl.constexpr,
                        D: gl.constexpr, DV: gl.constexpr, STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr,
                        PRODUCER: gl.constexpr):
    """One warpgroup: query block ``GROUP * pid + WG`` (Q in ``q_smem[WG]``) over its key list in
    FA3 order, then its rows stored. Key block i is in ring slot i % STAGES; its n-th fill is
    barrier phase n & 1. Without a producer warp (``PRODUCER`` False) the caller issued Q and
    the first STAGES tiles, and these warps refill each slot."""
    q_desc, k_desc, v_desc, q_smem, k_ring, v_ring = smem
    q_bar, k_full, v_full, k_empty, v_empty = bars
    O, LSE, KVI, KVC, OBIAS, sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, H, N, plane_b, plane_h, col_h, col_hv, qk_scale = scal
    pid, b, h, kvi, count = prog
    plane = b * plane_b + h * plane_h
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([BS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BS], gl.float32, layout=row_s)
    acc = gl.zeros([BS, DV], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BS, BS], gl.float32, layout=s_layout)
    if count > 0:
        mbarrier.wait(q_bar.index(WG), 0)
        q = q_smem.index(WG).reshape([BS, D]).load(q_layout)
        mbarrier.wait(k_full.index(0), 0)
        s = warpgroup_mma(q, _tile(k_ring, 0, BS, D).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        _recycle(k_desc, k_ring, k_full, k_empty, 0, STAGES, kvi, count, plane, h * col_h, BS, PRODUCER)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, gl.load(kvi), N, qk_scale, BS, s_layout)
        p = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(count - 1):
            nxt = j + 1
            slot_n = nxt % STAGES
            mbarrier.wait(k_full.index(slot_n), (nxt // STAGES) & 1)
            s_next = warpgroup_mma(q, _tile(k_ring, slot_n, BS, D).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o, assert_trivial=True), 1)
            slot = j % STAGES
            mbarrier.wait(v_full.index(slot), (j // STAGES) & 1)
            acc = warpgroup_mma(p, _tile(v_ring, slot, BS, DV), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_next,))  # QK^T of block j + 1 done; P V of block j in flight
            _recycle(k_desc, k_ring, k_full, k_empty, slot_n, nxt + STAGES, kvi, count, plane, h * col_h, BS, PRODUCER)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, gl.load(kvi + nxt), N, qk_scale, BS, s_layout)
            p = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _recycle(v_desc, v_ring, v_full, v_empty, slot, j + STAGES, kvi, count, plane, h * col_hv, BS, PRODUCER)
        last = count - 1
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o, assert_trivial=True), 1)
        slot = last % STAGES
        mbarrier.wait(v_full.index(slot), (last // STAGES) & 1)
        acc = warpgroup_mma(p, _tile(v_ring, slot, BS, DV), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    _store_rows(acc, m_i, l_i, O, LSE, OBIAS, sob, soh, son, slb, slh, b, h, H, N, (GROUP * pid + WG) * BS,
                BS, DV, HAS_OBIAS, o_layout)


@gluon.jit
def _bsa_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, O, LSE, KVI, KVC, OBIAS,
    sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch,
    H, N, plane_b, plane_h, col_h, col_hv, qk_scale,
    BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr,
):
    """One program per (query block, batch x head), one warpgroup that also issues the loads.
    The tensors are 3-D views: token n of (b, h) is row n of plane ``b * plane_b + h * plane_h``,
    columns from ``h * col_h`` (``col_hv`` for V)."""
    q_smem, k_ring, v_ring = _smem_tiles(q_desc, k_desc, v_desc, 1, STAGES, BS, D, DV)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    scal = (O, LSE, KVI, KVC, OBIAS, sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, H, N, plane_b, plane_h,
            col_h, col_hv, qk_scale)
    prog = _program(scal, 1)
    pid, b, h, kvi, count = prog
    plane = b * plane_b + h * plane_h
    if count > 0:  # a copy must not be in flight when the program exits
        mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [plane, pid * BS, h * col_h], q_bar.index(0), q_smem.index(0))
    for i in gl.static_range(STAGES):
        if i < count:
            kb = gl.load(kvi + i)
            _load_tile(k_desc, k_ring, k_bars, i, plane, kb * BS, h * col_h)
            _load_tile(v_desc, v_ring, v_bars, i, plane, kb * BS, h * col_hv)
    # No producer warp: the "empty" barriers are never used, any barriers will do.
    _attend_query_block((q_desc, k_desc, v_desc, q_smem, k_ring, v_ring), (q_bar, k_bars, v_bars, k_bars, v_bars),
                        scal, prog, 0, 1, BS, D, DV, STAGES, HAS_OBIAS, False)
    mbarrier.invalidate(q_bar.index(0))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _store_rows(acc, m_i, l_i, O, LSE, OBIAS, sob, soh, son, slb, slh, b, h, H, N, row0,
                BS: gl.constexpr, DV: gl.constexpr, HAS_OBIAS: gl.constexpr, o_layout: gl.constexpr):
    """Normalise and store rows row0 .. row0 + BS - 1 (those below N) and their natural-log LSE."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o, assert_trivial=True)
    empty = l_o == 0.0
    l_safe = gl.where(empty, 1.0, l_o)
    out = acc / gl.expand_dims(l_safe, 1)
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    if HAS_OBIAS:  # [B, H * DV] fp32, added before the single rounding
        out = out + gl.expand_dims(gl.load(OBIAS + (b * H + h) * DV + cols), 0)
    rows = row0 + gl.arange(0, BS, layout=row_o)
    ok = rows < N
    m_o = gl.convert_layout(m_i, row_o, assert_trivial=True)
    lse = gl.where(empty, float("-inf"), (m_o + gl.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
    gl.store(o_base + gl.expand_dims(rows, 1).to(gl.int64) * son + gl.expand_dims(cols, 0), out.to(O.dtype.element_ty),
             mask=gl.expand_dims(ok, 1))
    gl.store(LSE + b * slb + h * slh + rows, lse, mask=ok)


# -- grouped query blocks: two 64-row query blocks share one key list (Top-K, query_group 2) -----
# One program per pair; three partitions (warp specialisation): a 1-warp producer streams each
# K/V tile through a TMA ring once, and two 4-warp consumers (one per query block) each run
# _attend_query_block on it, releasing a slot through an "empty" barrier that both must arrive
# on. Each tile is read from L2 once per 128 query rows instead of once per 64, which is what
# bound the kernel above. H100, Top-K 90 %, against that kernel on the same lists in one run
# (attention-h100-s9-ws.json): 1.3B 1.305 vs 1.516 ms, 14B 22.49 vs 27.45 ms. Registers: 12 warps
# at GROUPED_MAXNREG, then 240 per consumer thread and 24 for the producer's warpgroup. Making the
# two consumers take turns at the tensor cores (FA3's ping-pong) measured no faster (1.33-1.35 ms).
GROUPED_STAGES = 3  # 3 slots: 1.305 ms, 2 slots: 1.340 ms (1.3B); 22.49 vs 22.40 ms (14B)
GROUPED_MAXNREG = 168
CONSUMER_REGS = 240


@gluon.jit
def _grouped_producer(smem, bars, scal, BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
                      STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr):
    q_desc, k_desc, v_desc, q_smem, k_ring, v_ring = smem
    q_bar, k_full, v_full, k_empty, v_empty = bars
    O, LSE, KVI, KVC, OBIAS, sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, H, N, plane_b, plane_h, col_h, col_hv, qk_scale = scal
    pid_g, b, h, kvi, count = _program(scal, 2)
    plane = b * plane_b + h * plane_h
    if count > 0:
        for w in gl.static_range(2):  # a second block past N comes back as zeros (its rows are not stored)
            mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [plane, (2 * pid_g + w) * BS, h * col_h], q_bar.index(w),
                                            q_smem.index(w))
    for i in range(count):
        slot = i % STAGES
        phase = (i // STAGES) & 1
        kb = gl.load(kvi + i)
        mbarrier.wait(k_empty.index(slot), phase ^ 1)  # a fresh barrier passes parity 1 at once
        _load_tile(k_desc, k_ring, k_full, slot, plane, kb * BS, h * col_h)
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        _load_tile(v_desc, v_ring, v_full, slot, plane, kb * BS, h * col_hv)


@gluon.jit
def _grouped_consumer_0(smem, bars, scal, BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
                        STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr):
    _attend_query_block(smem, bars, scal, _program(scal, 2), 0, 2, BS, D, DV, STAGES, HAS_OBIAS, True)


@gluon.jit
def _grouped_consumer_1(smem, bars, scal, BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
                        STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr):
    _attend_query_block(smem, bars, scal, _program(scal, 2), 1, 2, BS, D, DV, STAGES, HAS_OBIAS, True)


@gluon.jit
def _bsa_fwd_hopper_grouped_kernel(
    q_desc, k_desc, v_desc, O, LSE, KVI, KVC, OBIAS,
    sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch,
    H, N, plane_b, plane_h, col_h, col_hv, qk_scale,
    BS: gl.constexpr, D: gl.constexpr, DV: gl.constexpr, STAGES: gl.constexpr, HAS_OBIAS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """One program per (pair of query blocks, batch x head); ``s_im`` steps over pairs."""
    q_smem, k_ring, v_ring = _smem_tiles(q_desc, k_desc, v_desc, 2, STAGES, BS, D, DV)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    smem = (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring)
    bars = (q_bar, k_full, v_full, k_empty, v_empty)
    scal = (O, LSE, KVI, KVC, OBIAS, sob, soh, son, slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, H, N, plane_b, plane_h,
            col_h, col_hv, qk_scale)
    gl.warp_specialize([
        (_grouped_consumer_0, (smem, bars, scal, BS, D, DV, STAGES, HAS_OBIAS)),
        (_grouped_consumer_1, (smem, bars, scal, BS, D, DV, STAGES, HAS_OBIAS)),
        (_grouped_producer, (smem, bars, scal, BS, D, DV, STAGES, HAS_OBIAS)),
    ], [4, 1], [CONSUMER_REGS, 24])


def planes_3d(t: torch.Tensor):
    """A [B, H, N, D] tensor as the 3-D view TMA reads (rows past N come back as zeros):
    (view, plane_b, plane_h, col_h), or None. Wan's [B, N, H, D] layout is [B, N, H * D] (plane
    b, head h at column h * D); a contiguous [B, H, N, D] is [B * H, N, D] (plane b * H + h)."""
    b, h, n, d = t.shape
    if t.stride() == (n * h * d, d, h * d, 1):
        return t.transpose(1, 2).reshape(b, n, h * d), 1, 0, d
    if t.is_contiguous():
        return t.reshape(b * h, n, d), h, 1, 0
    return None


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


@functools.cache
def _smem_layout(block_size: int, head_dim: int, dtype: torch.dtype):
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([1, block_size, head_dim], gdt)


def unsupported_reason(q, k, v, block_size: int) -> str | None:
    """Why this kernel cannot take these inputs, or None (it can). The caller has already
    checked the shapes and the selection."""
    if not (q.is_cuda and _is_hopper(q.device.index if q.device.index is not None else torch.cuda.current_device())):
        return "needs a Hopper (sm_90) GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs q, k, v all bf16 or all fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if block_size not in BLOCK_SIZES or q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
        return f"needs block_size in {BLOCK_SIZES} and head dims in {HEAD_DIMS}"
    views = [planes_3d(t) for t in (q, k, v)]
    if any(x is None for x in views) or len({x[1:3] for x in views}) != 1 or views[0][3] != views[1][3]:
        return "needs q, k, v in one shared layout: Wan's [B, N, H, D] or contiguous [B, H, N, D]"
    if any(x[0].data_ptr() % 16 for x in views):
        return "needs 16-byte aligned tensors"
    return None


def block_sparse_attention_gluon(q, k, v, kv_indices, kv_counts, block_size: int, scale: float, out: torch.Tensor,
                                 lse: torch.Tensor, out_bias: torch.Tensor | None = None, query_group: int = 1) -> None:
    """Fill ``out`` ([B, H, N, DV], last dimension contiguous) and ``lse`` ([B, H, N] fp32) from a
    selection's indices and counts (last dimension contiguous). Inputs must pass
    ``unsupported_reason``. ``query_group`` 2: query blocks 2m and 2m + 1 hold the same list, so
    one program serves both and reads only the even blocks' lists."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    (q3, plane_b, plane_h, col_h), (k3, *_), (v3, _, _, col_hv) = (planes_3d(t) for t in (q, k, v))
    qk_layout = _smem_layout(block_size, d, q.dtype)
    q_desc = TensorDescriptor.from_tensor(q3, [1, block_size, d], qk_layout)
    k_desc = TensorDescriptor.from_tensor(k3, [1, block_size, d], qk_layout)
    v_desc = TensorDescriptor.from_tensor(v3, [1, block_size, dv], _smem_layout(block_size, dv, q.dtype))
    args = (q_desc, k_desc, v_desc, out, lse, kv_indices, kv_counts, out_bias if out_bias is not None else lse,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2) * query_group,
            kv_counts.stride(0), kv_counts.stride(1), h, n, plane_b, plane_h, col_h, col_hv, float(scale) * LOG2E)
    if query_group == 2:
        _bsa_fwd_hopper_grouped_kernel[(-(-kv_indices.shape[2] // 2), b * h)](
            *args, BS=block_size, D=d, DV=dv, STAGES=GROUPED_STAGES, HAS_OBIAS=out_bias is not None,
            CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=GROUPED_MAXNREG,
        )
        return
    _bsa_fwd_hopper_kernel[(kv_indices.shape[2], b * h)](
        *args, BS=block_size, D=d, DV=dv, STAGES=STAGES, HAS_OBIAS=out_bias is not None, num_warps=4,
    )


__all__ = ["block_sparse_attention_gluon", "planes_3d", "unsupported_reason"]
