"""A trainable SALAD Wan2.1 model (issue 8, paper §4.2 / A.2).

Every block's self-attention becomes a SaladSelfAttention (the same module SALAD Apply uses)
whose q/k/v/o carry trainable LoRA; the linear branch's projection (zero-initialised), gate and
per-layer scale are fully trainable; everything else is frozen. Blocks are gradient-checkpointed.
``dense=True`` runs the stock attention with the frozen base weights: the teacher for
distillation, from the same module tree and no second copy of the model.

Default LoRA rank, matching the paper's ~165M trainable parameters for Wan2.1-1.3B
(dim C = 1536, 30 layers):
    proj   30 x (C^2 + C)          = 70,824,960
    gate   30 x (C + 1)            =     46,110
    scale  30                      =         30
    LoRA   30 x 4 (q,k,v,o) x 2 C r = 368,640 r  -> r = 256: 94,371,840
    total (r = 256)                = 165,242,940  (~165M)
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import SaladBranch, SaladSelfAttention
from ..config import SaladConfig
from ..runtime import CALL_KEY, CallInfo, SaladRuntime
from ..wan import wan_info
from ..weights import LORA_TARGETS, SaladMeta, SaladWeights, branch_key, lora_key
from .lora import LoRALinear

log = logging.getLogger("salad")

DEFAULT_LORA_RANK = 256


def trainable_param_count(dim: int, layers: int, rank: int, linear_branch: bool = True) -> int:
    branch = layers * (dim * dim + dim + dim + 1 + 1) if linear_branch else 0
    return branch + layers * len(LORA_TARGETS) * 2 * dim * rank


def checkpoint_block(block: nn.Module, enabled=lambda: True) -> None:
    """Per-block gradient checkpointing (non-reentrant), by wrapping the block's forward."""
    orig = block.forward

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        if enabled() and torch.is_grad_enabled():
            return checkpoint(orig, *args, use_reentrant=False, **kwargs)
        return orig(*args, **kwargs)

    block.forward = forward


class SaladTrainModel(nn.Module):
    """Wraps a ComfyUI WanModel (``patcher.model.diffusion_model``) in place for training.

    forward(x, sigma, context) returns the flow-matching velocity prediction v (Wan predicts
    noise - x0), computed exactly as ComfyUI's BaseModel does (same casts and timestep).
    """

    def __init__(
        self,
        diffusion_model: nn.Module,
        config: SaladConfig,
        lora_rank: int = DEFAULT_LORA_RANK,
        linear_branch: bool = True,
        checkpointing: bool = True,
        timestep_multiplier: float = 1000.0,
        init: SaladWeights | None = None,
        apply_rope=None,
        fixed_gate: float | None = None,
    ):
        super().__init__()
        if apply_rope is None:
            import comfy.ldm.flux.math

            apply_rope = comfy.ldm.flux.math.apply_rope1
        self.info = wan_info(diffusion_model, source="the model to train")
        config.check_windows_for(self.info.num_layers, self.info.num_heads)
        self.config = config
        self.lora_rank = lora_rank
        self.linear_branch = linear_branch
        self.checkpointing = checkpointing
        self.multiplier = timestep_multiplier
        self.fixed_gate = fixed_gate  # ablation: constant gate instead of the learned one
        diffusion_model.requires_grad_(False)
        self.dm = diffusion_model
        layers = range(self.info.num_layers) if linear_branch else ()
        self.runtime = SaladRuntime(config, self.info, frozenset(layers), "training")
        self.runtime.stats.active = False
        ref = diffusion_model.blocks[0].self_attn.q.weight
        self._stock = []
        for i, block in enumerate(diffusion_model.blocks):
            stock = block.self_attn
            if isinstance(stock, SaladSelfAttention):
                raise ValueError("Expected a stock Wan model, got one already patched with SALAD. Try the unpatched MODEL.")
            branch = SaladBranch(self.info.dim, nn.Linear, device=ref.device, dtype=torch.float32)
            branch.reset_fresh()
            module = SaladSelfAttention(stock, i, branch, self.runtime, apply_rope)
            if lora_rank > 0:
                for t in LORA_TARGETS:
                    setattr(module, t, LoRALinear(getattr(stock, t), lora_rank, device=ref.device))
            branch.requires_grad_(linear_branch)
            if fixed_gate is not None:
                branch.fixed_gate = float(fixed_gate)
                branch.gate.requires_grad_(False)  # unused: nothing to train
            self._stock.append(stock)
            block.self_attn = module
            self._wrap_checkpoint(block)
        if init is not None:
            self.load_salad_weights(init)

    # -- structure ----------------------------------------------------------------------------
    def _wrap_checkpoint(self, block: nn.Module) -> None:
        checkpoint_block(block, lambda: self.checkpointing)

    def restore(self) -> None:
        """Put the stock self-attention modules and block forwards back (the trained SALAD
        parameters stay readable through ``export_weights`` until this is called)."""
        for block, stock in zip(self.dm.blocks, self._stock):
            block.self_attn = stock
            block.__dict__.pop("forward", None)
        self._stock = []

    @property
    def attn(self) -> list[SaladSelfAttention]:
        return [b.self_attn for b in self.dm.blocks]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_trainable()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_trainable())
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"Expected trainable state for {sorted(missing)[:3]}..., got a checkpoint without them.")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    # -- forward -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dm.blocks[0].self_attn.o.weight.dtype

    def forward(self, x, sigma, context, dense: bool = False, c_concat=None, clip_fea=None):
        """x: noised latent [B, 16, T, H, W]; sigma [B] in [0, 1]; context [B, L, 4096]."""
        dtype = self.compute_dtype
        xc = x if c_concat is None else torch.cat([x, c_concat.to(x)], dim=1)
        xc = xc.to(dtype)
        t = (sigma * self.multiplier).float()
        grid = tuple(-(-s // p) for s, p in zip(xc.shape[2:], self.dm.patch_size))
        # fused: the one-pass q/k norm + RoPE (differentiable), and the fused attention op
        # where no gradient is needed (teacher / evaluation passes)
        fused = self.runtime.fused_kernels(xc.device)
        options = {CALL_KEY: CallInfo(grid=grid, step=None, dense=dense, fused=fused)}
        kwargs = {} if clip_fea is None else {"clip_fea": clip_fea.to(dtype)}
        out = self.dm(xc, t, context.to(dtype), transformer_options=options, **kwargs)
        return out.float()

    # -- weights file --------------------------------------------------------------------------
    def export_weights(self, trained_steps: int = 0, dtype: torch.dtype = torch.float32,
                       base_model: str | None = None, full=lambda t: t) -> SaladWeights:
        """The SALAD weights file content. ``full`` gathers a sharded (FSDP2) tensor."""
        if self.fixed_gate is not None:
            raise ValueError(f"Expected a model with the learned gate, got the fixed-gate ablation "
                             f"(gate = {self.fixed_gate}), which a SALAD weights file cannot express. "
                             "Try fixed_gate=None for a model to export.")
        tensors = {}

        def get(t):
            return full(t.detach()).to("cpu", dtype).clone()

        for i, module in enumerate(self.attn):
            for part, value in module.salad.state_dict(keep_vars=True).items():
                tensors[branch_key(i, part)] = get(value)
            if self.lora_rank > 0:
                for t in LORA_TARGETS:
                    lora = getattr(module, t)
                    tensors[lora_key(i, t, "A")] = get(lora.lora_A)
                    tensors[lora_key(i, t, "B")] = get(lora.lora_B)
        c = self.config
        meta = SaladMeta(
            base_model=base_model or self.info.base_model, dim=self.info.dim, layers=self.info.num_layers,
            heads=self.info.num_heads, sparse_mode=c.sparse_mode, topk=c.topk, block_size=c.block_size,
            query_block=c.query_block if c.sparse_mode == "topk" else None,
            windows=c.windows, lora_rank=self.lora_rank, trained_steps=int(trained_steps),
        )
        return SaladWeights(meta, tensors)

    @torch.no_grad()
    def load_salad_weights(self, weights: SaladWeights) -> None:
        """Start from an existing SALAD file (continue training)."""
        weights.check_compatible(self.info)
        if weights.lora_state() and weights.meta.lora_rank != self.lora_rank:
            raise ValueError(
                f"{weights.source}: Expected LoRA rank {self.lora_rank}, got {weights.meta.lora_rank}. "
                f"Try lora_rank={weights.meta.lora_rank}."
            )
        c = self.config
        running = c.query_block if c.sparse_mode == "topk" else None
        if running is not None and weights.meta.query_block not in (None, running):
            log.warning("SALAD: %s was trained with %d-token Top-K query blocks; training on with %d "
                        "(the export records %d).", weights.source, weights.meta.query_block, running, running)
        for i, module in enumerate(self.attn):
            module.salad.load_state_dict({k: v.float() for k, v in weights.branch_state(i).items()})
            for t in LORA_TARGETS if weights.lora_state() else ():
                lora = getattr(module, t)
                lora.lora_A.copy_(weights.tensors[lora_key(i, t, "A")])
                lora.lora_B.copy_(weights.tensors[lora_key(i, t, "B")])


def load_wan_for_training(path: str, dtype: torch.dtype | None = None, device=None):
    """Load a Wan2.1 diffusion-model file with ComfyUI's own loader (as UNETLoader does) and
    return (diffusion_model on ``device``, model_sampling)."""
    import comfy.sd

    opts = {} if dtype is None else {"dtype": dtype}
    patcher = comfy.sd.load_diffusion_model(str(path), model_options=opts)
    model = patcher.model
    dm = model.diffusion_model
    if device is not None:
        dm.to(device)
    return dm, model.model_sampling
