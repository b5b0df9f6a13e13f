"""The input-dependent scalar gate (paper §4.3, Alg. 1)."""

from __future__ import annotations

import torch
from torch import nn


def scalar_gate(x: torch.Tensor, gate: nn.Module) -> torch.Tensor:
    """G = sigmoid(W_G X + b_G), then the token mean: one fp32 scalar per sample, [B].

    The C -> 1 projection runs in x's dtype (through ``gate``, so ComfyUI can cast it); the
    sigmoid and the mean run in fp32.
    """
    logits = gate(x).float()  # [B, N, 1]
    return torch.sigmoid(logits).mean(dim=(1, 2))
