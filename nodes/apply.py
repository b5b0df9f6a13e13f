"""SALAD Apply: patch a Wan2.1 MODEL so its self-attention runs SALAD (design.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from salad_core.config import BACKENDS, DROP_PLANS, SPARSE_MODES, TOPK_QUERY_BLOCKS, SaladConfig
from salad_core.dropping import dropped_layers
from salad_core.patch import apply_salad, salad_runtime
from salad_core.wan import NotWanModelError, wan_info
from salad_core.weights import SaladWeights, SaladWeightsError

from .weights import SaladWeightsIO

NODE_INFO_KEY = "salad_node_info"

TOOLTIPS = {
    "model": "A Wan2.1 diffusion model (t2v or i2v), e.g. from the stock 'Load Diffusion Model' node.",
    "salad_weights": (
        "Optional SALAD weights from 'SALAD Weights Loader'. Leave unconnected (or choose "
        "'none (training-free)') for sparse attention without the linear branch."
    ),
    "sparse_mode": (
        "topk: per query block keep the k most relevant key blocks (dynamic, VMoBA style). "
        "st_swa: per-head spatial/temporal sliding windows (static; calibrated windows come with the weights file)."
    ),
    "sparsity": (
        "Target fraction of attention blocks skipped (0.90 = 90% skipped); 0 keeps every block. "
        "Higher is faster; the linear branch recovers the lost quality. Unused in st_swa mode when the "
        "weights file has calibrated windows (they set the sparsity)."
    ),
    "topk": (
        "Key blocks kept per query block in topk mode. 0 = derive it from sparsity; a value > 0 overrides "
        "sparsity, and one >= the number of blocks means dense attention (a warning is logged)."
    ),
    "gate_drop_percentile": (
        "Drop the linear branch in this percentage of layers, those with the largest calibrated gate "
        "(needs a weights file with calibrated gate values). 0 = keep every branch; the paper's best is 20 (+5% speed)."
    ),
    "linear_scale": (
        "Static scale (lambda) on the gated linear branch, for all layers. 1.0 = as trained; "
        "the paper finds values a little below 1 can help."
    ),
    "dense_steps": "The first N sampling steps use the stock dense attention (helps layout at high sparsity). 0 = none.",
    "gate_drop_plan": (
        "Which layers gate_drop_percentile drops: top = largest calibrated gates (the paper's best, Table 8), "
        "bottom = smallest, random = a seeded random choice of the same count (for comparison)."
    ),
    "topk_query_block": (
        "topk mode: tokens per query block that chooses key blocks (key blocks stay 64 tokens). "
        "128 = one key list per two 64-token query blocks: faster on Hopper GPUs only (the kernel loads each "
        "key/value tile once for both); choose 64 on other GPUs. 64 = finer choice per query block (about 2% "
        "lower loss in the README's toy study). Use what the weights were trained with (the log warns on a "
        "mismatch, or when a trained file does not record it). st_swa ignores it."
    ),
    "backend": (
        "Kernel backend. auto picks triton -> flex -> torch by device; a forced backend that cannot run "
        "here falls back with a warning in the log."
    ),
}


@dataclass(frozen=True)
class SaladNodeInfo:
    """What SALAD Apply decided, for SALAD Stats: which layers lost their linear branch and why."""

    source: str
    num_layers: int
    dropped: tuple[int, ...]  # by gate_drop_percentile
    zero_projection: tuple[int, ...]  # inactive: projection is zero (training-free / untrained)
    gate_means: tuple[float, ...] | None  # calibrated, from the weights file
    drop_threshold: float | None  # smallest calibrated gate among dropped layers
    gate_drop_percentile: float


QUERY_BLOCKS = tuple(str(t) for t in TOPK_QUERY_BLOCKS)  # topk_query_block options, tokens


def query_group_for(topk_query_block) -> int:
    """SaladConfig.query_group for a topk_query_block widget value (SALAD Apply and SALAD Train)."""
    if str(topk_query_block) not in QUERY_BLOCKS:
        raise ValueError(f"Expected topk_query_block in {QUERY_BLOCKS} (tokens), got {topk_query_block!r}. Try '128'.")
    return TOPK_QUERY_BLOCKS[int(topk_query_block)]


def build_config(sparse_mode="topk", sparsity=0.9, topk=0, gate_drop_percentile=0.0, linear_scale=1.0,
                 dense_steps=0, backend="auto", gate_drop_plan="top", topk_query_block="128") -> SaladConfig:
    """SaladConfig from widget values (ValueError naming the widget on a bad value)."""
    return SaladConfig(
        sparse_mode=str(sparse_mode),
        sparsity=float(sparsity),
        topk=int(topk),
        gate_drop_percentile=float(gate_drop_percentile),
        linear_scale=float(linear_scale),
        dense_steps=int(dense_steps),
        backend=str(backend),
        gate_drop_plan=str(gate_drop_plan),
        query_group=query_group_for(topk_query_block),
    )


def check_model(model) -> None:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(model, "clone") or not hasattr(model, "add_object_patch"):
        raise NotWanModelError(
            f"Expected a ComfyUI MODEL (ModelPatcher) holding a Wan2.1 diffusion model, got {type(model).__name__}. "
            "Try connecting the MODEL output of the stock 'Load Diffusion Model' (UNETLoader) node."
        )
    wan_info(dm, source="the MODEL input")


def node_info(model, config: SaladConfig, weights: SaladWeights | None, patched) -> SaladNodeInfo:
    n = wan_info(model.model.diffusion_model).num_layers
    runtime = salad_runtime(patched)
    active = set(runtime.linear_layers) if runtime is not None else set()
    drop = dropped_layers(config, weights, n) if weights is not None else frozenset()
    means = weights.meta.gate_means if weights is not None else None
    threshold = min(means[layer] for layer in drop) if drop and means is not None else None
    return SaladNodeInfo(
        source=weights.source if weights is not None else "none (training-free)",
        num_layers=n,
        dropped=tuple(sorted(drop)),
        zero_projection=tuple(sorted(set(range(n)) - active - set(drop))),
        gate_means=means,
        drop_threshold=threshold,
        gate_drop_percentile=config.gate_drop_percentile,
    )


class SaladApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="SaladApply",
            display_name="SALAD Apply",
            category="SALAD",
            description=(
                "Replaces the self-attention of a Wan2.1 model with SALAD: high-sparsity attention plus a "
                "gated linear-attention branch. Connect the output MODEL to KSampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip=t["model"]),
                SaladWeightsIO.Input("salad_weights", optional=True, tooltip=t["salad_weights"]),
                io.Combo.Input("sparse_mode", options=list(SPARSE_MODES), default="topk", tooltip=t["sparse_mode"]),
                io.Float.Input("sparsity", default=0.90, min=0.0, max=0.99, step=0.01, tooltip=t["sparsity"]),
                io.Int.Input("topk", default=0, min=0, max=4096, tooltip=t["topk"]),
                io.Float.Input("gate_drop_percentile", default=0.0, min=0.0, max=100.0, step=1.0,
                               tooltip=t["gate_drop_percentile"]),
                io.Float.Input("linear_scale", default=1.0, min=0.0, max=4.0, step=0.05, tooltip=t["linear_scale"]),
                io.Int.Input("dense_steps", default=0, min=0, max=1000, tooltip=t["dense_steps"]),
                io.Combo.Input("backend", options=list(BACKENDS), default="auto", tooltip=t["backend"]),
                io.Combo.Input("gate_drop_plan", options=list(DROP_PLANS), default="top", optional=True,
                               tooltip=t["gate_drop_plan"]),
                # Optional and last, like gate_drop_plan: workflows saved without it load with the default.
                io.Combo.Input("topk_query_block", options=list(QUERY_BLOCKS), default="128", optional=True,
                               tooltip=t["topk_query_block"]),
            ],
            outputs=[io.Model.Output(tooltip="The SALAD-patched model (a clone; the input is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        # Widget values only (linked inputs are not known yet); the model and weights are checked in execute.
        widgets = {k: v for k, v in kwargs.items() if k not in ("model", "salad_weights") and v is not None}
        try:
            build_config(**widgets)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, sparse_mode: str, sparsity: float, topk: int, gate_drop_percentile: float,
                linear_scale: float, dense_steps: int, backend: str, salad_weights=None,
                gate_drop_plan: str = "top", topk_query_block: str = "128") -> io.NodeOutput:
        # Everything is validated here, before any sampler runs: errors name the file/mismatch/fix.
        try:
            if salad_weights is not None and not isinstance(salad_weights, SaladWeights):
                raise ValueError(
                    f"Expected SALAD weights from 'SALAD Weights Loader' on salad_weights, got "
                    f"{type(salad_weights).__name__}. Try connecting a SALAD Weights Loader, or leave it unconnected."
                )
            config = build_config(sparse_mode, sparsity, topk, gate_drop_percentile, linear_scale, dense_steps, backend,
                                  gate_drop_plan, topk_query_block)
            check_model(model)
            patched = apply_salad(model, config, salad_weights)
            patched.set_attachments(NODE_INFO_KEY, node_info(model, config, salad_weights, patched))
        except (SaladWeightsError, NotWanModelError, ValueError) as exc:
            # Same message, raised here: the UI shows it on this node, never deep in the sampler.
            raise ValueError(str(exc)) from None
        return io.NodeOutput(patched)
