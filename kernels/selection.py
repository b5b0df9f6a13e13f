"""The block-sparse structure shared by every kernel: which key blocks each query block reads.

Tensors follow the [B, H, N, D] layout (any strides). Query and key blocks have the same size
and tile the sequence from token 0; the last block may be partial. Top-K may choose one key list
per group of ``query_group`` consecutive query blocks (a 128-token query block over 64-token key
blocks); the list is stored once per query block, so every kernel reads it the same way, and
``query_group`` tells the Hopper kernel that it may load each K/V tile once for the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUERY_GROUPS = (1, 2)


@dataclass(frozen=True)
class BlockSelection:
    """Key blocks kept per (batch, head, query block).

    kv_indices: int32 [B, H, n_blocks, max_kv] — ascending key-block ids; entries past
        ``kv_counts`` are padding (repeat of a valid id) and must be ignored.
    kv_counts: int32 [B, H, n_blocks] — how many entries of ``kv_indices`` are valid.
    token_order: optional int64 [H, N] — per-head permutation: position p of the head's
        working order holds original token ``token_order[h, p]``. ``None`` means the
        natural (frame-major) order for every head. Blocks are taken in the working order.
    query_group: 1, or 2 when query blocks 2m and 2m + 1 hold the same list (Top-K with
        128-token query blocks; ``token_order`` must then be None).
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_size: int
    seq_len: int
    token_order: torch.Tensor | None = None
    query_group: int = 1

    def __post_init__(self):
        check_query_group(self.query_group, self.token_order)
        if self.kv_indices.dim() != 4 or self.kv_counts.dim() != 3:
            raise ValueError(
                f"Expected kv_indices [B, H, n_blocks, max_kv] and kv_counts [B, H, n_blocks], "
                f"got {tuple(self.kv_indices.shape)} and {tuple(self.kv_counts.shape)}. "
                "Try building the selection with select_topk_blocks or sliding_window_blocks."
            )
        if self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"Expected kv_counts shape {tuple(self.kv_indices.shape[:3])}, got "
                f"{tuple(self.kv_counts.shape)}. Try building both from the same call."
            )
        if self.n_blocks != num_blocks(self.seq_len, self.block_size):
            raise ValueError(
                f"Expected {num_blocks(self.seq_len, self.block_size)} query blocks for "
                f"seq_len {self.seq_len} and block_size {self.block_size}, got {self.n_blocks}. "
                "Try rebuilding the selection for this sequence length."
            )

    @property
    def n_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[3]

    def kept_token_pairs(self) -> torch.Tensor:
        """float64 scalar on the selection's device: (query, key) token pairs computed.

        Token-weighted, so a partial last block counts for what it holds. Stays on the
        device (no synchronisation) so it can be recorded during sampling."""
        sizes = block_sizes(self.seq_len, self.block_size, self.kv_counts.device)
        kept = sizes[self.kv_indices.long()] * valid_mask(self).to(sizes.dtype)
        return (kept.sum(-1) * sizes).sum()

    def density(self) -> float:
        """Fraction of (query, key) token pairs computed; 1 - density is the measured sparsity."""
        total = float(self.seq_len) ** 2 * self.kv_counts.shape[0] * self.kv_counts.shape[1]
        return float(self.kept_token_pairs()) / total

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def to_dense_block_mask(self) -> torch.Tensor:
        """bool [B, H, n_blocks, n_blocks]: block-level mask (small; never token-level)."""
        hits = torch.zeros(
            *self.kv_counts.shape, self.n_blocks, dtype=torch.int32, device=self.kv_counts.device
        )
        # scatter_add, not scatter: padding slots repeat a kept id and must not overwrite it.
        hits.scatter_add_(-1, self.kv_indices.long(), valid_mask(self).to(torch.int32))
        return hits > 0


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def block_sizes(seq_len: int, block_size: int, device) -> torch.Tensor:
    """float64 [n_blocks]: tokens in each block (the last may be partial).

    Made on the device without writing a Python number into it: that write is a pageable
    host-to-device copy, which PyTorch follows with a stream synchronisation (once per layer
    in sampling, through the stats' kept_token_pairs)."""
    starts = torch.arange(0, seq_len, block_size, dtype=torch.float64, device=device)
    return (seq_len - starts).clamp(max=block_size)


def check_query_group(query_group: int, token_order: torch.Tensor | None = None) -> None:
    """ValueError unless ``query_group`` is one of QUERY_GROUPS (and 1 with a token order)."""
    if query_group not in QUERY_GROUPS or (query_group > 1 and token_order is not None):
        raise ValueError(
            f"Expected query_group in {QUERY_GROUPS} (2 only without a token_order), got "
            f"{query_group} with token_order {'set' if token_order is not None else 'None'}. "
            "Try query_group=1 (one key list per query block)."
        )


def own_key_blocks(n_groups: int, n_blocks: int, query_group: int, device) -> torch.Tensor:
    """bool [n_groups, n_blocks]: the key blocks a group of ``query_group`` query blocks
    overlaps (its diagonal), which Top-K always keeps."""
    return torch.arange(n_blocks, device=device) // query_group == torch.arange(n_groups, device=device)[:, None]


def pool_query_groups(q_pool: torch.Tensor, seq_len: int, block_size: int, query_group: int) -> torch.Tensor:
    """fp32 [B, H, nb, D] block means -> [B, H, ceil(nb / query_group), D] means over groups of
    ``query_group`` blocks, weighted by the tokens each block holds (so a group's mean is the
    mean over its tokens, a partial last block included)."""
    if query_group == 1:
        return q_pool
    b, h, nb, d = q_pool.shape
    groups = -(-nb // query_group)
    sizes = block_sizes(seq_len, block_size, q_pool.device).to(torch.float32)
    pad = groups * query_group - nb
    weighted = torch.nn.functional.pad(q_pool.float() * sizes[:, None], (0, 0, 0, pad))
    totals = torch.nn.functional.pad(sizes, (0, pad)).view(groups, query_group).sum(-1)
    return weighted.view(b, h, groups, query_group, d).sum(3) / totals[:, None]


def repeat_query_groups(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, query_group: int, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists chosen per group of ``query_group`` query blocks ([B, H, groups, ...]) stored once
    per query block ([B, H, n_blocks, ...]), the layout BlockSelection holds."""
    if query_group == 1:
        return kv_indices, kv_counts
    return (kv_indices.repeat_interleave(query_group, dim=2)[:, :, :n_blocks].contiguous(),
            kv_counts.repeat_interleave(query_group, dim=2)[:, :, :n_blocks].contiguous())


def valid_mask(selection: BlockSelection) -> torch.Tensor:
    """bool [B, H, n_blocks, max_kv]: which kv_indices entries are real."""
    slots = torch.arange(selection.max_kv, device=selection.kv_counts.device)
    return slots < selection.kv_counts.unsqueeze(-1)


def selection_from_block_mask(
    mask: torch.Tensor, block_size: int, seq_len: int, token_order: torch.Tensor | None = None
) -> BlockSelection:
    """Compact a bool [B, H, n_blocks, n_blocks] block mask into a BlockSelection."""
    counts = mask.sum(-1, dtype=torch.int32)
    max_kv = max(int(counts.max()), 1)
    # Sorting keys by (not kept, block id) puts kept ids first, ascending.
    n = mask.shape[-1]
    ids = torch.arange(n, device=mask.device)
    order_key = (~mask).to(torch.int64) * n + ids
    indices = order_key.argsort(dim=-1)[..., :max_kv]
    # Padding slots repeat the first kept id so every index stays in range.
    pad = torch.arange(max_kv, device=mask.device) >= counts.unsqueeze(-1)
    indices = torch.where(pad, indices[..., :1], indices)
    return BlockSelection(indices.to(torch.int32), counts, block_size, seq_len, token_order)
