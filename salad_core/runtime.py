"""Per-patched-model state shared by every SALAD layer: the config, which layers keep their
linear branch, the cached ST-SWA selections, the current call's step, and the stats."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

import kernels
from kernels.registry import resolve_backend

from .config import HeadWindow, SaladConfig, default_head_windows
from .stats import SaladStats
from .wan import WanModelInfo

CALL_KEY = "salad_call"
log = logging.getLogger("salad")


@dataclass(frozen=True)
class CallInfo:
    """What one diffusion-model call needs to know, written by the DIFFUSION_MODEL wrapper."""

    grid: tuple[int, int, int] | None = None
    step: int | None = None
    dense: bool = False
    fused: bool = False  # fused GPU kernels for this call (SaladRuntime.fused_kernels)


class SaladRuntime:
    def __init__(self, config: SaladConfig, info: WanModelInfo, linear_layers: frozenset[int], source: str,
                 branch_bytes: int = 0):
        self.config = config
        self.info = info
        self.linear_layers = linear_layers
        self.source = source
        self.branch_bytes = branch_bytes  # SALAD's own weights (Proj, gate, scale) in a ModelPatcher
        self.stats = SaladStats(info.num_layers)
        self._stswa_cache: dict = {}
        self._windows_cache: dict = {}
        self._warned_dense_topk = False

    # -- per call ---------------------------------------------------------------------------
    def call_info(self, transformer_options: dict) -> CallInfo:
        return transformer_options.get(CALL_KEY) or CallInfo()

    def check_grid(self, grid) -> None:
        """Warn once when an explicit ``topk`` keeps every key block: dense attention, no speed-up."""
        cfg = self.config
        if cfg.sparse_mode != "topk" or cfg.topk == 0 or self._warned_dense_topk:
            return
        n_blocks = kernels.num_blocks(grid[0] * grid[1] * grid[2], cfg.block_size)
        if cfg.topk >= n_blocks:
            self._warned_dense_topk = True
            log.warning("SALAD: topk %d keeps all %d key blocks of this video: attention is dense (no speed-up). "
                        "Try topk 0 (derive it from sparsity) or a value below %d.", cfg.topk, n_blocks, n_blocks)

    def make_call_info(self, grid, transformer_options: dict, device=None) -> CallInfo:
        step = step_index(transformer_options)
        dense = step is not None and step < self.config.dense_steps
        fused = device is not None and self.fused_kernels(torch.device(device))
        return CallInfo(grid=grid, step=step, dense=dense, fused=fused)

    def fused_kernels(self, device: torch.device) -> bool:
        """Whether the hot path uses the fused kernels (q/k norm + RoPE in one pass, the
        linear state with the Top-K pooling, Proj folded into the linear state): on CUDA when
        the Triton backend runs, on CPU only when 'triton' is forced (interpreter tests).
        Decided once per call, outside the layers, so compiled layers see a plain bool."""
        backend = self.config.backend
        if device.type != "cuda" and backend != "triton":
            return False
        return resolve_backend("qk_norm_rope", backend, device) == "triton"

    def linear_active(self, layer: int) -> bool:
        return layer in self.linear_layers

    # -- selection --------------------------------------------------------------------------
    def selection(self, layer: int, q: torch.Tensor, k: torch.Tensor, call: CallInfo) -> kernels.BlockSelection:
        cfg = self.config
        b, _, n, _ = q.shape
        nb = kernels.num_blocks(n, cfg.block_size)
        if cfg.sparse_mode == "topk":
            return kernels.select_topk_blocks(q, k, cfg.block_size, cfg.topk_for(nb), backend=cfg.backend,
                                              query_group=cfg.query_group)
        grid = call.grid
        if grid is None or grid[0] * grid[1] * grid[2] != n:
            raise ValueError(
                f"Expected the latent grid (frames x height x width) to cover the {n} tokens for "
                f"ST-SWA, got grid {grid}. Try sparse_mode 'topk' for this model or input "
                "(e.g. reference latents add tokens outside the video grid)."
            )
        return self._stswa_selection(layer, grid, b, q.device)

    def selection_from_pooled(self, q_pool: torch.Tensor, k_pool_t: torch.Tensor, seq_len: int) -> kernels.BlockSelection:
        """Top-K selection from blocks already mean-pooled (``kernels.linear_state_pooled``)."""
        cfg = self.config
        topk = cfg.topk_for(kernels.num_blocks(seq_len, cfg.block_size))
        return kernels.select_topk_pooled(q_pool, k_pool_t, cfg.block_size, topk, seq_len, backend=cfg.backend,
                                          query_group=cfg.query_group)

    def _stswa_selection(self, layer: int, grid, batch: int, device) -> kernels.BlockSelection:
        cfg = self.config
        windows = self.head_windows(layer, kernels.num_blocks(grid[0] * grid[1] * grid[2], cfg.block_size))
        key = (windows, grid, batch, torch.device(device), cfg.block_size)
        if key not in self._stswa_cache:
            sizes = torch.tensor([w.window for w in windows])
            temporal = torch.tensor([w.kind == "temporal" for w in windows])
            self._stswa_cache[key] = kernels.sliding_window_blocks(batch, grid, cfg.block_size, sizes, temporal, device)
        return self._stswa_cache[key]

    def prepare_selections(self, grid, batch: int, device) -> None:
        """Build the static ST-SWA selections before the layers run (once per grid), so the
        layers only look them up: no work, and nothing for torch.compile to trace."""
        if self.config.sparse_mode != "st_swa" or grid is None:
            return
        for layer in range(self.info.num_layers):
            self._stswa_selection(layer, grid, batch, device)

    def head_windows(self, layer: int, n_blocks: int) -> tuple[HeadWindow, ...]:
        cfg = self.config
        if cfg.windows is not None:
            return cfg.windows[layer]
        if n_blocks not in self._windows_cache:  # a search over radii: once per length
            self._windows_cache[n_blocks] = default_head_windows(self.info.num_heads, n_blocks, cfg.block_size, cfg.sparsity)
        return self._windows_cache[n_blocks]

    # -- stats ------------------------------------------------------------------------------
    # Not while torch.compile traces: host timers, events and Python lists would break the
    # graph; compiled runs report no attention time or gates.
    def timed(self):
        if not torch.compiler.is_compiling() and self.stats.active:
            return self.stats.timed()
        return contextlib.nullcontext()

    def record(self, layer: int, selection: kernels.BlockSelection, gate: torch.Tensor | None) -> None:
        if not torch.compiler.is_compiling() and self.stats.active:
            self.stats.record_layer(layer, selection, gate)


def step_index(transformer_options: dict) -> int | None:
    """Index of the current sampling step in the schedule, or None outside a sampler."""
    schedule = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if schedule is None or sigmas is None:
        return None
    current = sigmas.reshape(-1)[:1].to(schedule.device, schedule.dtype)
    return int((schedule - current).abs().argmin())

