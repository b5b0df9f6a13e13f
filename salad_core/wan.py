"""Recognising a Wan2.1 diffusion model and describing its shape (design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

WAN_HEAD_DIM = 128
SELF_ATTN_PARTS = ("q", "k", "v", "o", "norm_q", "norm_k")
KNOWN_SIZES = {(1536, 30): "1.3b", (5120, 40): "14b"}


class NotWanModelError(ValueError):
    """The model given to SALAD is not a Wan2.1 diffusion model."""


@dataclass(frozen=True)
class WanModelInfo:
    dim: int
    num_heads: int
    num_layers: int
    model_type: str

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def base_model(self) -> str:
        size = KNOWN_SIZES.get((self.dim, self.num_layers), f"d{self.dim}-l{self.num_layers}")
        return f"wan2.1-{self.model_type}-{size}"


def wan_info(diffusion_model: torch.nn.Module, source: str = "the model") -> WanModelInfo:
    """Describe a ComfyUI WanModel, or raise NotWanModelError naming what is wrong."""
    name = type(diffusion_model).__name__
    blocks = getattr(diffusion_model, "blocks", None)
    attn = getattr(blocks[0], "self_attn", None) if blocks is not None and len(blocks) else None
    if not name.startswith("WanModel") or attn is None:
        raise NotWanModelError(
            f"Expected a Wan2.1 diffusion model (ComfyUI WanModel) in {source}, got {name}. "
            "Try loading a Wan2.1 t2v/i2v checkpoint with the stock 'Load Diffusion Model' "
            "(UNETLoader) node and connecting its MODEL output."
        )
    missing = [p for p in SELF_ATTN_PARTS if not hasattr(attn, p)]
    if missing:
        raise NotWanModelError(
            f"Expected Wan self-attention with {SELF_ATTN_PARTS} in {source}, got a module "
            f"missing {missing}. Try a stock Wan2.1 checkpoint; this model variant is not supported."
        )
    dim = int(diffusion_model.dim)
    heads = int(diffusion_model.num_heads)
    if dim % heads or dim // heads != WAN_HEAD_DIM:
        raise NotWanModelError(
            f"Expected Wan2.1 head dim {WAN_HEAD_DIM}, got dim {dim} with {heads} heads in "
            f"{source}. Try a stock Wan2.1 checkpoint."
        )
    return WanModelInfo(dim, heads, len(blocks), str(getattr(diffusion_model, "model_type", "t2v")))
