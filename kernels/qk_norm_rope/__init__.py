"""q/k RMSNorm + 3D RoPE of Wan's self-attention in one pass (``salad::qk_norm_rope``)."""

from .op import qk_norm_rope

__all__ = ["qk_norm_rope"]
