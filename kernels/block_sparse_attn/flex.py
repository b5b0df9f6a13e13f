"""FlexAttention backend for block-sparse attention (CUDA only), and the BlockMask builder the
benchmark uses to time FlexAttention on exactly SALAD's mask.

FlexAttention has no per-head token order, so temporal heads are permuted by copies here.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..selection import BlockSelection
from .naive import from_working_order, to_working_order


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask_from_selection(selection: BlockSelection):
    """A FlexAttention BlockMask with the same (query block, key block) pairs."""
    from torch.nn.attention.flex_attention import BlockMask

    nb, bs, n = selection.n_blocks, selection.block_size, selection.seq_len
    kvi = selection.kv_indices
    if kvi.shape[-1] < nb:  # FlexAttention wants the full key-block width
        kvi = torch.nn.functional.pad(kvi, (0, nb - kvi.shape[-1]))
    kwargs = {"BLOCK_SIZE": (bs, bs)}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (n, n)
    return BlockMask.from_kv_blocks(selection.kv_counts.contiguous(), kvi.contiguous(), **kwargs)


def flex_call(qw, kw, vw, block_mask, scale, block_size):
    """FlexAttention forward returning (out, lse natural log)."""
    opts = {"BLOCK_M": block_size, "BLOCK_N": block_size}
    fn = _flex()
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return fn(qw, kw, vw, block_mask=block_mask, scale=scale, return_lse=True,
                  kernel_options=opts)
    out, aux = fn(qw, kw, vw, block_mask=block_mask, scale=scale,
                  return_aux=AuxRequest(lse=True), kernel_options=opts)
    return out, aux.lse


def block_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as block_sparse_attention_torch."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    order = selection.token_order
    qw, kw, vw = (to_working_order(t, order) for t in (q, k, v))
    out, lse = flex_call(qw, kw, vw, block_mask_from_selection(selection), scale, selection.block_size)
    return from_working_order(out, order), from_working_order(lse.float(), order)
