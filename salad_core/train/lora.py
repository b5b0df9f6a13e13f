"""Trainable LoRA on a frozen Linear, in the form ComfyUI's stock LoRA loader applies.

``W' = W + B @ A`` with A [r, in] (Kaiming-uniform init) and B [out, r] (zero init), scale 1
(alpha = rank). A file holding ``<prefix>.lora_A.weight`` / ``<prefix>.lora_B.weight`` and no
``.alpha`` key is applied by ``comfy.sd.load_lora_for_models`` at strength 1 as exactly
``W + B @ A`` (ComfyUI takes alpha = 1.0 when the key is absent), so the exported file
reproduces the trained model with no rescaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T``. ``base`` is kept frozen and is the same module object the
    model already had (ComfyUI's cast/offload ops keep working on it)."""

    def __init__(self, base: nn.Module, rank: int, device=None, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"Expected a LoRA rank >= 1, got {rank}. Try 256 (the paper's budget) or 0 for no LoRA.")
        self.base = base
        out_f, in_f = base.weight.shape
        device = base.weight.device if device is None else device
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT does

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight for device/dtype
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        out = self.base(x)
        return out + low.to(out.dtype)

    @torch.no_grad()
    def merged_delta(self) -> torch.Tensor:
        return self.lora_B.float() @ self.lora_A.float()


def lora_param_count(dim: int, layers: int, rank: int, targets: int = 4) -> int:
    return layers * targets * 2 * dim * rank
