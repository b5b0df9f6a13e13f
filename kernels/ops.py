"""Public SALAD ops, registered as ``torch.library.custom_op`` with fake implementations so
``torch.compile`` (and ComfyUI's compile nodes) trace through them without graph breaks.

Each op dispatches through the backend registry; ``backend`` is "auto", "triton", "flex" or
"torch". Tensors are [B, H, N, D] with any strides.
"""

from __future__ import annotations

import torch

from .block_select.naive import spatial_temporal_token_order, topk_keep_count
from .layout import into_layout, out_like
from .linear_attn.naive import DEFAULT_EPS
from .registry import implementation
from .selection import BlockSelection, check_query_group, num_blocks


@torch.library.custom_op("salad::select_topk_blocks", mutates_args=())
def _select_topk_blocks_op(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, query_group: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = implementation("select_topk_blocks", backend, q.device)
    selection = impl(q, k, block_size, topk, query_group)
    return selection.kv_indices.contiguous(), selection.kv_counts.contiguous()


def _fake_topk_selection(like: torch.Tensor, b: int, h: int, nb: int, topk: int, query_group: int):
    """The (kv_indices, kv_counts) a Top-K selection op returns, as empty int32 tensors."""
    k_eff = topk_keep_count(topk, nb, query_group)
    return like.new_empty((b, h, nb, k_eff), dtype=torch.int32), like.new_empty((b, h, nb), dtype=torch.int32)


@_select_topk_blocks_op.register_fake
def _(q, k, block_size, topk, query_group, backend):
    b, h, n, _ = q.shape
    return _fake_topk_selection(q, b, h, num_blocks(n, block_size), topk, query_group)


def select_topk_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, backend: str = "auto", query_group: int = 1
) -> BlockSelection:
    """Top-K block selection (paper A.1.2), diagonal always kept. ``query_group`` 2: query blocks
    of 2 * block_size tokens choose the key blocks (each list stored for both halves)."""
    check_query_group(query_group)
    indices, counts = _select_topk_blocks_op(q, k, block_size, topk, query_group, backend)
    return BlockSelection(indices, counts, block_size, q.shape[2], query_group=query_group)


@torch.library.custom_op("salad::select_topk_pooled", mutates_args=())
def _select_topk_pooled_op(
    q_pool: torch.Tensor, k_pool_t: torch.Tensor, block_size: int, topk: int, seq_len: int, query_group: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = implementation("select_topk_pooled", backend, q_pool.device)
    selection = impl(q_pool, k_pool_t, block_size, topk, seq_len, query_group)
    return selection.kv_indices.contiguous(), selection.kv_counts.contiguous()


@_select_topk_pooled_op.register_fake
def _(q_pool, k_pool_t, block_size, topk, seq_len, query_group, backend):
    b, h, nb, _ = q_pool.shape
    return _fake_topk_selection(q_pool, b, h, nb, topk, query_group)


def select_topk_pooled(
    q_pool: torch.Tensor, k_pool_t: torch.Tensor, block_size: int, topk: int, seq_len: int, backend: str = "auto",
    query_group: int = 1,
) -> BlockSelection:
    """``select_topk_blocks`` from mean-pooled blocks (q_pool fp32 [B, H, nb, D], k_pool_t fp32
    [B, H, D, nb]), e.g. those ``linear_state_pooled`` makes in the linear branch's pass.
    ``query_group`` as in ``select_topk_blocks`` (the pooled q stays per block_size block)."""
    nb = num_blocks(seq_len, block_size)
    if q_pool.shape[2] != nb or k_pool_t.shape[-1] != nb or q_pool.shape[-1] != k_pool_t.shape[-2]:
        raise ValueError(
            f"Expected pooled q [B, H, {nb}, D] and pooled k [B, H, D, {nb}] for {seq_len} tokens in "
            f"blocks of {block_size}, got {tuple(q_pool.shape)} and {tuple(k_pool_t.shape)}. "
            "Try pooling with the same block_size (linear_state_pooled)."
        )
    check_query_group(query_group)
    indices, counts = _select_topk_pooled_op(q_pool, k_pool_t, block_size, topk, seq_len, query_group, backend)
    return BlockSelection(indices, counts, block_size, seq_len, query_group=query_group)


def sliding_window_blocks(
    batch: int,
    grid: tuple[int, int, int],
    block_size: int,
    windows: torch.Tensor,
    temporal_heads: torch.Tensor,
    device,
    backend: str = "auto",
) -> BlockSelection:
    """ST-SWA selection (paper A.1.1): static for a given grid, so callers cache it."""
    seq_len = grid[0] * grid[1] * grid[2]
    order = spatial_temporal_token_order(grid, temporal_heads, device)
    impl = implementation("sliding_window_blocks", backend, torch.device(device))
    return impl(batch, seq_len, block_size, windows, order, device)


@torch.library.custom_op("salad::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    token_order: torch.Tensor | None,
    block_size: int,
    query_group: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    selection = BlockSelection(kv_indices, kv_counts, block_size, q.shape[2], token_order, query_group)
    impl = implementation("block_sparse_attention", backend, q.device)
    out, lse = impl(q, k, v, selection, scale)
    return into_layout(out, q), lse.contiguous()


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, token_order, block_size, query_group, scale, backend):
    b, h, n, _ = q.shape
    return (
        out_like(q, v.shape[-1]),
        q.new_empty((b, h, n), dtype=torch.float32),
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to the selected key blocks (paper eq. 2).

    Returns (out [B, H, N, D] in q's dtype, log-sum-exp fp32 [B, H, N]). When q is a [B, H, N, D]
    view of a [B, N, H, D] tensor, out is laid out the same way (kernels.layout.out_like)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _block_sparse_attention_op(
        q, k, v, selection.kv_indices, selection.kv_counts, selection.token_order,
        selection.block_size, selection.query_group, scale, backend,
    )


@torch.library.custom_op("salad::linear_attention", mutates_args=())
def _linear_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, backend: str
) -> torch.Tensor:
    impl = implementation("linear_attention", backend, q.device)
    return into_layout(impl(q, k, v, eps), q)


@_linear_attention_op.register_fake
def _(q, k, v, eps, backend):
    return out_like(q, v.shape[-1])


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """ReLU linear attention (paper eq. 3), fp32 state, output in q's dtype."""
    return _linear_attention_op(q, k, v, eps, backend)


@torch.library.custom_op("salad::linear_state_pooled", mutates_args=())
def _linear_state_pooled_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = implementation("linear_state_pooled", backend, q.device)
    return tuple(t.contiguous() for t in impl(q, k, v, block_size))


@_linear_state_pooled_op.register_fake
def _(q, k, v, block_size, backend):
    b, h, n, d = k.shape
    nb = num_blocks(n, block_size)
    f32 = dict(dtype=torch.float32)
    return (
        k.new_empty((b, h, d, v.shape[-1]), **f32), k.new_empty((b, h, d), **f32),
        k.new_empty((b, h, nb, d), **f32), k.new_empty((b, h, d, nb), **f32),
    )


def linear_state_pooled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over q, k, v for the linear branch's state and the Top-K selection's pooling:
    (S = sum_j relu(k_j)^T v_j fp32 [B, H, D, Dv], z = sum_j relu(k_j) fp32 [B, H, D],
    mean-pooled q fp32 [B, H, nb, D], mean-pooled k transposed fp32 [B, H, D, nb]).
    Feed the pooled blocks to ``select_topk_pooled`` and (S, z) to ``salad_attention``."""
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"Expected q and k of one shape and v with their [B, H, N], got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}. Try the q, k, v of one attention call."
        )
    return _linear_state_pooled_op(q, k, v, int(block_size), backend)


@torch.library.custom_op("salad::linear_state", mutates_args=())
def _linear_state_op(k: torch.Tensor, v: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = implementation("linear_state", backend, k.device)
    return tuple(t.contiguous() for t in impl(k, v))


@_linear_state_op.register_fake
def _(k, v, backend):
    b, h, _, d = k.shape
    return k.new_empty((b, h, d, v.shape[-1]), dtype=torch.float32), k.new_empty((b, h, d), dtype=torch.float32)


# salad_attention's two halves are separate ops, so that under torch.compile k and v (dead once
# the sparse branch has run) are freed before the linear branch's buffers are made: the peak is
# then q, k, v and the output, not those plus a feature chunk (14B compiled step: -0.10 GiB).
@torch.library.custom_op("salad::salad_sparse", mutates_args=())
def _salad_sparse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    token_order: torch.Tensor | None,
    block_size: int,
    query_group: int,
    out_bias: torch.Tensor | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    selection = BlockSelection(kv_indices, kv_counts, block_size, q.shape[2], token_order, query_group)
    impl = implementation("salad_sparse", backend, q.device)
    return into_layout(impl(q, k, v, selection, out_bias, scale), q)


@_salad_sparse_op.register_fake
def _(q, k, v, kv_indices, kv_counts, token_order, block_size, query_group, out_bias, scale, backend):
    return out_like(q, v.shape[-1])


@torch.library.custom_op("salad::salad_linear_add_", mutates_args=("out",))
def _salad_linear_add_op(
    out: torch.Tensor,
    q: torch.Tensor,
    state: torch.Tensor,
    z: torch.Tensor,
    proj_weight: torch.Tensor,
    linear_scale: torch.Tensor | None,
    eps: float,
    backend: str,
) -> None:
    implementation("salad_linear_add", backend, q.device)(out, q, state, z, proj_weight, linear_scale, eps)


@_salad_linear_add_op.register_fake
def _(out, q, state, z, proj_weight, linear_scale, eps, backend):
    return None


def salad_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    linear_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The SALAD attention output before the stock output projection (Alg. 1):
    O_s + c * (O_l W_p^T + b_p), with O_s the block-sparse branch, O_l the linear branch and
    c = ``linear_scale`` (fp32 [B], e.g. lambda * s_l * gate; None = 1), over head-merged rows.

    proj_weight: [H * Dv, H * Dv] (Proj), proj_bias: optional [H * Dv]. Returns [B, H, N, Dv] in
    q's layout, so for Wan's [B, N, H, D] views ``out.transpose(1, 2).reshape(B, N, C)`` is free.
    ``linear_state``: the linear branch's (S, z) when already made (``linear_state_pooled``);
    None makes them from k and v. Inference only (no backward).

    Runs as up to three ops: the state (when not given), the sparse branch plus c * b_p, then
    the linear branch added into that output in place. A compiled graph so frees k and v
    before the linear branch's buffers exist (Triton: one chunk of features and the Proj folded
    into the state; no second full-size buffer)."""
    b, h = q.shape[:2]
    c = h * v.shape[-1]
    if proj_weight.shape != (c, c) or (proj_bias is not None and proj_bias.shape != (c,)):
        raise ValueError(
            f"Expected Proj weight [{c}, {c}] and bias [{c}] (H * Dv = {c}), got "
            f"{tuple(proj_weight.shape)} and {None if proj_bias is None else tuple(proj_bias.shape)}. "
            "Try the SALAD weights made for this model (blocks.{i}.salad.proj.*)."
        )
    if linear_scale is not None:
        if linear_scale.shape != (b,):
            raise ValueError(
                f"Expected linear_scale of shape ({b},) (one value per sample), got "
                f"{tuple(linear_scale.shape)}. Try linear_scale.reshape({b})."
            )
        linear_scale = linear_scale.to(torch.float32).contiguous()
    state = z = None
    if linear_state is not None:
        state, z = linear_state
        want = (b, h, k.shape[-1], v.shape[-1])
        if state.shape != want or z.shape != want[:3]:
            raise ValueError(
                f"Expected linear state S {want} and z {want[:3]}, got {tuple(state.shape)} and "
                f"{tuple(z.shape)}. Try linear_state_pooled(q, k, v, ...) on these q, k, v."
            )
        if {state.dtype, z.dtype} != {torch.float32} or state.device != q.device or z.device != q.device:
            raise ValueError(
                f"Expected an fp32 linear state on {q.device}, got S {state.dtype} on {state.device} "
                f"and z {z.dtype} on {z.device}. Try linear_state_pooled(q, k, v, ...) as it returns them."
            )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if linear_state is None:
        state, z = _linear_state_op(k, v, backend)
    out_bias = None  # c * b_p, added by the sparse kernel's epilogue
    if proj_bias is not None:
        coeff = torch.ones(b, device=q.device) if linear_scale is None else linear_scale
        out_bias = (coeff[:, None] * proj_bias.to(device=q.device, dtype=torch.float32)[None, :]).contiguous()
    out = _salad_sparse_op(
        q, k, v, selection.kv_indices, selection.kv_counts, selection.token_order,
        selection.block_size, selection.query_group, out_bias, scale, backend,
    )
    _salad_linear_add_op(out, q, state, z, proj_weight, linear_scale, float(eps), backend)  # out += c * O_l W_p^T
    return out
