"""SALAD Train node through ComfyUI's executor (CPU, tiny model): distillation from prompts
writes models/salad/<name>.safetensors, and the file then works in the shipped path
(SALAD Weights Loader -> SALAD Apply -> KSampler)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_T2V_NAME as TINY_NAME
from test_nodes import Runner, base_prompt, graph_nodes  # noqa: F401  (fixture)


def test_salad_train_node_writes_weights_that_apply(graph_nodes, comfy_models_dir):  # noqa: F811
    import folder_paths

    from salad_core.weights import load_salad_weights

    runner = Runner()
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "SaladTestConditioning", "inputs": {"batch": 2, "seed": 1, "mode": "random"}},
        "3": {"class_type": "SaladTrain", "inputs": {
            "model": ["1", 0], "mode": "distill_prompts", "positive": ["2", 0], "steps": 2, "batch": 2,
            "learning_rate": 1e-3, "lora_rank": 4, "sparse_mode": "topk", "sparsity": 0.5, "width": 64,
            "height": 64, "length": 9, "output_name": "trained_tiny", "overwrite": True, "seed": 0,
            "topk_query_block": "64"}},
    }
    run = runner.run(prompt)
    assert run.success, run.error
    # The shared (cached) model is left as the node found it: its own (inference-mode) tensors
    # and the stock modules, not the training copies.
    dm = run.output("1").model.diffusion_model
    assert all(p.is_inference() for p in dm.parameters())
    assert {type(b.self_attn).__name__ for b in dm.blocks} == {"WanSelfAttention"}
    path = Path(folder_paths.get_folder_paths("salad")[0]) / "trained_tiny.safetensors"
    w = load_salad_weights(str(path))
    assert w.meta.trained_steps == 2 and w.meta.lora_rank == 4 and w.meta.query_block == 64
    assert "loss" in str(run.ui("3"))

    run2 = runner.run(base_prompt(TINY_NAME, weights="trained_tiny.safetensors", steps=1, stats=False,
                                  sparsity=0.5))
    assert run2.success, run2.error


# --------------------------------------------------------------------------------------------
# a failed set-up leaves the shared model as it was
# --------------------------------------------------------------------------------------------

def _model_state(dm):
    """Everything SALAD Train changes on the shared model: each module's tensors (object,
    value, requires_grad), each block's self-attention module and instance forward."""
    tensors = [(m, store, name, t, t.detach().clone(), t.requires_grad)
               for m in dm.modules() for store in ("_parameters", "_buffers")
               for name, t in getattr(m, store).items() if t is not None]
    blocks = [(b, b.self_attn, b.__dict__.get("forward")) for b in dm.blocks]
    return tensors, blocks


def _assert_unchanged(dm, before):
    tensors, blocks = before
    assert [(b, b.self_attn, b.__dict__.get("forward")) for b in dm.blocks] == blocks
    after = _model_state(dm)[0]
    assert len(after) == len(tensors)
    for (m, store, name, t, value, grad), (m2, store2, name2, t2, _, grad2) in zip(tensors, after):
        assert (m2, store2, name2) == (m, store, name)
        assert t2 is t, f"{type(m).__name__}.{name}: swapped for another tensor"
        assert t.is_inference() and grad2 == grad and torch.equal(t, value), name


def _train_args(model, name):
    cond = [[torch.zeros(1, 4, 4096), {}]]
    return dict(model=model, mode="distill_prompts", positive=cond, steps=1, batch=1, learning_rate=1e-3,
                lora_rank=4, sparse_mode="topk", sparsity=0.5, width=64, height=64, length=9,
                output_name=name, overwrite=False, seed=0)


def test_train_node_restores_model_when_setup_fails_on_patched_input(comfy_nodes, load_wan, tiny_wan_path):
    import comfy.model_management

    from salad_core.config import SaladConfig
    from salad_core.patch import apply_salad

    node = comfy_nodes.NODE_CLASS_MAPPINGS["SaladTrain"]
    with torch.inference_mode():  # as ComfyUI's executor loads and patches models
        patched = apply_salad(load_wan(tiny_wan_path), SaladConfig(backend="torch"))
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
    dm = patched.model.diffusion_model
    assert type(dm.blocks[0].self_attn).__name__ == "SaladSelfAttention"
    before = _model_state(dm)
    with torch.inference_mode(), pytest.raises(ValueError, match="already patched with SALAD"):
        node.execute(**_train_args(patched, "never_written_patched"))
    _assert_unchanged(dm, before)


def test_train_node_restores_model_when_setup_fails_midway(comfy_nodes, load_wan, tiny_wan_path, monkeypatch):
    """The worst case: the training wrapper had already replaced every block's attention."""
    node = comfy_nodes.NODE_CLASS_MAPPINGS["SaladTrain"]
    module = sys.modules[node.__module__]
    real = module.SaladTrainModel

    def half_built(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("set-up failed after patching")

    monkeypatch.setattr(module, "SaladTrainModel", half_built)
    with torch.inference_mode():
        model = load_wan(tiny_wan_path)
    dm = model.model.diffusion_model
    before = _model_state(dm)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="after patching"):
        node.execute(**_train_args(model, "never_written_midway"))
    _assert_unchanged(dm, before)
