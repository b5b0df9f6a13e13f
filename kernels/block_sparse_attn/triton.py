"""Triton block-sparse flash attention forward over a BlockSelection.

One program per (query block, batch x head). It loops over ``kv_indices[b, h, m, :count]``,
online softmax in fp32 with exp2 (log2(e) folded into the scale), and writes the output and
the natural-log LSE. bf16/fp16 in, fp32 accumulate.

Per-head token orders (ST-SWA temporal heads) are handled by a fused gather: the kernel reads
q/k/v rows through ``token_order`` and scatters output rows back, so no permuted copy of the
tensors is made (``ORDER_MODE = "permute"`` makes explicit copies instead; benchmarks only).

On Hopper, rows that need no gather go to the Gluon kernel in ``gluon.py`` (same contract,
wgmma/TMA with FA3-order overlap); ``sparse_forward_kernel`` says which kernel a call runs.

SALAD's combine for inference (``kernels.salad_attention``) is this kernel with the gated Proj
bias in its epilogue, then ``salad_linear_add_triton``: the linear branch's features in row
chunks, each multiplied by the Proj-folded state straight into the output.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from ..layout import out_like, rowmajor
from ..selection import BlockSelection
from .naive import from_working_order, to_working_order

LOG2E = 1.4426950408889634
log = logging.getLogger("salad")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch settings per block size (the benchmark sweeps them).
NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}
NUM_STAGES = 3

# Rows of linear-branch features made (and multiplied into O) at a time in salad_linear_add_triton:
# its buffer is this many rows instead of a second full-size output (1.3B: 2 chunks, 14B: 5).
PROJ_CHUNK_ROWS = 16384

# Load K/V tiles through TMA descriptors when rows are not gathered (H100, 90 %: topk 1.69 ->
# 1.53 ms at the 1.3B shape, 28.1 -> 27.2 ms at 14B; attention-h100-s4-variants.json).
USE_TMA = True

# Tests set this: outputs start as NaN so an unwritten element can't pass.
POISON_OUTPUTS = False

# Hopper: the Gluon kernel for rows that need no gather (H100, Top-K 90 %: 1.3B 1.347 vs 1.539 ms,
# 14B 26.07 vs 27.09 ms, attention-h100-s6b). Benchmarks turn it off to time this file's kernel.
USE_GLUON = True


# Gluon is experimental and its API moves between releases: the kernel is compiled and tested with
# Triton 3.6 (H100) and 3.8 (sm_90 compile test on CPU); older releases keep the Triton kernel.
GLUON_MIN_TRITON = (3, 6)
_gluon_failed = False  # set when the Gluon kernel failed to compile in this process


@functools.cache
def _gluon_module():
    """kernels.block_sparse_attn.gluon, or None when this Triton has no usable Gluon for Hopper."""
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < GLUON_MIN_TRITON:
        return None
    try:
        from . import gluon
    except ImportError:
        return None
    return gluon


def _gluon_compile_failed(exc: Exception) -> None:
    global _gluon_failed
    _gluon_failed = True
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    log.warning(
        "SALAD: the Hopper sparse-attention kernel (Gluon) failed with Triton %s (%s); "
        "using the portable Triton kernel, about 5-10%% slower. Try Triton %s or newer.",
        triton.__version__, last[:200], ".".join(map(str, GLUON_MIN_TRITON)),
    )


def sparse_forward_kernel(q, k, v, selection: BlockSelection) -> str:
    """Which kernel block_sparse_attention_triton runs for these inputs: "gluon" (Hopper,
    contiguous rows, see gluon.unsupported_reason) or "triton"."""
    if not USE_GLUON or _gluon_failed or selection.token_order is not None or interpreting():
        return "triton"
    mod = _gluon_module()
    if mod is None:
        return "triton"
    reason = mod.unsupported_reason(rowmajor(q), rowmajor(k), rowmajor(v), selection.block_size)
    if reason:
        _debug_once(f"SALAD: Triton sparse kernel, not the Hopper one: it {reason}.")
        return "triton"
    return "gluon"


@functools.cache
def _debug_once(message: str) -> None:
    log.debug(message)


@triton.jit
def cast_out(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x.to(dtype); under the CPU interpreter (which truncates fp32 -> bf16) round to nearest
    even by hand, so interpreter errors match the GPU's."""
    if EMULATE_RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)

@triton.jit
def _block_rows(order_h, blk, N, BS: tl.constexpr, HAS_ORDER: tl.constexpr, MASKED: tl.constexpr):
    """Rows of block ``blk`` in the head's working order (through ``order_h`` when given) and
    which of them are real tokens (< N). MASKED: the block may run past N."""
    pos = blk * BS + tl.arange(0, BS)
    ok = pos < N
    if HAS_ORDER:
        if MASKED:
            rows = tl.load(order_h + pos, mask=ok, other=0)
        else:
            rows = tl.load(order_h + pos)
    else:
        rows = pos
    return rows, ok


@triton.jit
def _attend_key_block(
    acc, m_i, l_i, q, k_base, v_base, KD, VD, order_h, b, h, kb, N, skn, svn, qk_scale,
    BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HAS_ORDER: tl.constexpr,
    DOT_F32: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One key block of the online softmax (exp2, log2(e) folded into qk_scale). MASKED: the
    block may run past N (the sequence's partial last block)."""
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    rows_n, n_ok = _block_rows(order_h, kb, N, BS, HAS_ORDER, MASKED)
    if USE_TMA:  # rows past N come back as zeros
        k = tl.reshape(KD.load([b, h, kb * BS, 0]), [BS, D]).T
    elif MASKED:
        k = tl.load(k_base + rows_n[None, :] * skn + offs_d[:, None], mask=n_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + rows_n[None, :] * skn + offs_d[:, None])
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, k)
    if MASKED:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        v = tl.reshape(VD.load([b, h, kb * BS, 0]), [BS, DV])
    elif MASKED:
        v = tl.load(v_base + rows_n[:, None] * svn + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    else:
        v = tl.load(v_base + rows_n[:, None] * svn + offs_dv[None, :])
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(cast_out(p, v.dtype, True).to(tl.float32), v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# "gather": index q/k/v rows through token_order inside the kernel; "permute": copy q/k/v into
# each head's working order first, and the output back after. H100, stswa 90% (session 4):
# 1.3B shape gather 2.00 ms vs permute 2.24 ms; 14B shape gather 32.4 ms vs permute 31.3 ms,
# but permute holds 4 extra tensor-sized copies (5.0x q of extra memory vs 1.02x): gather.
ORDER_MODE = "gather"


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, O, LSE, KVI, KVC, ORDER, OBIAS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    slb, slh, s_ib, s_ih, s_im, s_cb, s_ch, s_oh,
    H, N, qk_scale,
    BS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_ORDER: tl.constexpr, DOT_F32: tl.constexpr, SPLIT_LAST: tl.constexpr, USE_TMA: tl.constexpr, HAS_OBIAS: tl.constexpr,
    KD, VD,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    rows_m, m_ok = _block_rows(ORDER + h * s_oh, pid_m, N, BS, HAS_ORDER, True)
    q = tl.load(Q + b * sqb + h * sqh + rows_m[:, None] * sqn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if DOT_F32:  # the CPU interpreter multiplies bf16 as raw uint16: upcast there only
        q = q.to(tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kvi = KVI + b * s_ib + h * s_ih + pid_m * s_im
    count = tl.load(KVC + b * s_cb + h * s_ch + pid_m)

    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, DV], tl.float32)
    # Ids ascend, so only a list's last entry can be the partial block at the end of the
    # sequence. SPLIT_LAST runs the loop unmasked and the last entry alone masked: it pays for
    # gathered rows (stswa 1.3B 2.20 -> 2.03 ms), not for contiguous ones (no gain).
    n_main = count - 1 if SPLIT_LAST else count
    for j in range(n_main):
        kb = tl.load(kvi + j)
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, k_base, v_base, KD, VD, ORDER + h * s_oh, b, h, kb, N, skn, svn, qk_scale,
            BS, D, DV, HAS_ORDER, DOT_F32, MASKED=not SPLIT_LAST, USE_TMA=USE_TMA,
        )
    if SPLIT_LAST and count > 0:
        kb = tl.load(kvi + count - 1)
        acc, m_i, l_i = _attend_key_block(
            acc, m_i, l_i, q, k_base, v_base, KD, VD, ORDER + h * s_oh, b, h, kb, N, skn, svn, qk_scale,
            BS, D, DV, HAS_ORDER, DOT_F32, MASKED=True, USE_TMA=USE_TMA,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_OBIAS:  # [B, H * DV] fp32: one bias row per head, added before the single rounding
        out += tl.load(OBIAS + (b * H + h) * DV + offs_dv)[None, :]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + rows_m[:, None] * son + offs_dv[None, :],
             cast_out(out, O.dtype.element_ty, DOT_F32), mask=m_ok[:, None])
    tl.store(LSE + b * slb + h * slh + rows_m, lse, mask=m_ok)



def _launch(q, k, v, selection: BlockSelection, scale, order, out_bias=None):
    """out_bias: optional fp32 [B, H * DV] added to the output."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bs = selection.block_size
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    out = out_like(q, dv)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    kvi, kvc = selection.kv_indices, selection.kv_counts
    if kvi.stride(-1) != 1:
        kvi = kvi.contiguous()
    if kvc.stride(-1) != 1:
        kvc = kvc.contiguous()
    has_order = order is not None
    if has_order:
        order = order.contiguous()
    if POISON_OUTPUTS:
        for t in (out, lse):
            t.fill_(float("nan"))
    if sparse_forward_kernel(q, k, v, selection) == "gluon":  # never with a token order
        try:
            _gluon_module().block_sparse_attention_gluon(q, k, v, kvi, kvc, bs, scale, out, lse, out_bias,
                                                         selection.query_group)
            return out, lse
        except (CompilationError, TypeError, AttributeError) as exc:  # API drift: fails before launch
            _gluon_compile_failed(exc)
    dummy = kvc
    use_tma = USE_TMA and not has_order and not interpreting() and _tma_ok(k, v)
    kd = vd = dummy
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k, [1, 1, bs, d])
        vd = TensorDescriptor.from_tensor(v, [1, 1, bs, dv])
    grid = (selection.n_blocks, b * h)
    _bsa_fwd_kernel[grid](
        q, k, v, out, lse, kvi, kvc,
        order if has_order else dummy,
        out_bias if out_bias is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), kvi.stride(0), kvi.stride(1), kvi.stride(2),
        kvc.stride(0), kvc.stride(1), order.stride(0) if has_order else 0,
        h, n, float(scale) * LOG2E,
        BS=bs, D=d, DV=dv, HAS_ORDER=has_order, DOT_F32=interpreting(),
        SPLIT_LAST=has_order, USE_TMA=use_tma, HAS_OBIAS=out_bias is not None, KD=kd, VD=vd,
        num_warps=NUM_WARPS.get(bs, 4), num_stages=NUM_STAGES,
    )
    return out, lse


def _tma_ok(*tensors) -> bool:
    """TMA needs 16-byte aligned bases and strides; head dims above 128 keep pointer loads
    (not measured)."""
    return all(
        t.data_ptr() % 16 == 0 and t.shape[-1] <= 128
        and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors
    )


def _check(q, k, v, selection):
    d, dv = q.shape[-1], v.shape[-1]
    if d not in (16, 32, 64, 128, 256) or dv not in (16, 32, 64, 128, 256):
        raise ValueError(f"Triton block-sparse attention needs head dims in 16..256 (powers of 2), got {d}, {dv}. Try backend='torch'.")
    if selection.block_size not in (16, 32, 64, 128):
        raise ValueError(f"Triton block-sparse attention needs block_size in (16, 32, 64, 128), got {selection.block_size}. Try backend='torch'.")


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as block_sparse_attention_torch; out keeps q's [B, N, H, D] layout when
    q is such a view. out_bias: optional fp32 [B, H * DV] added per head in the epilogue."""
    _check(q, k, v, selection)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    order = selection.token_order
    if order is not None and ORDER_MODE == "permute":
        qw, kw, vw = (to_working_order(t, order) for t in (q, k, v))
        out, lse = _launch(qw, kw, vw, selection, scale, None, out_bias)
        return from_working_order(out, order), from_working_order(lse, order)
    out, lse = _launch(q, k, v, selection, scale, order, out_bias)
    return out, lse


def salad_sparse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    out_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """SALAD's sparse half: O_s + c * b_p, the bias (fp32 [B, H * DV]) added in the epilogue."""
    return block_sparse_attention_triton(q, k, v, selection, scale, out_bias)[0]


def salad_linear_add_triton(
    out: torch.Tensor,
    q: torch.Tensor,
    state: torch.Tensor,
    z: torch.Tensor,
    proj_weight: torch.Tensor,
    linear_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """out += c * O_l W^T per head-merged row (Alg. 1), in place: Proj is folded into the linear
    state (``linear_fold_projection``: B x C x C), and the features (times c) are made
    PROJ_CHUNK_ROWS rows at a time and multiplied straight into out (cuBLAS beta = 1). The
    buffers are one feature chunk and the folded Proj."""
    from ..linear_attn.triton import linear_features_triton, linear_fold_projection

    b, h, n, dv = out.shape
    folded = linear_fold_projection(state, z, proj_weight, q.dtype)
    rows_view = out.transpose(1, 2)  # [B, N, H, DV]
    merged = rows_view.view(b, n, h * dv) if rows_view.is_contiguous() else None
    for r0 in range(0, n, PROJ_CHUNK_ROWS):
        r1 = min(n, r0 + PROJ_CHUNK_ROWS)
        feats = linear_features_triton(q[:, :, r0:r1], z, eps, linear_scale)  # [B, rows, H * D]
        for i in range(b):
            if merged is not None:
                merged[i, r0:r1].addmm_(feats[i], folded[i])
            else:
                rows_view[i, r0:r1] += (feats[i] @ folded[i]).view(r1 - r0, h, dv)
        del feats  # before the next chunk's buffer, so only one is ever alive


__all__ = ["block_sparse_attention_triton", "salad_linear_add_triton", "salad_sparse_triton", "sparse_forward_kernel"]
