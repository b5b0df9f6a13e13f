"""SALAD Train node through ComfyUI's executor (CPU, tiny model): distillation from prompts
writes models/salad/<name>.safetensors, and the file then works in the shipped path
(SALAD Weights Loader -> SALAD Apply -> KSampler)."""

from __future__ import annotations

from pathlib import Path

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
            "height": 64, "length": 9, "output_name": "trained_tiny", "overwrite": True, "seed": 0}},
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
    assert w.meta.trained_steps == 2 and w.meta.lora_rank == 4
    assert "loss" in str(run.ui("3"))

    run2 = runner.run(base_prompt(TINY_NAME, weights="trained_tiny.safetensors", steps=1, stats=False,
                                  sparsity=0.5))
    assert run2.success, run2.error
