"""Plots, measured sparsity and the summary text of a calibration run."""

from __future__ import annotations

import torch

import kernels

from .. import plots
from .run import GateCalibration
from .windows import WindowCalibration


def measured_sparsity(result: WindowCalibration) -> list[float]:
    """Per layer, the fraction of (query, key) token pairs the calibrated ST-SWA selection skips
    at the calibrated grid (from the real selection, partial last block included)."""
    out = []
    for layer in result.windows:
        sizes = torch.tensor([w.window for w in layer])
        temporal = torch.tensor([w.kind == "temporal" for w in layer])
        sel = kernels.sliding_window_blocks(1, result.grid, result.block_size, sizes, temporal, "cpu", backend="torch")
        out.append(sel.sparsity())
    return out


def make_plots(windows: WindowCalibration | None = None, gates: GateCalibration | None = None) -> dict:
    """name -> PIL image, for whatever was calibrated."""
    images = {}
    if gates is not None:
        images["gate_quintiles"] = plots.gate_quantile_plot(list(gates.quantiles), gates.thresholds)
    if windows is not None:
        images["windows"] = plots.window_heatmap(windows.windows, windows.n_blocks, windows.block_size)
        images["sparsity"] = plots.sparsity_bars(measured_sparsity(windows), windows.target_sparsity)
    return images


def summary_text(windows: WindowCalibration | None, gates: GateCalibration | None, path: str | None) -> str:
    parts = []
    if windows is not None:
        sp = measured_sparsity(windows)
        parts.append(windows.summary() + f"\nmeasured sparsity (token pairs): mean {sum(sp) / len(sp):.3f}")
    if gates is not None:
        parts.append(gates.summary())
    if path:
        parts.append(f"written: {path}")
    return "\n\n".join(parts)
