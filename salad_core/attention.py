"""SALAD attention (paper §4, Alg. 1) and the module that replaces Wan's self-attention."""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import nn

import kernels
from kernels.qk_norm_rope import qk_norm_rope

from .gate import scalar_gate
from .wan import SELF_ATTN_PARTS


class SaladBranch(nn.Module):
    """SALAD's own parameters for one layer: Proj (C x C), gate (C -> 1), static scale s_l.

    ``linear_cls`` is the Linear class to build with (ComfyUI passes ``comfy.ops`` so the
    weights are cast and offloaded like the rest of the model)."""

    def __init__(self, dim: int, linear_cls=nn.Linear, device=None, dtype=None):
        super().__init__()
        self.proj = linear_cls(dim, dim, device=device, dtype=dtype)
        self.gate = linear_cls(dim, 1, device=device, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        # Ablations only (paper Tab. 5): a float replaces the input-dependent gate by that
        # constant (1.0 = "w/o gate", 0.5 = "constant scale"); None (default) is the real gate.
        # Not part of the state dict, so it is never written to a SALAD weights file.
        self.fixed_gate: float | None = None

    def gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar gate per sample, [B] fp32: Alg. 1's token-mean gate, or ``fixed_gate``."""
        if self.fixed_gate is None:
            return scalar_gate(x, self.gate)
        return torch.full((x.shape[0],), float(self.fixed_gate), device=x.device, dtype=torch.float32)

    @torch.no_grad()
    def reset_fresh(self) -> None:
        """Zero projection (paper §4.2: training starts from plain sparse attention), neutral
        gate sigmoid(0) = 0.5, scale 1."""
        for p in (self.proj.weight, self.proj.bias, self.gate.weight, self.gate.bias):
            p.zero_()
        self.scale.fill_(1.0)

    def projection_is_zero(self) -> bool:
        return not bool(self.proj.weight.any()) and not bool(self.proj.bias.any())


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H * D]: a view when x is one of a [B, N, H, D] tensor (Wan's layout)."""
    return rearrange(x, "b h n d -> b n (h d)")


def salad_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    selection: kernels.BlockSelection,
    branch: SaladBranch | None,
    linear_scale: float = 1.0,
    backend: str = "auto",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Alg. 1 up to (not including) W_o.

    q, k, v: [B, H, N, D] (RoPE'd q and k); x: the block's input hidden states [B, N, C].
    branch None skips the linear branch (branch dropping, or a zero projection).
    Returns (O~ [B, N, C] in v's dtype, the scalar gate [B] fp32 or None).
    """
    sparse, _ = kernels.block_sparse_attention(q, k, v, selection, backend=backend)  # eq. 2
    out = merge_heads(sparse)
    if branch is None:
        return out, None
    linear = merge_heads(kernels.linear_attention(q, k, v, eps=eps, backend=backend))  # eq. 3
    gate = branch.gate_value(x)  # Alg. 1, G and its token mean
    coeff = (linear_scale * gate * branch.scale.float()).to(out.dtype)  # lambda * s_l * G
    return out + coeff[:, None, None] * branch.proj(linear.to(out.dtype)), gate  # Alg. 1, O~


class SaladSelfAttention(nn.Module):
    """Drop-in replacement for ComfyUI's WanSelfAttention.

    Reuses the stock module's q/k/v/o/norm_q/norm_k submodules (same objects, same names), so
    LoRA patches, weight casting and lowvram loading keep working and unpatching restores the
    stock module. The stock module itself is kept only as a bound forward for dense steps, out
    of this module's parameter tree.
    """

    def __init__(
        self,
        stock: nn.Module,
        layer: int,
        branch: SaladBranch,
        runtime,
        apply_rope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        super().__init__()
        for name in SELF_ATTN_PARTS:
            setattr(self, name, getattr(stock, name))
        self.dim = stock.dim
        self.num_heads = stock.num_heads
        self.head_dim = stock.head_dim
        self.layer = layer
        self.salad = branch
        self.runtime = runtime
        self._apply_rope = apply_rope
        self._stock_forward = stock.forward

    def qkv(self, x, freqs, fused: bool | None = None):
        """RoPE'd q, k and v as [B, H, N, D] views, computed as the stock forward does (also
        used by salad_core.calibrate). With the fused kernels (Triton backend, see
        SaladRuntime.fused_kernels) q/k RMSNorm + RoPE run as one pass
        (``salad::qk_norm_rope``, differentiable: training uses it too); otherwise exactly
        the stock ops."""
        b, n = x.shape[:2]
        h, d = self.num_heads, self.head_dim
        if fused is None:
            fused = self.runtime.fused_kernels(x.device)
        x = _autocast_input(x)
        if fused and self._plain_norms(x):
            backend = self.runtime.config.backend
            q, k = self.q(x), self.k(x)
            q = qk_norm_rope(q, _plain_weight(self.norm_q, q), freqs, h, _eps(self.norm_q, q), backend)
            k = qk_norm_rope(k, _plain_weight(self.norm_k, k), freqs, h, _eps(self.norm_k, k), backend)
            v = self.v(x).view(b, n, h, d)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Same order and dtypes as the stock forward (norm + RoPE in fp32 via apply_rope).
        q = self._apply_rope(self.norm_q(self.q(x)).view(b, n, h, d), freqs).transpose(1, 2)
        k = self._apply_rope(self.norm_k(self.k(x)).view(b, n, h, d), freqs).transpose(1, 2)
        v = self.v(x).view(b, n, h, d).transpose(1, 2)
        return q, k, v

    def _plain_norms(self, x) -> bool:
        return _plain_weight(self.norm_q, x) is not None and _plain_weight(self.norm_k, x) is not None

    def forward(self, x, freqs, transformer_options={}):
        call = self.runtime.call_info(transformer_options)
        if call.dense:
            return self._stock_forward(x, freqs, transformer_options=transformer_options)
        q, k, v = self.qkv(x, freqs, call.fused)
        fused = call.fused and not torch.is_grad_enabled()  # kernels.salad_attention has no backward
        cfg = self.runtime.config
        with self.runtime.timed():
            branch = self.salad if self.runtime.linear_active(self.layer) else None
            fused = fused and (branch is None or _plain_weight(branch.proj, x) is not None)
            linear_state = None
            if fused and branch is not None and cfg.sparse_mode == "topk":
                # One pass over q, k, v makes the linear state and the Top-K pooling.
                state, z, q_pool, k_pool_t = kernels.linear_state_pooled(q, k, v, cfg.block_size, cfg.backend)
                selection = self.runtime.selection_from_pooled(q_pool, k_pool_t, q.shape[2])
                linear_state = (state, z)
            else:
                selection = self.runtime.selection(self.layer, q, k, call)
            if fused:
                out, gate = salad_attention_fused(
                    q, k, v, x, selection, branch, cfg.linear_scale, cfg.backend, cfg.eps, linear_state
                )
            else:
                out, gate = salad_attention(
                    q, k, v, x, selection, branch,
                    linear_scale=cfg.linear_scale, backend=cfg.backend, eps=cfg.eps,
                )
        self.runtime.record(self.layer, selection, gate)
        return self.o(out)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast would cast it for every matmul: q, k, v (and
    their LoRA) then share one cast instead of each making (and saving for backward) its own.
    The forward values are the same (autocast rounds fp32 inputs to that dtype anyway); in the
    backward the consumers' gradients are summed in that dtype before the one cast back, where
    separate casts summed them in fp32 (x-gradient error vs fp64 3.2e-3 -> 4.4e-3 on the tiny
    Wan, bf16): traded for ~5 fewer tensor-sized casts per layer and pass in training."""
    device = x.device.type
    if x.dtype == torch.float32 and device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _eps(norm: nn.Module, x: torch.Tensor) -> float:
    eps = getattr(norm, "eps", None)
    return torch.finfo(x.dtype).eps if eps is None else float(eps)


def _plain_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The module's weight in ``like``'s dtype and device, or None when ComfyUI patches it at
    run time (LoRA weight functions), where only the module's own forward is right."""
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return None
    w = getattr(module, "weight", None)
    return None if w is None else w.to(device=like.device, dtype=like.dtype)


def salad_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    selection: kernels.BlockSelection,
    branch: SaladBranch | None,
    linear_scale: float = 1.0,
    backend: str = "auto",
    eps: float = 1e-6,
    linear_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same result as ``salad_attention`` with fewer passes (the GPU hot path):
    ``kernels.salad_attention`` does the sparse branch (with Proj's bias, scaled by
    lambda * s_l * g, in its epilogue), then the linear branch (Proj folded into its state) in
    row chunks, each multiplied straight into the sparse output. ``linear_state``: (S, z) from
    ``kernels.linear_state_pooled`` when the caller made them with the Top-K pooling."""
    if branch is None:
        sparse, _ = kernels.block_sparse_attention(q, k, v, selection, backend=backend)
        return merge_heads(sparse), None
    gate = branch.gate_value(x)
    coeff = linear_scale * gate * branch.scale.float()  # [B] fp32
    bias = branch.proj.bias
    out = kernels.salad_attention(
        q, k, v, selection, _plain_weight(branch.proj, q),
        proj_bias=None if bias is None else bias.to(device=q.device, dtype=torch.float32),
        linear_scale=coeff, eps=eps, backend=backend, linear_state=linear_state,
    )
    return merge_heads(out), gate  # a view: the op writes [B, N, H, D]
