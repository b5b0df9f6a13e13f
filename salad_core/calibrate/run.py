"""Calibration runs through ComfyUI's sampler (comfy.sample.sample, as KSampler): ST-SWA windows
from the dense model, and gate thresholds from a SALAD model. ComfyUI is imported inside
functions only."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.selection import QUERY_GROUPS

from ..attention import SaladSelfAttention
from ..config import SaladConfig
from ..patch import apply_salad, latent_grid, salad_runtime, self_attn_key, stock_self_attention
from ..runtime import CALL_KEY, CallInfo, SaladRuntime, step_index
from ..wan import wan_info
from ..weights import SaladWeights, SaladWeightsError, fresh_salad_weights
from .windows import DEFAULT_HEADROOM, WindowCalibration, WindowErrors, band_errors, candidate_radii, select_by_delta, select_by_sparsity

log = logging.getLogger("salad")

WRAPPER_KEY = "salad_calibrate"
GATE_PERCENTILES = (20, 40, 60, 80)
SAMPLER, SCHEDULER = "euler", "simple"
Progress = Callable[[int], None]  # called with the number of units just done


def _expect(ok: bool, what: str, got, fix: str) -> None:
    if not ok:
        raise ValueError(f"Expected {what}, got {got}. Try {fix}.")


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def split_conditioning(conditioning) -> list[list]:
    """One ComfyUI CONDITIONING (list of [tensor [B, L, C], dict]) or a list of them -> one
    single-prompt conditioning per entry and batch row: each is calibrated as its own prompt."""
    _expect(
        conditioning is not None and len(conditioning) > 0,
        "at least one conditioning (CONDITIONING from a text encoder node)",
        "nothing",
        "connecting CLIP Text Encode (umt5) to 'positive'; several prompts can be batched or combined",
    )
    items = conditioning
    if all(isinstance(c, list) and c and isinstance(c[0], (list, tuple)) for c in conditioning):
        items = [entry for c in conditioning for entry in c]  # a list of CONDITIONINGs
    out = []
    for entry in items:
        _expect(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0]) and entry[0].dim() == 3,
            "conditioning entries [tensor [B, tokens, channels], dict]",
            type(entry).__name__ if not isinstance(entry, (list, tuple)) else f"an entry of length {len(entry)}",
            "a CONDITIONING output of CLIP Text Encode",
        )
        tensor, extra = entry
        for b in range(tensor.shape[0]):
            sliced = {
                k: (v[b:b + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == tensor.shape[0] else v)
                for k, v in extra.items()
            }
            out.append([[tensor[b:b + 1], sliced]])
    return out


def check_common(model_patcher, conditionings, latent, steps: int):
    """Validate the shared inputs; return (WanModelInfo, latent samples)."""
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if dm is None:
        raise ValueError(
            f"Expected a ComfyUI MODEL (ModelPatcher), got {type(model_patcher).__name__}. "
            "Try the MODEL output of 'Load Diffusion Model' (UNETLoader)."
        )
    info = wan_info(dm, source="the MODEL input")
    _expect(isinstance(steps, int) and steps >= 1, "steps >= 1", steps, "4 for windows, or your sampling step count for gate thresholds")
    _expect(len(conditionings) >= 1, "at least one conditioning", "none", "connecting CLIP Text Encode to 'positive'")
    samples = latent.get("samples") if isinstance(latent, dict) else latent
    _expect(
        torch.is_tensor(samples) and samples.dim() == 5,
        "a Wan video latent [B, 16, frames, height, width]",
        "nothing" if samples is None else (tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__),
        "'EmptyHunyuanLatentVideo' / 'Wan Image To Video' latent of the size you will generate",
    )
    return info, samples


def _sample_all(model_patcher, conditionings, samples, steps: int, seed: int, on_step: Progress | None, after_each=None):
    import comfy.sample

    samples = comfy.sample.fix_empty_latent_channels(model_patcher, samples)
    for i, cond in enumerate(conditionings):
        noise = comfy.sample.prepare_noise(samples, seed + i)
        callback = (lambda step, x0, x, total: on_step(1)) if on_step else None
        comfy.sample.sample(
            model_patcher, noise, steps, 1.0, SAMPLER, SCHEDULER, cond, cond, samples,
            denoise=1.0, disable_pbar=True, seed=seed + i, callback=callback,
        )
        if after_each is not None:
            after_each(i)


# ------------------------------------------------------------------------------------------
# windows
# ------------------------------------------------------------------------------------------

class CaptureSelfAttention(SaladSelfAttention):
    """Runs the stock dense attention for the output (the trajectory is the dense model's) and
    streams this layer's q/k/v (SaladSelfAttention.qkv, the same path SALAD uses) to a sink."""

    def __init__(self, stock, layer: int, runtime: SaladRuntime, apply_rope, sink):
        super().__init__(stock, layer, None, runtime, apply_rope)
        self._sink = sink

    def forward(self, x, freqs, transformer_options={}):
        out = self._stock_forward(x, freqs, transformer_options=transformer_options)
        q, k, v = self.qkv(x, freqs)
        self._sink(self.layer, q, k, v, self.runtime.call_info(transformer_options))
        return out


def _grid_wrapper():
    def wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        grid = latent_grid(x, executor.class_obj.patch_size, time_dim_concat)
        options = {**transformer_options, CALL_KEY: CallInfo(grid=grid, step=step_index(transformer_options))}
        return executor(x, timestep, context, clip_fea, time_dim_concat, options, **kwargs)

    return wrapper


def token_grid(model_patcher, samples) -> tuple[int, int, int]:
    patch = model_patcher.model.diffusion_model.patch_size
    return tuple(math.ceil(s / p) for s, p in zip(samples.shape[2:], patch))


def collect_window_errors(
    model_patcher,
    conditioning,
    latent,
    steps: int = 4,
    block_size: int = 64,
    seed: int = 0,
    max_candidates: int = 64,
    progress: Progress | None = None,
) -> WindowErrors:
    """Sample the dense model on each conditioning for ``steps`` steps and measure the RSE of
    every candidate (order, radius) of every head. ``progress`` is called once per layer call."""
    import comfy.ldm.flux.math
    import comfy.patcher_extension

    conditionings = split_conditioning(conditioning)
    info, samples = check_common(model_patcher, conditionings, latent, steps)
    _expect(block_size in (16, 32, 64, 128), "block_size in (16, 32, 64, 128)", block_size, "64")
    grid = token_grid(model_patcher, samples)
    n = grid[0] * grid[1] * grid[2]
    nb = (n + block_size - 1) // block_size
    _expect(nb >= 2, f"a latent of at least 2 blocks of {block_size} tokens", f"{n} tokens (grid {grid})",
            "a larger latent (the size you will generate)")
    radii = candidate_radii(nb, max_candidates)
    errors = WindowErrors(info.num_layers, info.num_heads, nb, block_size, grid, radii)
    chunk = (1 << 28) if model_patcher.load_device.type == "cuda" else (1 << 25)

    def sink(layer, q, k, v, call: CallInfo):
        err, ref = band_errors(q, k, v, call.grid or grid, block_size, radii, chunk_elements=chunk)
        errors.add(layer, err, ref)
        if progress is not None:
            progress(1)

    clone = model_patcher.clone()
    apply_rope = comfy.ldm.flux.math.apply_rope1
    # A real runtime (only its call info and config are read): the torch backend keeps q/k/v
    # exactly the stock ops.
    runtime = SaladRuntime(SaladConfig(backend="torch"), info, frozenset(), "calibration")
    for layer in range(info.num_layers):
        stock = stock_self_attention(model_patcher, layer)
        clone.add_object_patch(self_attn_key(layer), CaptureSelfAttention(stock, layer, runtime, apply_rope, sink))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _grid_wrapper())
    log.info(
        "SALAD calibrate: windows for %s on %d prompt(s) x %d step(s), grid %s, %d blocks of %d, %d candidate radii",
        info.base_model, len(conditionings), steps, grid, nb, block_size, len(radii),
    )
    with torch.inference_mode():
        _sample_all(clone, conditionings, samples, steps, seed, None)
    errors.check_complete()
    return errors


def calibrate_windows(
    model_patcher,
    conditioning,
    latent,
    steps: int = 4,
    delta: float = 2.0,
    target_sparsity: float = 0.0,
    block_size: int = 64,
    seed: int = 0,
    max_candidates: int = 64,
    progress: Progress | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> WindowCalibration:
    """Each head's ST-SWA order and window: the smallest radius with RSE <= delta, or, when
    ``target_sparsity`` > 0, the least-error windows that reach it (see the package docstring)."""
    _expect(
        isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0,
        "delta > 0 (the largest allowed RSE per head, in percent)", delta, "2.0 (the paper's value)",
    )
    _expect(
        isinstance(target_sparsity, (int, float)) and 0.0 <= target_sparsity < 1.0,
        "target_sparsity in [0, 1)", target_sparsity, "0 (use delta) or e.g. 0.9",
    )
    _expect(0.0 <= headroom < 1.0, "headroom in [0, 1)", headroom, "0.1")
    errors = collect_window_errors(model_patcher, conditioning, latent, steps, block_size, seed, max_candidates, progress)
    result = select_by_sparsity(errors, target_sparsity) if target_sparsity > 0 else select_by_delta(errors, delta, headroom)
    for layer in range(errors.num_layers):
        log.info("SALAD calibrate: %s", result.layer_line(layer))
    return result


def window_weights(model_patcher, result: WindowCalibration, weights: SaladWeights | None = None) -> SaladWeights:
    """``weights`` (or a fresh training-free file) with the calibrated windows in its metadata."""
    info = wan_info(model_patcher.model.diffusion_model, source="the MODEL input")
    if weights is None:
        weights = fresh_salad_weights(info)
    else:
        weights.check_compatible(info)
    return weights.with_meta(sparse_mode="st_swa", block_size=result.block_size, windows=result.windows)


# ------------------------------------------------------------------------------------------
# gate thresholds
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateCalibration:
    gates: tuple[tuple[tuple[float | None, ...], ...], ...]  # [prompt][step][layer]
    quantiles: tuple[dict[str, float], ...]  # per step: percentile -> gate value (over layers, prompts)
    thresholds: dict[str, float]  # percentile -> value averaged over steps (paper A.3)
    means: tuple[float, ...]  # per layer, over steps and prompts (0.0 where the branch never ran)

    def summary(self) -> str:
        th = ", ".join(f"p{k}={v:.4f}" for k, v in self.thresholds.items())
        order = sorted(range(len(self.means)), key=lambda i: -self.means[i])
        return (
            f"Gate thresholds over {len(self.gates)} prompt(s) x {len(self.quantiles)} step(s): {th}\n"
            f"largest mean gates (dropped first by the 'top' plan): "
            + ", ".join(f"layer {i} {self.means[i]:.4f}" for i in order[: max(1, len(order) // 5)])
        )


def gate_statistics(gates) -> GateCalibration:
    """gates [prompt][step][layer] (None where the branch did not run) -> percentiles per step
    over all layers and prompts, their average over steps, and per-layer means."""
    n_steps = min(len(g) for g in gates)
    n_layers = len(gates[0][0])
    quantiles = []
    for s in range(n_steps):
        vals = torch.tensor([v for g in gates for v in g[s] if v is not None], dtype=torch.float64)
        if vals.numel():
            qs = torch.quantile(vals, torch.tensor([p / 100 for p in GATE_PERCENTILES], dtype=torch.float64))
            quantiles.append({str(p): float(q) for p, q in zip(GATE_PERCENTILES, qs)})
    if not quantiles:
        raise ValueError(
            "Expected gate values from the linear branch, got none (every layer's projection is zero "
            "or dropped). Try a trained SALAD weights file (from SALAD Train), not a training-free one."
        )
    thresholds = {str(p): sum(q[str(p)] for q in quantiles) / len(quantiles) for p in GATE_PERCENTILES}
    means = []
    for layer in range(n_layers):
        vals = [g[s][layer] for g in gates for s in range(len(g)) if g[s][layer] is not None]
        means.append(sum(vals) / len(vals) if vals else 0.0)
    frozen = tuple(tuple(tuple(step) for step in g) for g in gates)
    return GateCalibration(frozen, tuple(quantiles), thresholds, tuple(means))


def file_query_group(meta) -> int:
    """SaladConfig.query_group for the Top-K query block a weights file records, when its block
    size can make it; else the default (apply_salad then warns about the mismatch)."""
    group = (meta.query_block or 0) // meta.block_size
    return group if group in QUERY_GROUPS and group * meta.block_size == meta.query_block else SaladConfig.query_group


def calibrate_gates(
    model_patcher,
    weights: SaladWeights,
    conditioning,
    latent,
    steps: int,
    seed: int = 0,
    config: SaladConfig | None = None,
    progress: Progress | None = None,
) -> GateCalibration:
    """Run SALAD (all branches kept) over every conditioning for all ``steps`` and record the
    gate of every layer at every step. ``progress`` is called once per sampling step."""
    conditionings = split_conditioning(conditioning)
    info, samples = check_common(model_patcher, conditionings, latent, steps)
    if weights is None:
        raise ValueError(
            "Expected trained SALAD weights for gate thresholds, got none. Try connecting "
            "'SALAD Weights Loader' with a trained file (or what='windows' for a training-free file)."
        )
    weights.check_compatible(info)
    m = weights.meta
    if config is None:
        windows = m.windows if m.sparse_mode == "st_swa" else None
        config = SaladConfig(sparse_mode=m.sparse_mode, topk=m.topk, block_size=m.block_size, windows=windows,
                             query_group=file_query_group(m))
    from dataclasses import replace

    config = replace(config, gate_drop_percentile=0.0, dense_steps=0)
    patched = apply_salad(model_patcher, config, weights)
    runtime = salad_runtime(patched)
    if not runtime.linear_layers:
        raise SaladWeightsError(
            weights.source, "a trained file (non-zero linear-branch projection in some layer)",
            "all-zero projections (a training-free file)", "a file from SALAD Train, or what='windows'",
        )
    gates = []

    def collect(_):
        gates.append(runtime.stats.summary().gates)

    log.info("SALAD calibrate: gate thresholds on %d prompt(s) x %d step(s)", len(conditionings), steps)
    with torch.inference_mode():
        _sample_all(patched, conditionings, samples, steps, seed, progress, after_each=collect)
    result = gate_statistics(gates)
    for layer, mean in enumerate(result.means):
        log.info("SALAD calibrate: layer %2d: mean gate %.4f%s", layer, mean,
                 "" if layer in runtime.linear_layers else " (branch inactive)")
    return result


def gate_weights(weights: SaladWeights, result: GateCalibration) -> SaladWeights:
    return weights.with_meta(gate_thresholds=dict(result.thresholds), gate_means=tuple(result.means))
