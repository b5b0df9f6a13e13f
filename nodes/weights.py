"""SALAD Weights Loader: a SALAD weights file from models/salad/, or none (training-free)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from salad_core.weights import SaladWeights, SaladWeightsError, load_salad_weights

SaladWeightsIO = io.Custom("SALAD_WEIGHTS")
TRAINING_FREE = "none (training-free)"
MODEL_FOLDER = "salad"


def weights_choices() -> list[str]:
    try:
        files = folder_paths.get_filename_list(MODEL_FOLDER)
    except KeyError:  # folder not registered (pack imported outside ComfyUI's loader)
        files = []
    return [TRAINING_FREE] + list(files)


def describe_weights(weights: SaladWeights | None) -> str:
    """Human-readable metadata of a weights file (or of the training-free mode)."""
    if weights is None:
        return (
            "SALAD weights: none (training-free)\n"
            "Sparse attention only: the linear branch is inactive (zero projection), "
            "gate_drop_percentile has no effect."
        )
    m = weights.meta
    if m.gate_thresholds:
        thresholds = "yes (" + ", ".join(f"p{k}={v:.3f}" for k, v in sorted(
            m.gate_thresholds.items(), key=lambda kv: float(kv[0]))) + ")"
    else:
        thresholds = "no"
    return "\n".join([
        f"SALAD weights: {os.path.basename(weights.source)}",
        f"base model: {m.base_model} (dim {m.dim}, {m.layers} layers, {m.heads} heads)",
        f"sparse mode: {m.sparse_mode}",
        f"topk: {m.topk if m.topk else 'from sparsity'} (block size {m.block_size}"
        + (f", trained with {m.query_block}-token query blocks)" if m.query_block else ")"),
        f"lora rank: {m.lora_rank if m.lora_rank else 'none'}",
        f"trained steps: {m.trained_steps}",
        f"calibrated windows: {'yes' if m.windows is not None else 'no'}",
        f"gate thresholds: {thresholds}",
        f"per-layer gate means: {'yes' if m.gate_means is not None else 'no'}",
        f"format version: {m.format_version}",
    ])


def resolve_weights_path(weights_name: str) -> str:
    path = folder_paths.get_full_path(MODEL_FOLDER, weights_name)
    if path is None:
        raise ValueError(
            f"{weights_name}: Expected a SALAD weights file in models/{MODEL_FOLDER}/, got no such file. "
            f"Try putting the .safetensors file into models/{MODEL_FOLDER}/ and refreshing the node list (press R), "
            f"or choose '{TRAINING_FREE}'."
        )
    return path


class SaladWeightsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaladWeightsLoader",
            display_name="SALAD Weights Loader",
            category="SALAD",
            description=(
                "Loads SALAD weights (linear-branch projection, gates, per-layer scales, optional LoRA, "
                "calibrated ST-SWA windows and gate thresholds) from models/salad/. Choose "
                f"'{TRAINING_FREE}' for plain sparse attention without trained weights."
            ),
            inputs=[
                io.Combo.Input(
                    "weights_name", options=weights_choices(), default=TRAINING_FREE,
                    tooltip=(
                        "A SALAD weights file (.safetensors) from models/salad/, made for the same Wan2.1 "
                        f"model you sample with. '{TRAINING_FREE}': sparse attention only, no linear branch."
                    ),
                ),
            ],
            outputs=[
                SaladWeightsIO.Output(display_name="salad_weights", tooltip="Connect to SALAD Apply."),
                io.String.Output(display_name="info", tooltip="The file's metadata as text."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, weights_name: str):
        # Reload when the file on disk changes; otherwise a stable value, so ComfyUI's cache holds.
        if weights_name == TRAINING_FREE:
            return weights_name
        path = folder_paths.get_full_path(MODEL_FOLDER, weights_name)
        if path is None or not os.path.isfile(path):
            return weights_name
        st = os.stat(path)
        return f"{weights_name}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, weights_name: str) -> io.NodeOutput:
        if weights_name == TRAINING_FREE:
            weights = None
        else:
            path = resolve_weights_path(weights_name)
            try:
                weights = load_salad_weights(path)
            except SaladWeightsError as exc:
                raise ValueError(str(exc)) from None
        text = describe_weights(weights)
        return io.NodeOutput(weights, text, ui=ui.PreviewText(text))
