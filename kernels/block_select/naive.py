"""Readable torch reference for block selection (Top-K and ST-SWA). Block-level only: the
largest tensor here is [B, H, n_blocks, n_blocks], never token-by-token."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..selection import (
    BlockSelection,
    block_sizes,
    num_blocks,
    own_key_blocks,
    pool_query_groups,
    selection_from_block_mask,
)


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, N, D] -> fp32 [B, H, n_blocks, D]: mean over the tokens each block really holds."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(b, h, nb, block_size, d).sum(3)
    return sums / block_sizes(n, block_size, x.device).to(torch.float32)[:, None]


def select_topk_blocks_naive(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, query_group: int = 1
) -> BlockSelection:
    """Paper A.1.2: score mean-pooled q blocks against mean-pooled k blocks, keep the top-k key
    blocks per query block; the diagonal block is always kept (it counts towards k).

    query_group 2: query blocks of 2 * block_size tokens (pooled over all their tokens) choose
    among key blocks of block_size; both key blocks they overlap are kept."""
    q_rows = mean_pool_blocks(q, block_size * query_group)
    return _topk_from_rows(q_rows, mean_pool_blocks(k, block_size).transpose(-1, -2), block_size, topk,
                           q.shape[2], query_group)


def select_topk_pooled_naive(
    q_pool: torch.Tensor, k_pool_t: torch.Tensor, block_size: int, topk: int, seq_len: int, query_group: int = 1
) -> BlockSelection:
    """``select_topk_blocks_naive`` from already pooled blocks: q_pool fp32 [B, H, nb, D],
    k_pool_t fp32 [B, H, D, nb] (the pooled k transposed)."""
    q_rows = pool_query_groups(q_pool, seq_len, block_size, query_group)
    return _topk_from_rows(q_rows, k_pool_t, block_size, topk, seq_len, query_group)


def topk_keep_count(topk: int, n_blocks: int, query_group: int) -> int:
    """Key blocks kept per query block: topk, at least the query_group diagonal blocks, at most all."""
    return max(1, min(n_blocks, max(int(topk), query_group)))


def _topk_from_rows(q_rows, k_pool_t, block_size, topk, seq_len, query_group):
    nq, nb = q_rows.shape[2], k_pool_t.shape[-1]
    scores = q_rows @ k_pool_t
    scores = scores.masked_fill(own_key_blocks(nq, nb, query_group, scores.device), float("inf"))
    top = scores.topk(topk_keep_count(topk, nb, query_group), dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    mask = mask.repeat_interleave(query_group, dim=2)[:, :, :nb]
    return replace(selection_from_block_mask(mask, block_size, seq_len), query_group=query_group)


def window_radius_blocks(window: int, block_size: int) -> int:
    """A window of ``window`` tokens each side, in whole key blocks each side."""
    return math.ceil(window / block_size)


def sliding_window_blocks_naive(
    batch: int,
    seq_len: int,
    block_size: int,
    windows: torch.Tensor,
    token_order: torch.Tensor | None,
    device=None,
) -> BlockSelection:
    """ST-SWA (paper A.1.1): each head reads the key blocks within ``windows[h]`` tokens
    (rounded up to whole blocks) of its query block, in that head's working token order.

    windows: int [H] half-width in tokens; a window >= seq_len is dense.
    token_order: int64 [H, N] or None (see BlockSelection).
    """
    nb = num_blocks(seq_len, block_size)
    radius = torch.tensor(
        [window_radius_blocks(int(w), block_size) for w in windows.tolist()], device=device
    )
    ids = torch.arange(nb, device=device)
    dist = (ids[:, None] - ids[None, :]).abs()
    mask = dist[None] <= radius[:, None, None]
    mask = mask.unsqueeze(0).expand(batch, -1, -1, -1)
    return selection_from_block_mask(mask, block_size, seq_len, token_order)


def spatial_temporal_token_order(
    grid: tuple[int, int, int], temporal_heads: torch.Tensor, device=None
) -> torch.Tensor | None:
    """int64 [H, N] working order per head, or None when every head is spatial.

    Spatial heads keep the frame-major order (a frame's tokens are contiguous). Temporal heads
    use position-major order, so one spatial location across all frames is contiguous.
    grid: (frames, height, width) after patchify; temporal_heads: bool [H].
    """
    if not bool(temporal_heads.any()):
        return None
    frames, height, width = grid
    n = frames * height * width
    natural = torch.arange(n, device=device)
    position_major = natural.view(frames, height * width).t().reshape(-1)
    return torch.where(temporal_heads.to(device)[:, None], position_major[None], natural[None])
