"""SALAD Calibrate: from a stock Wan2.1 MODEL to a calibrated SALAD weights file in one run
(ST-SWA windows, paper A.1.1; gate thresholds for branch dropping, paper A.3)."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from salad_core import plots
from salad_core.calibrate import WHAT_CHOICES, calibrate, progress_units, split_conditioning
from salad_core.wan import NotWanModelError, wan_info
from salad_core.weights import SaladWeights, SaladWeightsError

from .weights import MODEL_FOLDER, SaladWeightsIO

TOOLTIPS = {
    "model": "The stock Wan2.1 model (Load Diffusion Model, optionally through ModelSamplingSD3), not a SALAD-patched one.",
    "positive": (
        "Calibration prompts (CLIP Text Encode). Every entry / batch row is sampled as its own prompt; "
        "the paper uses 8 prompts."
    ),
    "latent": "An empty video latent of the size you will generate (windows are in tokens at this size).",
    "steps": "Sampling steps per prompt. Windows: a few (4) are enough. Gate thresholds: your inference step count.",
    "delta": (
        "Largest allowed attention error per head, RSE in percent: 100 * ||O_sparse - O_dense||^2 / ||O_dense||^2, "
        "worst case over prompts and steps. The smallest window within 90% of it is chosen (10% headroom "
        "keeps unseen prompts within delta). Paper: 2.0."
    ),
    "target_sparsity": "0 = use delta. > 0: choose the windows that reach this sparsity with the least total error.",
    "what": "windows: ST-SWA windows (new training-free file if no weights connected). gate_thresholds: needs trained weights. both.",
    "salad_weights": "Optional SALAD weights to update (required for gate thresholds). Unconnected: a fresh training-free file.",
    "output_name": "File name written into models/salad/ (.safetensors added). Plots go to output/salad/.",
    "overwrite": "Replace an existing file of that name. Off: an existing name is an error.",
    "seed": "Noise seed of the calibration samples.",
}


def output_path(output_name: str) -> str:
    name = output_name.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(
            f"Expected a plain file name for output_name, got {output_name!r}. Try 'wan_stswa_calibrated'."
        )
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(MODEL_FOLDER)[0], name)


class SaladCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="SaladCalibrate",
            display_name="SALAD Calibrate",
            category="SALAD",
            description=(
                "Calibrates SALAD for a Wan2.1 model: per-head spatial/temporal sliding windows (smallest window with "
                "attention error <= delta) and/or the gate thresholds used by gate_drop_percentile. Writes a SALAD "
                "weights file to models/salad/ and draws the plots."
            ),
            inputs=[
                io.Model.Input("model", tooltip=t["model"]),
                io.Conditioning.Input("positive", tooltip=t["positive"]),
                io.Latent.Input("latent", tooltip=t["latent"]),
                io.Int.Input("steps", default=4, min=1, max=200, tooltip=t["steps"]),
                io.Float.Input("delta", default=2.0, min=0.001, max=1000.0, step=0.1, tooltip=t["delta"]),
                io.Float.Input("target_sparsity", default=0.0, min=0.0, max=0.99, step=0.01, tooltip=t["target_sparsity"]),
                io.Combo.Input("what", options=list(WHAT_CHOICES), default="windows", tooltip=t["what"]),
                SaladWeightsIO.Input("salad_weights", optional=True, tooltip=t["salad_weights"]),
                io.String.Input("output_name", default="salad_calibrated", tooltip=t["output_name"]),
                io.Boolean.Input("overwrite", default=False, tooltip=t["overwrite"]),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=t["seed"]),
            ],
            outputs=[
                SaladWeightsIO.Output(display_name="salad_weights", tooltip="The calibrated weights (also written to models/salad/)."),
                io.Image.Output(display_name="plots", tooltip="Gate quintiles across steps, window heat-map, sparsity per layer."),
                io.String.Output(display_name="summary"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, latent, steps: int, delta: float, target_sparsity: float, what: str,
                output_name: str, overwrite: bool, seed: int = 0, salad_weights=None) -> io.NodeOutput:
        try:
            if salad_weights is not None and not isinstance(salad_weights, SaladWeights):
                raise ValueError(
                    f"Expected SALAD weights from 'SALAD Weights Loader', got {type(salad_weights).__name__}. "
                    "Try connecting a SALAD Weights Loader, or leave it unconnected."
                )
            info = wan_info(getattr(getattr(model, "model", None), "diffusion_model", None), source="the MODEL input")
            path = output_path(output_name)
            total = progress_units(what, len(split_conditioning(positive)), max(1, int(steps)), info.num_layers)
            bar = comfy.utils.ProgressBar(max(1, total))
            out = calibrate(model, positive, latent, steps, delta, target_sparsity, what, salad_weights, path,
                            overwrite, seed, progress=bar.update)
        except (SaladWeightsError, NotWanModelError, FileExistsError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        folder = os.path.join(folder_paths.get_output_directory(), "salad")
        stem = os.path.splitext(os.path.basename(path))[0]
        pngs = plots.save_pngs(out.plots, folder, stem)
        summary = out.summary + ("\nplots: " + ", ".join(pngs) if pngs else "")
        folder_paths.filename_list_cache.pop(MODEL_FOLDER, None)
        return io.NodeOutput(out.weights, plots.to_image_batch(list(out.plots.values())), summary,
                             ui=ui.PreviewText(summary))
