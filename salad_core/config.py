"""The one validated, immutable configuration for everything a SALAD user can set."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kernels.selection import QUERY_GROUPS

SPARSE_MODES = ("topk", "st_swa")
HEAD_KINDS = ("spatial", "temporal")
BACKENDS = ("auto", "triton", "flex", "torch")
DROP_PLANS = ("top", "bottom", "random")
BLOCK_SIZES = (16, 32, 64, 128)
# The node's topk_query_block options: tokens per Top-K query block -> query_group over the
# default 64-token key blocks (block_size).
TOPK_QUERY_BLOCKS = {128: 2, 64: 1}


def _expect(ok: bool, what: str, got, fix: str) -> None:
    if not ok:
        raise ValueError(f"Expected {what}, got {got!r}. Try {fix}.")


@dataclass(frozen=True)
class HeadWindow:
    """ST-SWA setting of one head: token order and window half-width in tokens."""

    kind: str
    window: int

    def __post_init__(self):
        _expect(self.kind in HEAD_KINDS, f"head kind in {HEAD_KINDS}", self.kind, "'spatial'")
        _expect(
            isinstance(self.window, int) and self.window >= 1,
            "a window of at least 1 token",
            self.window,
            "a calibrated window from SALAD Calibrate",
        )

    def to_json(self) -> dict:
        return {"kind": self.kind, "window": self.window}

    @classmethod
    def from_json(cls, data: dict) -> "HeadWindow":
        _expect(
            isinstance(data, dict) and {"kind", "window"} <= set(data),
            'a head entry {"kind": ..., "window": ...}',
            data,
            "re-running SALAD Calibrate",
        )
        return cls(str(data["kind"]), int(data["window"]))


@dataclass(frozen=True)
class SaladConfig:
    """User-facing SALAD settings (design.md §1).

    sparse_mode: "topk" (dynamic, VMoBA-style) or "st_swa" (static spatial/temporal windows).
    sparsity: target fraction of (query block, key block) pairs skipped.
    topk: key blocks per query block in topk mode; 0 derives it from ``sparsity``.
    block_size: tokens per query/key block.
    query_group: query blocks per Top-K key list, 1 or 2 (query blocks of block_size or twice
        that many tokens; the node's ``topk_query_block`` widget). 2 (default) lets the Hopper
        kernel load each K/V tile once for both blocks (H100 sparse branch, 1.3B: 1.17 vs 1.41
        ms, attention-h100-s10.md; other GPUs gain nothing); ST-SWA ignores it.
    windows: per layer, per head ST-SWA windows (from calibration); None derives uniform
        windows from ``sparsity`` with heads alternating spatial / temporal.
    linear_scale: static lambda on the gated linear branch (paper eq. 4).
    gate_drop_percentile: drop the linear branch in this percentage of layers, chosen by
        their calibrated gate (``gate_drop_plan``: "top" = largest gates, the paper's best).
    dense_steps: the first sampling steps run the stock dense attention.
    backend: kernel backend, "auto" picks triton -> flex -> torch.
    """

    sparse_mode: str = "topk"
    sparsity: float = 0.9
    topk: int = 0
    block_size: int = 64
    query_group: int = 2
    windows: tuple[tuple[HeadWindow, ...], ...] | None = None
    linear_scale: float = 1.0
    gate_drop_percentile: float = 0.0
    gate_drop_plan: str = "top"
    dense_steps: int = 0
    backend: str = "auto"
    eps: float = field(default=1e-6, repr=False)

    def __post_init__(self):
        _expect(self.sparse_mode in SPARSE_MODES, f"sparse_mode in {SPARSE_MODES}", self.sparse_mode, "'topk'")
        _expect(
            isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0,
            "sparsity in [0, 1)",
            self.sparsity,
            "0.9 (90% of blocks skipped) or 0 for dense",
        )
        _expect(isinstance(self.topk, int) and self.topk >= 0, "topk >= 0", self.topk, "0 to derive it from sparsity")
        _expect(self.block_size in BLOCK_SIZES, f"block_size in {BLOCK_SIZES}", self.block_size, "64")
        _expect(self.query_group in QUERY_GROUPS, f"query_group in {QUERY_GROUPS}", self.query_group,
                "2 (128-token query blocks)")
        _expect(
            isinstance(self.linear_scale, (int, float)) and 0.0 <= self.linear_scale <= 4.0 and math.isfinite(self.linear_scale),
            "linear_scale in [0, 4]",
            self.linear_scale,
            "1.0 (the paper finds a little below 1 can help)",
        )
        _expect(
            isinstance(self.gate_drop_percentile, (int, float)) and 0.0 <= self.gate_drop_percentile <= 100.0,
            "gate_drop_percentile in [0, 100]",
            self.gate_drop_percentile,
            "20 (the paper's best) or 0 to keep every branch",
        )
        _expect(self.gate_drop_plan in DROP_PLANS, f"gate_drop_plan in {DROP_PLANS}", self.gate_drop_plan, "'top'")
        _expect(isinstance(self.dense_steps, int) and self.dense_steps >= 0, "dense_steps >= 0", self.dense_steps, "0")
        _expect(self.backend in BACKENDS, f"backend in {BACKENDS}", self.backend, "'auto'")
        _expect(self.eps > 0, "eps > 0", self.eps, "1e-6")
        if self.windows is not None:
            _expect(
                isinstance(self.windows, tuple)
                and all(isinstance(layer, tuple) and layer and all(isinstance(w, HeadWindow) for w in layer) for layer in self.windows),
                "windows as a tuple (layers) of non-empty tuples (heads) of HeadWindow",
                type(self.windows).__name__,
                "windows from a calibrated SALAD weights file",
            )

    @property
    def query_block(self) -> int:
        """Tokens per Top-K query block (query_group blocks of block_size)."""
        return self.query_group * self.block_size

    def topk_for(self, n_blocks: int) -> int:
        """Key blocks kept per query block for a sequence of ``n_blocks`` blocks."""
        if self.topk > 0:
            return min(self.topk, n_blocks)
        return max(1, min(n_blocks, round((1.0 - self.sparsity) * n_blocks)))

    def check_windows_for(self, num_layers: int, num_heads: int) -> None:
        if self.windows is None:
            return
        shape = (len(self.windows), {len(layer) for layer in self.windows})
        _expect(
            shape == (num_layers, {num_heads}),
            f"ST-SWA windows for {num_layers} layers x {num_heads} heads",
            f"{shape[0]} layers x {sorted(shape[1])} heads",
            "calibrating windows for this model with SALAD Calibrate",
        )


def uniform_window_blocks(n_blocks: int, sparsity: float) -> int:
    """Radius r (in blocks) whose band |i - j| <= r keeps the fraction closest to 1 - sparsity."""
    target = 1.0 - sparsity

    def density(r: int) -> float:
        return (n_blocks * (2 * r + 1) - r * (r + 1)) / n_blocks**2

    return min(range(n_blocks), key=lambda r: abs(density(r) - target))


def default_head_windows(num_heads: int, n_blocks: int, block_size: int, sparsity: float) -> tuple[HeadWindow, ...]:
    """Uncalibrated ST-SWA: heads alternate spatial / temporal, one window for the target sparsity."""
    radius = uniform_window_blocks(n_blocks, sparsity) if sparsity > 0 else n_blocks
    window = max(1, radius * block_size)
    return tuple(HeadWindow(HEAD_KINDS[h % 2], window) for h in range(num_heads))
