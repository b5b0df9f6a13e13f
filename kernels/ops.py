"""Public SALAD ops, registered as ``torch.library.custom_op`` with fake implementations so
``torch.compile`` (and ComfyUI's compile nodes) trace through them without graph breaks.

Each op dispatches through the backend registry; ``backend`` is "auto", "triton", "flex" or
"torch". Tensors are [B, H, N, D] with any strides.
"""

from __future__ import annotations

import torch

from .block_select.naive import spatial_temporal_token_order
from .layout import into_layout, out_like
from .linear_attn.naive import DEFAULT_EPS
from .registry import implementation
from .selection import BlockSelection, num_blocks


@torch.library.custom_op("salad::select_topk_blocks", mutates_args=())
def _select_topk_blocks_op(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = implementation("select_topk_blocks", backend, q.device)
    selection = impl(q, k, block_size, topk)
    return selection.kv_indices.contiguous(), selection.kv_counts.contiguous()


@_select_topk_blocks_op.register_fake
def _(q, k, block_size, topk, backend):
    b, h, n, _ = q.shape
    nb = num_blocks(n, block_size)
    k_eff = max(1, min(topk, nb))
    return (
        q.new_empty((b, h, nb, k_eff), dtype=torch.int32),
        q.new_empty((b, h, nb), dtype=torch.int32),
    )


def select_topk_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, backend: str = "auto"
) -> BlockSelection:
    """Top-K block selection (paper A.1.2), diagonal always kept."""
    indices, counts = _select_topk_blocks_op(q, k, block_size, topk, backend)
    return BlockSelection(indices, counts, block_size, q.shape[2])


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
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    selection = BlockSelection(kv_indices, kv_counts, block_size, q.shape[2], token_order)
    impl = implementation("block_sparse_attention", backend, q.device)
    out, lse = impl(q, k, v, selection, scale)
    return into_layout(out, q), lse.contiguous()


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, token_order, block_size, scale, backend):
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
        selection.block_size, scale, backend,
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


@torch.library.custom_op("salad::salad_attention", mutates_args=())
def _salad_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    token_order: torch.Tensor | None,
    block_size: int,
    scale: float,
    eps: float,
    linear_scale: torch.Tensor | None,
    out_bias: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    selection = BlockSelection(kv_indices, kv_counts, block_size, q.shape[2], token_order)
    impl = implementation("salad_attention", backend, q.device)
    out, lse, out_l = impl(q, k, v, selection, scale, eps, linear_scale, out_bias)
    return into_layout(out, q), lse.contiguous(), into_layout(out_l, q)


@_salad_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, token_order, block_size, scale, eps, linear_scale, out_bias, backend):
    b, h, n, _ = q.shape
    return (
        out_like(q, v.shape[-1]),
        q.new_empty((b, h, n), dtype=torch.float32),
        out_like(q, v.shape[-1]),
    )


def salad_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    linear_scale: torch.Tensor | None = None,
    backend: str = "auto",
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both SALAD branches on the same q, k, v: (sparse out, sparse LSE, linear out).

    Equal to ``block_sparse_attention(...)`` and ``linear_attention(...) * linear_scale``; the
    Triton backend applies the linear state in the sparse kernel's epilogue, reading q once.
    linear_scale: optional fp32 [B] (e.g. lambda * s_l * gate) folded into the linear output.
    out_bias: optional [B, H * Dv] added to the sparse output (head h takes columns
    h * Dv ... (h + 1) * Dv), e.g. the gated Proj bias; the Triton kernel adds it in its epilogue."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, h = q.shape[:2]
    if out_bias is not None:
        if out_bias.shape != (b, h * v.shape[-1]):
            raise ValueError(
                f"Expected out_bias of shape {(b, h * v.shape[-1])} ([B, H * Dv]), got "
                f"{tuple(out_bias.shape)}. Try bias.expand(B, -1) for one bias shared by the batch."
            )
        out_bias = out_bias.to(torch.float32).contiguous()
    return _salad_attention_op(
        q, k, v, selection.kv_indices, selection.kv_counts, selection.token_order,
        selection.block_size, scale, float(eps), linear_scale, out_bias, backend,
    )
