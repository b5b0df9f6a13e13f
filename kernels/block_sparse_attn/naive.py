"""Torch references for block-sparse attention over a BlockSelection.

``block_sparse_attention_naive`` is the readable ground truth: it builds the token-level
[N, N] mask. ``block_sparse_attention_torch`` computes the same thing by gathering the kept key
blocks chunk by chunk (no [N, N] tensor), and is the portable backend.
Both return (out [B, H, N, D] in q's dtype, lse fp32 [B, H, N]) in the original token order.
"""

from __future__ import annotations

import torch

from ..selection import BlockSelection, valid_mask


def to_working_order(x: torch.Tensor, token_order: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N, ...] in original order -> each head's working order."""
    if token_order is None:
        return x
    idx = token_order[None].expand(x.shape[0], -1, -1)
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand_as(x)
    return x.gather(2, idx)


def from_working_order(x: torch.Tensor, token_order: torch.Tensor | None) -> torch.Tensor:
    """Inverse of to_working_order."""
    if token_order is None:
        return x
    idx = token_order[None].expand(x.shape[0], -1, -1)
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand_as(x)
    return torch.empty_like(x).scatter_(2, idx, x)


def block_sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper eq. 2 with the block mask expanded to tokens (materialises [B, H, N, N])."""
    n, d = q.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    bs = selection.block_size
    qw, kw, vw = (to_working_order(t.float(), selection.token_order) for t in (q, k, v))
    token_block = torch.arange(n, device=q.device) // bs
    block_mask = selection.to_dense_block_mask()
    mask = block_mask[:, :, token_block][:, :, :, token_block]
    scores = (qw @ kw.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.softmax(scores, -1) @ vw
    out = from_working_order(out, selection.token_order)
    lse = from_working_order(lse, selection.token_order)
    return out.to(q.dtype), lse


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    max_chunk_elements: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the naive reference, by gathering kept key blocks per query block.

    Works through query blocks in chunks so the score buffer stays under
    ``max_chunk_elements`` fp32 values.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    bs, nb, max_kv = selection.block_size, selection.n_blocks, selection.max_kv
    pad = nb * bs - n
    order = selection.token_order

    def blocks(x):
        x = to_working_order(x, order)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        return x.view(b, h, nb, bs, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    slot_ok = valid_mask(selection)  # [B, H, nb, max_kv]
    token_ok = (torch.arange(nb * bs, device=q.device) < n).view(nb, bs)
    out = torch.empty(b, h, nb, bs, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, nb, bs, dtype=torch.float32, device=q.device)
    per_block = b * h * bs * max_kv * bs
    chunk = max(1, max_chunk_elements // per_block)
    for start in range(0, nb, chunk):
        stop = min(nb, start + chunk)
        idx = selection.kv_indices[:, :, start:stop].long()  # [B, H, c, max_kv]
        flat = idx.reshape(b, h, -1)

        def gather(xb):
            g = xb.gather(2, flat[..., None, None].expand(-1, -1, -1, bs, xb.shape[-1]))
            return g.view(b, h, stop - start, max_kv * bs, xb.shape[-1]).float()

        kg, vg = gather(kb), gather(vb)
        keep = slot_ok[:, :, start:stop, :, None] & token_ok[idx]  # [B, H, c, max_kv, bs]
        keep = keep.reshape(b, h, stop - start, 1, max_kv * bs)
        scores = (qb[:, :, start:stop].float() @ kg.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~keep, float("-inf"))
        block_lse = scores.logsumexp(-1)
        out[:, :, start:stop] = torch.softmax(scores, -1) @ vg
        lse[:, :, start:stop] = block_lse
    out = out.view(b, h, nb * bs, v.shape[-1])[:, :, :n]
    lse = lse.view(b, h, nb * bs)[:, :, :n]
    out = from_working_order(out, order)
    lse = from_working_order(lse, order)
    return out.to(q.dtype), lse
