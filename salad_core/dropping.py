"""Post-training branch dropping (paper §5.4, Appendix A.3): which layers skip their linear
branch for a given ``gate_drop_percentile``, from the per-layer gate values that calibration
stored in the weights file."""

from __future__ import annotations

import logging
import random

from .config import SaladConfig
from .weights import SaladWeights, SaladWeightsError

log = logging.getLogger("salad")

RANDOM_PLAN_SEED = 0


def dropped_layers(config: SaladConfig, weights: SaladWeights | None, num_layers: int) -> frozenset[int]:
    """Layers whose linear branch is dropped.

    "top" drops the layers with the largest mean gates (the paper's best, Table 8), "bottom"
    the smallest, "random" a seeded random choice of the same count.
    """
    count = round(config.gate_drop_percentile / 100.0 * num_layers)
    if count == 0:
        return frozenset()
    if weights is None:
        log.warning("SALAD: gate_drop_percentile has no effect in training-free mode (no linear branch).")
        return frozenset()
    if config.gate_drop_plan == "random":  # the comparison plan of Table 8: no gate values needed
        return frozenset(random.Random(RANDOM_PLAN_SEED).sample(range(num_layers), count))
    means = weights.meta.gate_means
    if means is None:
        raise SaladWeightsError(
            weights.source, "calibrated per-layer gate values (salad.gate_means)", "none",
            "running SALAD Calibrate (gate thresholds) on this file, or gate_drop_percentile 0",
        )
    order = sorted(range(num_layers), key=lambda layer: means[layer])
    return frozenset(order[-count:] if config.gate_drop_plan == "top" else order[:count])
