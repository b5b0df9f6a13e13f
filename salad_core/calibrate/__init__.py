"""SALAD calibration (issue 7): ST-SWA windows (paper A.1.1) and gate thresholds (paper A.3).

Windows
-------
The dense model is sampled (ComfyUI's sampler, cfg 1) on a few user conditionings for a few
steps. Every self-attention call streams its q/k/v (``SaladSelfAttention.qkv``, the path SALAD
itself uses) into ``windows.band_errors``, which scores every candidate (order, radius) of every
head against dense attention in query chunks (no [N, N] tensor), while the layer's output stays
the stock dense attention, so the trajectory is the dense model's.

RSE, the error that delta bounds (our definition; the paper gives delta = 2.0 without a formula):

    RSE_h = 100 * sum_t ||O_swa[h, t] - O_dense[h, t]||^2 / sum_t ||O_dense[h, t]||^2   [percent]

per head h, over all tokens t of one sample at one step (the attention output before W_o, fp32).
It is the relative squared error in percent: delta = 2.0 allows 2 % of the output energy as
error, a relative L2 error of about 14 %. (A plain ratio would be <= ~1 for any window, so
delta = 2.0 would accept everything; in percent it is a meaningful, fairly tight bound.) A
head's RSE for a setting is its worst value over all calibration calls (prompts x steps x batch),
as the paper's "maximum RSE".

Candidates per head: spatial (frame-major) or temporal (position-major) token order, and a
window radius r of 1 .. n_blocks-1 key blocks each side (window = r * block_size tokens; the
largest is dense). Every radius is tried when there are at most 64, else every radius up to 16
and a geometric grid above.

* delta mode (target_sparsity 0): per head and order the smallest r with RSE <= delta *
  (1 - headroom) on the calibration prompts (headroom 0.1 by default, so that unseen prompts
  stay within delta as well; 0 is the paper's plain rule); the order with the smaller r wins
  (ties: smaller RSE, then spatial).
* sparsity mode (target_sparsity > 0): the per-head choices whose mean kept block fraction over
  all heads and layers is <= 1 - target, with the least total mean RSE (greedy).

Windows are in tokens at the calibrated latent size: calibrate at the size you generate.

Gate thresholds
---------------
A SALAD model (trained weights, every branch kept) is sampled over the prompts for all steps;
the gate of every layer at every step is recorded. Per step the 20/40/60/80th percentiles over
layers (and prompts) are taken and averaged over steps (the paper's timestep-agnostic
thresholds, Fig. 9) -> ``salad.gate_thresholds``; the per-layer mean over steps and prompts ->
``salad.gate_means``, which ``dropping.dropped_layers`` ranks for gate_drop_percentile
(plans: top = largest gates, the paper's best; bottom; random).
"""

from .run import (
    GATE_PERCENTILES,
    GateCalibration,
    CaptureSelfAttention,
    calibrate_gates,
    calibrate_windows,
    collect_window_errors,
    gate_statistics,
    gate_weights,
    split_conditioning,
    window_weights,
)
from .windows import (
    WindowCalibration,
    WindowErrors,
    band_density,
    band_errors,
    candidate_radii,
    select_by_delta,
    select_by_sparsity,
)

__all__ = [
    "GATE_PERCENTILES",
    "CaptureSelfAttention",
    "GateCalibration",
    "WindowCalibration",
    "WindowErrors",
    "band_density",
    "band_errors",
    "calibrate_gates",
    "calibrate_windows",
    "collect_window_errors",
    "candidate_radii",
    "gate_statistics",
    "gate_weights",
    "select_by_delta",
    "select_by_sparsity",
    "split_conditioning",
    "window_weights",
]

from .pipeline import WHAT_CHOICES, CalibrationOutput, calibrate, progress_units  # noqa: E402
from .report import make_plots, measured_sparsity  # noqa: E402

__all__ += ["WHAT_CHOICES", "CalibrationOutput", "calibrate", "progress_units", "make_plots", "measured_sparsity"]
