"""Torch references for the ReLU linear-attention branch (paper eq. 3), per head.

``linear_attention_naive`` is the explicit O(N^2) kernel form (the ground truth);
``linear_attention_torch`` uses the associative state form with fp32 sums (the portable
backend), ``linear_attention_backward_torch`` its analytic gradients. Inputs [B, H, N, D]; output
[B, H, N, D] in q's dtype.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-6


def linear_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """O_i = sum_j (relu(q_i).relu(k_j)) v_j / (sum_j relu(q_i).relu(k_j) + eps): builds [N, N]."""
    fq, fk = torch.relu(q.double()), torch.relu(k.double())
    weights = fq @ fk.transpose(-1, -2)
    out = (weights @ v.double()) / (weights.sum(-1, keepdim=True) + eps)
    return out.to(q.dtype)


def linear_attention_state(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j relu(k_j)^T v_j  fp32 [B, H, D, Dv],  sum_j relu(k_j)  fp32 [B, H, D])."""
    fk = torch.relu(k.float())
    return fk.transpose(-1, -2) @ v.float(), fk.sum(2)


def linear_state_pooled_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int):
    """(S, z) of ``linear_attention_state`` with the Top-K selection's pooled blocks:
    (fp32 [B, H, nb, D] mean-pooled q, fp32 [B, H, D, nb] mean-pooled k transposed)."""
    from ..block_select.naive import mean_pool_blocks

    state, z = linear_attention_state(k, v)
    return state, z, mean_pool_blocks(q, block_size), mean_pool_blocks(k, block_size).transpose(-1, -2)


def linear_apply_torch(q: torch.Tensor, state: torch.Tensor, z: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """relu(q) S / (relu(q) z + eps) in fp32, in q's dtype (S, z from linear_attention_state)."""
    fq = torch.relu(q.float())
    out = (fq @ state) / ((fq @ z.unsqueeze(-1)) + eps)
    return out.to(q.dtype)


def linear_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Paper eq. 3, second line: relu(q) H / (relu(q) Z + eps) with fp32 state."""
    return linear_apply_torch(q, *linear_attention_state(k, v), eps)


def linear_attention_backward_torch(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of linear_attention_torch, analytic and in fp32 like it (the portable path;
    formulas in linear_attn/triton_bwd.py). With t = dO S^T and a = dO . o per row:
    dq = (t - a z) / den [q > 0], dS = sum phi(q)^T dO / den, dz = -sum phi(q) a / den,
    dk = (v dS^T + dz) [k > 0], dv = phi(k) dS."""
    state, z = linear_attention_state(k, v)
    fq, fk, do = torch.relu(q.float()), torch.relu(k.float()), grad_out.float()
    den = fq @ z.unsqueeze(-1) + eps  # [B, H, N, 1]
    t = do @ state.transpose(-1, -2)
    a = (fq * t).sum(-1, keepdim=True) / den
    dq = torch.where(q > 0, (t - a * z.unsqueeze(-2)) / den, 0)
    p = fq / den
    dstate = p.transpose(-1, -2) @ do
    dz = -(p * a).sum(2)
    dk = torch.where(k > 0, v.float() @ dstate.transpose(-1, -2) + dz.unsqueeze(-2), 0)
    dv = fk @ dstate
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
