"""Wan's RoPE embedder, run outside torch.compile.

ComfyUI's WanModel rebuilds its RoPE table (cos and sin of every token position, in fp64;
``comfy.ldm.flux.math.rope``) at every model call, and only self-attention reads it. Compiled,
Inductor fuses that into one pointwise kernel that recomputes the fp64 powers, cos and sin for
every output element: 13.6 ms per step at 1.3B 832x480x81 on an H100, more than compiled SALAD
gains everywhere else (e2e-NOTES session 8). Eager it is about a dozen small kernels per axis
(fp64 pow, cos, sin), well under 1 ms. SALAD's patch swaps the model's ``rope_embedder`` for
this module: the same module and values, called with Dynamo disabled (a graph break at each
rope_encode call, before the layers: one per model call for t2v/i2v)."""

from __future__ import annotations

import torch
from torch import nn


class EagerRopeEmbedder(nn.Module):
    def __init__(self, stock: nn.Module):
        super().__init__()
        while isinstance(stock, EagerRopeEmbedder):  # SALAD applied over SALAD
            stock = stock.stock
        self.stock = stock
        # Made here, not at import: torch.compiler.disable imports Dynamo.
        self._call_eagerly = torch.compiler.disable(_call)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._call_eagerly(self.stock, ids)


def _call(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return module(ids)
