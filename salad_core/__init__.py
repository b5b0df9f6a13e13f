"""SALAD core: config, attention, weights and the ComfyUI patch. Imports without ComfyUI and
touches no GPU at import time (ComfyUI is imported inside salad_core.patch functions only)."""

from .attention import SaladBranch, SaladSelfAttention, salad_attention
from .config import HeadWindow, SaladConfig
from .weights import (
    SaladMeta,
    SaladWeights,
    SaladWeightsError,
    fresh_salad_weights,
    load_salad_weights,
    save_salad_weights,
)
from .wan import NotWanModelError, WanModelInfo, wan_info

__all__ = [
    "HeadWindow",
    "NotWanModelError",
    "SaladBranch",
    "SaladConfig",
    "SaladMeta",
    "SaladSelfAttention",
    "SaladWeights",
    "SaladWeightsError",
    "WanModelInfo",
    "fresh_salad_weights",
    "load_salad_weights",
    "salad_attention",
    "save_salad_weights",
    "wan_info",
]
