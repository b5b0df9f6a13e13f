from .naive import (
    mean_pool_blocks,
    select_topk_blocks_naive,
    sliding_window_blocks_naive,
    spatial_temporal_token_order,
    window_radius_blocks,
)

__all__ = [
    "mean_pool_blocks",
    "select_topk_blocks_naive",
    "sliding_window_blocks_naive",
    "spatial_temporal_token_order",
    "window_radius_blocks",
]
