"""SALAD Train: make SALAD weights for a Wan2.1 model inside ComfyUI (single GPU / CPU).

Modes: distillation from prompts (no videos: match the dense model on its own noised
predictions), or from a folder prepared by ``python -m salad_core.train prepare`` (cached latents:
distillation or the paper's flow-matching objective). Writes models/salad/<name>.safetensors.
For multi-GPU or long runs use the CLI (README)."""

from __future__ import annotations

import os

import comfy.model_management
import torch
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from salad_core.config import SPARSE_MODES
from salad_core.train.data import CachedDataset
from salad_core.train.model import DEFAULT_LORA_RANK, SaladTrainModel
from salad_core.train.trainer import TrainConfig, Trainer
from salad_core.wan import NotWanModelError, wan_info
from salad_core.weights import SaladWeightsError, load_salad_weights

from .apply import QUERY_BLOCKS, query_group_for
from .weights import MODEL_FOLDER, SaladWeightsIO

MODES = ("distill_prompts", "distill_latents", "flow_latents")
TOOLTIPS = {
    "model": "The stock Wan2.1 model (your finetune too), not a SALAD-patched one.",
    "mode": ("distill_prompts: no videos needed, the SALAD model learns to match the dense model on your prompts. "
             "distill_latents / flow_latents: a folder made by `python -m salad_core.train prepare` "
             "(flow_latents = the paper's objective on real videos)."),
    "positive": "Prompts for distill_prompts (CLIP Text Encode; every entry / batch row is one prompt).",
    "data_dir": "Prepared data folder (for the *_latents modes).",
    "steps": "Optimizer steps. Paper: 1600 at batch 8.",
    "batch": "Samples per step (gradient accumulation, one at a time). Paper: 8.",
    "learning_rate": "AdamW learning rate. Paper: 1e-4.",
    "lora_rank": "LoRA rank on q/k/v/o. 256 = the paper's ~165M trainable parameters for 1.3B.",
    "width": "Video width for distill_prompts.", "height": "Video height for distill_prompts.",
    "length": "Frames for distill_prompts (4k + 1). Paper: 77.",
    "output_name": "File name written into models/salad/ (.safetensors added).",
    "sparse_mode": ("Sparse attention the model is trained with. topk: per query block keep the most relevant "
                    "key blocks (dynamic). st_swa: spatial/temporal sliding windows (uncalibrated defaults here). "
                    "Train with the mode you will use in SALAD Apply; it is recorded in the file."),
    "sparsity": ("Fraction of attention blocks skipped during training (0.90 = 90% skipped). "
                 "Train at (or near) the sparsity you will generate with."),
    "topk_query_block": ("topk mode: tokens per query block that chooses key blocks (128 or 64), as SALAD Apply's "
                         "widget of the same name; recorded in the file. Apply with the same value."),
    "overwrite": "Replace an existing models/salad/ file of the same name. Off: such a name is an error.",
    "seed": "Seeds the LoRA initialisation, the prompt/sample order and the training noise and noise levels.",
}


def _contexts(positive) -> list:
    out = []
    for cond, _ in positive or []:
        for row in cond:
            out.append({"latent": None, "context": row.float().cpu().clone()})
    return out


class SaladTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="SaladTrain",
            display_name="SALAD Train",
            category="SALAD",
            description="Trains SALAD weights (linear branch, gate, scale, LoRA) for this Wan2.1 model and writes them to models/salad/.",
            inputs=[
                io.Model.Input("model", tooltip=t["model"]),
                io.Combo.Input("mode", options=list(MODES), default="distill_prompts", tooltip=t["mode"]),
                io.Conditioning.Input("positive", optional=True, tooltip=t["positive"]),
                io.String.Input("data_dir", default="", optional=True, tooltip=t["data_dir"]),
                io.Int.Input("steps", default=400, min=1, max=100000, tooltip=t["steps"]),
                io.Int.Input("batch", default=8, min=1, max=256, tooltip=t["batch"]),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5, tooltip=t["learning_rate"]),
                io.Int.Input("lora_rank", default=DEFAULT_LORA_RANK, min=0, max=1024, tooltip=t["lora_rank"]),
                io.Combo.Input("sparse_mode", options=list(SPARSE_MODES), default="topk", tooltip=t["sparse_mode"]),
                io.Float.Input("sparsity", default=0.9, min=0.0, max=0.99, step=0.01, tooltip=t["sparsity"]),
                io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip=t["width"]),
                io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip=t["height"]),
                io.Int.Input("length", default=77, min=1, max=1001, step=4, tooltip=t["length"]),
                io.String.Input("output_name", default="salad_trained", tooltip=t["output_name"]),
                io.Boolean.Input("overwrite", default=False, tooltip=t["overwrite"]),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=t["seed"]),
                io.Combo.Input("topk_query_block", options=list(QUERY_BLOCKS), default="128", optional=True,
                               tooltip=t["topk_query_block"]),
            ],
            outputs=[SaladWeightsIO.Output(display_name="salad_weights"), io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, mode, steps, batch, learning_rate, lora_rank, sparse_mode, sparsity, width, height,
                length, output_name, overwrite, seed, positive=None, data_dir="", topk_query_block="128") -> io.NodeOutput:
        try:
            path = _output_path(output_name)
            if os.path.exists(path) and not overwrite:
                raise FileExistsError(f"{path}: Expected a new file name, got an existing file. Try another "
                                      "output_name or switch overwrite on.")
            dm = getattr(getattr(model, "model", None), "diffusion_model", None)
            wan_info(dm, source="the MODEL input")
            if mode == "distill_prompts":
                dataset = _contexts(positive)
                if not dataset:
                    raise ValueError("Expected prompts in 'positive' for distill_prompts, got none. Try connecting CLIP Text Encode.")
            else:
                dataset = CachedDataset(data_dir)
            cfg = TrainConfig(objective="flow" if mode == "flow_latents" else "distill", steps=steps,
                              global_batch=batch, micro_batch=1, lr=learning_rate, lora_rank=lora_rank,
                              sparse_mode=sparse_mode, sparsity=sparsity, query_group=query_group_for(topk_query_block),
                              frames=length, height=height, width=width,
                              seed=seed, out=os.path.join(folder_paths.get_temp_directory(), "salad_train"),
                              save_every=0, export_every=0)
            comfy.model_management.load_models_gpu([model], force_full_load=True)
            device = comfy.model_management.get_torch_device()
            bar = comfy.utils.ProgressBar(steps)
            # ComfyUI runs nodes under inference_mode; weights loaded there cannot be saved for
            # backward, so training uses normal copies, and the shared model gets its own tensors
            # (and its blocks' modules and forwards, _restore_blocks) back in `finally`.
            # Everything that changes the shared model happens inside the `try`, so a failed set-up
            # (e.g. a SALAD-patched MODEL input) leaves it as it was too.
            with torch.inference_mode(False), torch.enable_grad():
                blocks = _block_state(dm)
                originals = []
                try:
                    _uninference(dm, originals)
                    train_model = SaladTrainModel(dm, cfg.salad_config(), lora_rank, True, True)
                    trainer = Trainer(cfg, model=train_model, dataset=dataset,
                                      model_sampling=model.get_model_object("model_sampling"), device=device,
                                      progress=lambda step, total, loss: bar.update_absolute(step, total))
                    losses = trainer.run(steps)
                    weights = train_model.export_weights(trainer.step)
                finally:  # _restore_blocks undoes all of SaladTrainModel's block changes (what restore() would)
                    _restore_blocks(blocks)
                    _restore_tensors(originals)
            from salad_core.weights import save_salad_weights

            save_salad_weights(weights, path, overwrite=overwrite)
            weights = load_salad_weights(path)
        except (SaladWeightsError, NotWanModelError, FileExistsError, FileNotFoundError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        folder_paths.filename_list_cache.pop(MODEL_FOLDER, None)
        summary = (f"SALAD Train: {mode}, {steps} steps x batch {batch}, loss {losses[0]:.4g} -> {losses[-1]:.4g}; "
                   f"wrote {path}")
        return io.NodeOutput(weights, summary, ui=ui.PreviewText(summary))


def _uninference(module, originals: list) -> None:
    """Swap every inference-mode parameter/buffer for a normal copy. Appends to ``originals``
    as it goes (so a failure part-way still restores what it swapped) every tensor to put
    back, with its requires_grad flag (SaladTrainModel freezes the whole model)."""
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                originals.append((store, name, t, t.requires_grad))
                if t.is_inference():
                    copy = t.clone()
                    store[name] = torch.nn.Parameter(copy, requires_grad=False) if store is m._parameters else copy


def _restore_tensors(originals: list) -> None:
    for store, name, tensor, requires_grad in originals:
        store[name] = tensor
        if tensor.requires_grad != requires_grad:
            tensor.requires_grad_(requires_grad)


def _block_state(dm) -> list:
    """Each block's self-attention module and instance ``forward`` (SaladTrainModel replaces
    both), for _restore_blocks; also covers a SaladTrainModel that failed part-way through."""
    return [(block, block.self_attn, block.__dict__.get("forward")) for block in dm.blocks]


def _restore_blocks(state: list) -> None:
    for block, self_attn, forward in state:
        block.self_attn = self_attn
        if forward is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = forward


def _output_path(output_name: str) -> str:
    name = output_name.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"Expected a plain file name for output_name, got {output_name!r}. Try 'salad_trained'.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(MODEL_FOLDER)[0], name)
