"""Pure tensor ops for SALAD attention. Imports neither ComfyUI nor salad_core, and touches no
GPU at import time."""

from .ops import (
    block_sparse_attention,
    linear_attention,
    linear_state_pooled,
    salad_attention,
    select_topk_blocks,
    select_topk_pooled,
    sliding_window_blocks,
)
from .selection import BlockSelection, num_blocks
from . import autograd as _autograd  # noqa: F401  (backward for training)

__all__ = [
    "BlockSelection",
    "block_sparse_attention",
    "linear_attention",
    "linear_state_pooled",
    "num_blocks",
    "salad_attention",
    "select_topk_blocks",
    "select_topk_pooled",
    "sliding_window_blocks",
]
