"""Hooking SALAD into a ComfyUI ModelPatcher (design.md §3). The only salad_core file that
imports ComfyUI, always inside functions, so salad_core imports without it."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from .attention import SaladBranch, SaladSelfAttention
from .config import TOPK_QUERY_BLOCKS, SaladConfig
from .dropping import dropped_layers
from .eager_rope import EagerRopeEmbedder
from .runtime import CALL_KEY, SaladRuntime
from .weights import SaladWeights, fresh_salad_weights
from .wan import wan_info

log = logging.getLogger("salad")

WRAPPER_KEY = "salad"
ROPE_KEY = "diffusion_model.rope_embedder"
ATTACHMENT_KEY = "salad_runtime"


def self_attn_key(layer: int) -> str:
    return f"diffusion_model.blocks.{layer}.self_attn"


def stock_self_attention(model_patcher, layer: int) -> torch.nn.Module:
    """The stock module of a block, even if ``model_patcher`` already carries a SALAD patch or
    the shared model is still patched by an earlier SALAD clone (ComfyUI leaves the last
    sampled clone's patches on until the next load; wrapping that module instead of the
    stock one chained every re-queue's SALAD modules and kept their weights alive)."""
    module = model_patcher.get_model_object(self_attn_key(layer))  # patch, else backup, else model
    while isinstance(module, SaladSelfAttention):
        module = module._stock_forward.__self__
    return module


def apply_salad(model_patcher, config: SaladConfig, weights: SaladWeights | None = None):
    """Return a clone of ``model_patcher`` whose Wan self-attention layers run SALAD.

    The input patcher is never mutated. Validation happens before anything is cloned, so a
    bad model or file raises with nothing patched.
    """
    import comfy.ldm.flux.math
    import comfy.model_management
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sd

    dm = model_patcher.model.diffusion_model
    info = wan_info(dm, source="the MODEL input")
    source = weights.source if weights is not None else "training-free (no weights file)"
    if weights is not None:
        weights.check_compatible(info)
        config = _config_for_file(config, weights)
    config.check_windows_for(info.num_layers, info.num_heads)
    drop = dropped_layers(config, weights, info.num_layers)
    weights = weights or fresh_salad_weights(info)

    clone = model_patcher.clone()
    if weights.lora_state():
        # The stock LoRA path, so SALAD's LoRA behaves exactly like a LoRA loader node.
        clone, _ = comfy.sd.load_lora_for_models(clone, None, weights.lora_state(), 1.0, 0.0)

    ref = dm.blocks[0].self_attn.q.weight
    dtype = branch_dtype(ref.dtype, getattr(model_patcher.model, "manual_cast_dtype", None))
    linear_cls = comfy.ops.manual_cast.Linear
    branches, active = [], set()
    for layer in range(info.num_layers):
        branch = SaladBranch(info.dim, linear_cls, device=ref.device, dtype=dtype)
        branch.load_state_dict({k: v.to(dtype) for k, v in weights.branch_state(layer).items()})
        branches.append(branch)
        # A zero projection makes the branch exactly zero: skip its work, it changes nothing.
        if layer not in drop and not branch.projection_is_zero():
            active.add(layer)

    branch_bytes = sum(comfy.model_management.module_size(b) for b in branches)
    runtime = SaladRuntime(config, info, frozenset(active), source, branch_bytes)
    # ComfyUI plans what to unload and how much of a model to keep on the GPU from the patcher's
    # model_size(), which a clone copies from its parent: count SALAD's branch weights in it
    # (and not those of an earlier SALAD patch on ``model_patcher``, which this one replaces).
    earlier = salad_runtime(model_patcher)
    clone.size = model_patcher.model_size() - (earlier.branch_bytes if earlier is not None else 0) + runtime.branch_bytes
    for layer, branch in enumerate(branches):
        module = SaladSelfAttention(
            stock_self_attention(model_patcher, layer), layer, branch, runtime, comfy.ldm.flux.math.apply_rope1
        )
        clone.add_object_patch(self_attn_key(layer), module)
    # The RoPE table eagerly, also under torch.compile (salad_core.eager_rope); a Wan variant
    # without ComfyUI 0.3.75's rope_embedder keeps its own.
    if isinstance(getattr(dm, "rope_embedder", None), torch.nn.Module):
        clone.add_object_patch(ROPE_KEY, EagerRopeEmbedder(model_patcher.get_model_object(ROPE_KEY)))

    ext = comfy.patcher_extension
    # Applied over an earlier SALAD patch: its wrappers and callback go (add_* appends).
    for kind in (ext.WrappersMP.DIFFUSION_MODEL, ext.WrappersMP.OUTER_SAMPLE):
        clone.remove_wrappers_with_key(kind, WRAPPER_KEY)
    for kind in (ext.CallbacksMP.ON_LOAD, ext.CallbacksMP.ON_DETACH):
        clone.remove_callbacks_with_key(kind, WRAPPER_KEY)
    clone.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                               _diffusion_model_wrapper(runtime, tuple(branches), model_patcher.model))
    clone.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper(runtime))
    for kind in (ext.CallbacksMP.ON_LOAD, ext.CallbacksMP.ON_DETACH):
        clone.add_callback_with_key(kind, WRAPPER_KEY, unpin_branches)
    clone.set_attachments(ATTACHMENT_KEY, runtime)
    mode = config.sparse_mode
    if mode == "topk":
        mode += f" ({config.query_block}-token query blocks)"
    log.info(
        "SALAD: %s, %s mode, sparsity %.2f, linear branch in %d/%d layers (%d dropped), backend %s",
        source, mode, config.sparsity, len(active), info.num_layers, len(drop), config.backend,
    )
    return clone


def branch_dtype(weight_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """Storage dtype of SALAD's own branch weights: the model's, unless the model is stored in a
    format that only ComfyUI's manual cast can compute with (fp8 checkpoints or UNETLoader's
    fp8 weight_dtype): small trained weights would lose ~14% of their precision in fp8, so
    they use the model's compute dtype (fp32 when ComfyUI reports none)."""
    if weight_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return weight_dtype
    return compute_dtype if compute_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _config_for_file(config: SaladConfig, weights: SaladWeights) -> SaladConfig:
    """What a weights file decides over the widgets, each said in the log: calibrated ST-SWA
    windows (and the block size they were calibrated with) replace ``sparsity`` in st_swa mode;
    in topk mode they are unused. A block size or Top-K query block other than the file's
    training used is kept (the widgets win) with a warning."""
    meta = weights.meta
    if config.sparse_mode == "topk":
        _check_query_block(config, weights)
    if meta.windows is None:
        if meta.block_size != config.block_size:
            log.warning("SALAD: %s was made with %d-token blocks; running with %d-token blocks.",
                        weights.source, meta.block_size, config.block_size)
        return config
    if config.sparse_mode != "st_swa":
        log.warning("SALAD: %s has calibrated ST-SWA windows, which sparse_mode '%s' does not use. "
                    "Set sparse_mode to 'st_swa' to use them.", weights.source, config.sparse_mode)
        return config
    if config.windows is not None:  # given explicitly (Python API): they win over the file's
        return config
    log.info("SALAD: using the calibrated ST-SWA windows of %s (%d-token blocks); the sparsity setting "
             "is not used.", weights.source, meta.block_size)
    return replace(config, windows=meta.windows, block_size=meta.block_size)


def _check_query_block(config: SaladConfig, weights: SaladWeights) -> None:
    """Warn when Top-K runs with query blocks other than the file's training used (or the file,
    trained, does not say which)."""
    trained, running = weights.meta.query_block, config.query_block
    if trained is None:
        if weights.meta.trained_steps > 0:
            log.warning("SALAD: %s does not record the Top-K query block it was trained with (files written "
                        "before it was recorded were almost all trained with 64 tokens); running with %d. "
                        "Set topk_query_block to 64 for such a file.", weights.source, running)
        return
    if trained == running:
        return
    fix = (f"set topk_query_block to {trained}" if trained in TOPK_QUERY_BLOCKS else
           f"from Python, SaladConfig with block_size * query_group = {trained}")
    log.warning("SALAD: %s was trained with %d-token Top-K query blocks; running with %d (to match: %s).",
                weights.source, trained, running, fix)


def salad_runtime(model_patcher) -> SaladRuntime | None:
    return model_patcher.get_attachment(ATTACHMENT_KEY)


def _format_ms(per_step: list[float | None]) -> str:
    known = [t for t in per_step if t is not None]
    return f"{sum(known) / len(known):.1f} ms/step" if known else "not measured"


def latent_grid(x: torch.Tensor, patch_size, time_dim_concat: torch.Tensor | None) -> tuple[int, int, int]:
    """Token grid (frames, height, width) of a Wan input [B, C, T, H, W] after patchify."""
    frames = x.shape[2] + (time_dim_concat.shape[2] if time_dim_concat is not None else 0)
    sizes = (frames, x.shape[3], x.shape[4])
    return tuple(math.ceil(s / p) for s, p in zip(sizes, patch_size))


def _begin_call(runtime: SaladRuntime, x: torch.Tensor, patch_size, time_dim_concat, transformer_options: dict):
    """Host-side set-up of one diffusion-model call, kept out of torch.compile (ComfyUI's compile
    node compiles the whole diffusion model, this wrapper included): the step index is a host
    sync, and the stats lists change every step, so Dynamo would guard on them and recompile the
    model at every step. The layers only read the returned CallInfo's per-run constants."""
    grid = latent_grid(x, patch_size, time_dim_concat)
    runtime.check_grid(grid)
    call = runtime.make_call_info(grid, transformer_options, x.device)
    if not call.dense:
        runtime.prepare_selections(grid, x.shape[0], x.device)
    runtime.stats.begin_call(call.step, call.dense)
    return call


def place_branches(branches, base_model, device: torch.device) -> None:
    """Move SALAD's branch weights to ``device`` where ComfyUI's loader left them elsewhere.

    ComfyUI loads a patcher's modules only when it loads the model: if another patcher with
    the same weight patches (the dense model, in a graph that compares both) already loaded it
    fully, ModelPatcher.partially_load returns early, and the branches stay where apply_salad
    made them (on the CPU when the model was offloaded then): move them. In a partial (lowvram)
    load ComfyUI places and casts Proj and the gate itself; the scale (a parameter outside any
    leaf module, which ComfyUI's loader skips, and which the layers read in place) is moved
    always."""
    lowvram = getattr(base_model, "model_lowvram", False)
    for branch in branches:
        if branch.scale.device != device:
            branch._apply(lambda t: t.to(device), recurse=False)  # Module.to for the scale alone
        if not lowvram and any(p.device != device for p in branch.parameters()):
            branch.to(device)


def unpin_branches(model_patcher, *_callback_args) -> None:
    """ON_LOAD and ON_DETACH (ComfyUI also detaches a patcher it frees): SALAD's weights never
    stay pinned. ComfyUI pins offloaded weights (lowvram) and unpins them by key path, in a set
    all patchers of a model share; a patcher with the same weights (the dense model) restores
    the stock modules without unpinning, after which SALAD's paths no longer resolve and
    ComfyUI's next unpin_all_weights raises. Unpinned, SALAD's offloaded weights are copied from
    pageable memory."""
    keys = [k for k in model_patcher.pinned if ".salad." in k]
    if not keys:  # the usual case; no import either (ComfyUI also detaches in __del__, at exit too)
        return
    import comfy.model_management
    import comfy.utils

    for key in keys:
        try:
            weight = comfy.utils.get_attr(model_patcher.model, key)
        except AttributeError:  # the path no longer resolves: drop the key ComfyUI would raise on
            weight = None
        if weight is not None:
            comfy.model_management.unpin_memory(weight)
        model_patcher.pinned.discard(key)


def _diffusion_model_wrapper(runtime: SaladRuntime, branches: tuple, base_model):
    # Wrapped here, not as a decorator: torch.compiler.disable imports Dynamo (and Triton), which
    # salad_core must not do at import time.
    begin_call = torch.compiler.disable(_begin_call)
    place = torch.compiler.disable(place_branches)

    def wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        place(branches, base_model, x.device)
        call = begin_call(runtime, x, executor.class_obj.patch_size, time_dim_concat, transformer_options)
        # A copy, so nothing SALAD adds outlives this call.
        options = {**transformer_options, CALL_KEY: call}
        return executor(x, timestep, context, clip_fea, time_dim_concat, options, **kwargs)

    return wrapper


def _outer_sample_wrapper(runtime: SaladRuntime):
    def wrapper(executor, *args, **kwargs):
        runtime.stats.start_run()
        try:
            return executor(*args, **kwargs)
        finally:
            summary = runtime.stats.summary()
            log.info(
                "SALAD run: %d SALAD steps + %d dense, measured sparsity %s, attention %s",
                len(summary.steps), summary.dense_steps,
                "n/a" if summary.sparsity is None else f"{summary.sparsity:.3f}",
                _format_ms(summary.attention_ms),
            )

    return wrapper
