"""One call from a Wan model to a calibrated SALAD weights file (used by the node and the CLI)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from ..weights import SaladWeights, save_salad_weights
from .report import make_plots, summary_text
from .run import GateCalibration, calibrate_gates, calibrate_windows, gate_weights, split_conditioning, window_weights
from .windows import DEFAULT_HEADROOM, WindowCalibration

log = logging.getLogger("salad")
WHAT_CHOICES = ("windows", "gate_thresholds", "both")


@dataclass
class CalibrationOutput:
    weights: SaladWeights
    windows: WindowCalibration | None
    gates: GateCalibration | None
    plots: dict  # name -> PIL image
    summary: str
    path: str | None


def progress_units(what: str, n_prompts: int, steps: int, num_layers: int) -> int:
    """Units ``calibrate`` reports: one per layer call for windows, one per step for gates."""
    total = 0
    if what in ("windows", "both"):
        total += n_prompts * steps * num_layers
    if what in ("gate_thresholds", "both"):
        total += n_prompts * steps
    return total


def calibrate(
    model_patcher,
    conditioning,
    latent,
    steps: int = 4,
    delta: float = 2.0,
    target_sparsity: float = 0.0,
    what: str = "windows",
    weights: SaladWeights | None = None,
    out_path: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    block_size: int = 64,
    progress=None,
    headroom: float = DEFAULT_HEADROOM,
) -> CalibrationOutput:
    if what not in WHAT_CHOICES:
        raise ValueError(f"Expected what in {WHAT_CHOICES}, got {what!r}. Try 'windows'.")
    if what in ("gate_thresholds", "both") and weights is None:
        raise ValueError(
            f"Expected trained SALAD weights for what={what!r}, got none. Try connecting 'SALAD Weights "
            "Loader' with a file from SALAD Train, or what='windows' for a training-free file."
        )
    if out_path and os.path.exists(out_path) and not overwrite:
        raise FileExistsError(
            f"{out_path}: Expected a new file name, got an existing file. Try another output_name "
            "or switch 'overwrite' on (this replaces the file)."
        )
    split_conditioning(conditioning)  # fail fast on bad conditioning
    win = gates = None
    if what in ("windows", "both"):
        win = calibrate_windows(model_patcher, conditioning, latent, steps, delta, target_sparsity,
                                block_size=block_size, seed=seed, progress=progress, headroom=headroom)
        weights = window_weights(model_patcher, win, weights)
    if what in ("gate_thresholds", "both"):
        gates = calibrate_gates(model_patcher, weights, conditioning, latent, steps, seed=seed, progress=progress)
        weights = gate_weights(weights, gates)
    path = None
    if out_path:
        path = save_salad_weights(weights, out_path, overwrite=overwrite)
        weights = replace(weights, source=path)
        log.info("SALAD calibrate: wrote %s", path)
    return CalibrationOutput(weights, win, gates, make_plots(win, gates), summary_text(win, gates, path), path)
