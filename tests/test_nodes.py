"""SALAD nodes in the real ComfyUI: registration, whole prompts through ComfyUI's own executor,
interactive re-queueing, parity with stock sampling, and errors surfacing at SALAD Apply.

How the pack is loaded and prompts are run (reusable by other tests):
  * ``graph_nodes`` loads this repo with ``nodes.load_custom_node(<repo>)`` exactly as ComfyUI
    loads ``custom_nodes/<pack>/`` (V3 ``comfy_entrypoint``), plus the two comfy_extras files the
    graphs need and the test-only pack ``tests/comfy_test_nodes`` (SaladTestConditioning).
  * ``Runner`` wraps ``execution.PromptExecutor`` with a server stub that records every message;
    ``runner.run(prompt)`` validates the API-format prompt with ``execution.validate_prompt`` (as
    the server does on /prompt) and executes it; it returns a ``Run`` with the node ids that
    executed (not cached), the error message if any, and ``run.output(node_id)``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = REPO_ROOT / "tests" / "comfy_test_nodes"
NODE_IDS = ("SaladApply", "SaladWeightsLoader", "SaladStats")
TRAINING_FREE = "none (training-free)"

# API-format node ids of the base graph.
UNET, MS, APPLY, POS, NEG, LATENT, KSAMPLER, STATS, LOADER, SINK = "1", "2", "3", "4", "5", "6", "7", "8", "9", "11"


# --------------------------------------------------------------------------------------------
# Loading the pack and running prompts
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def graph_nodes(comfy, tiny_wan_path):
    import nodes

    extras = Path(comfy) / "comfy_extras"
    for path, parent in ((extras / "nodes_model_advanced.py", "comfy_extras"),
                         (extras / "nodes_hunyuan.py", "comfy_extras"),
                         (REPO_ROOT, "custom_nodes"), (TEST_NODES, "custom_nodes")):
        ok = asyncio.run(nodes.load_custom_node(str(path), module_parent=parent))
        assert ok, f"ComfyUI could not load {path} (see the log above)"
    return nodes


class ServerStub:
    """The part of server.PromptServer the executor uses; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class Run:
    def __init__(self, executor, server: ServerStub, start: int):
        self.executor = executor
        msgs = server.messages[start:]
        self.executed = [d["node"] for e, d in msgs if e == "executing" and d.get("node") is not None]
        errors = [d for e, d in msgs if e == "execution_error"]
        self.error = errors[0] if errors else None
        self.success = any(e == "execution_success" for e, _ in msgs)

    def output(self, node_id, index=0):
        entry = self.executor.caches.outputs.get(node_id)
        assert entry is not None, f"node {node_id} has no cached output"
        return entry.outputs[index][0]

    def ui(self, node_id):
        return self.executor.history_result["outputs"].get(node_id)


class Runner:
    def __init__(self):
        import execution

        self.server = ServerStub()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 16.0})

    def run(self, prompt: dict, expect_valid: bool = True) -> Run:
        import execution

        prompt_id = str(uuid.uuid4())
        valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not expect_valid:
            assert not valid
            return node_errors
        assert valid, f"prompt invalid: {err} {node_errors}"
        start = len(self.server.messages)
        self.executor.execute(prompt, prompt_id, {"client_id": "salad-test"}, outputs)
        return Run(self.executor, self.server, start)


@pytest.fixture
def runner(graph_nodes):
    return Runner()


def base_prompt(tiny_name, *, salad=True, weights=None, stats=True, steps=2, cfg=1.5, **apply_widgets):
    """UNETLoader(tiny) -> ModelSamplingSD3 -> SaladApply -> KSampler -> SaladStats."""
    # 64-token query blocks: the tiny latent has 3 blocks, where 128-token ones (the default) keep
    # both diagonal blocks of a pair, 2 of 3 (test_query_block_widget_reaches_the_selection).
    widgets = {"sparse_mode": "topk", "sparsity": 0.9, "topk": 0, "gate_drop_percentile": 0.0,
               "linear_scale": 1.0, "dense_steps": 0, "backend": "torch", "topk_query_block": "64"}
    widgets.update(apply_widgets)
    p = {
        UNET: {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_name, "weight_dtype": "default"}},
        MS: {"class_type": "ModelSamplingSD3", "inputs": {"model": [UNET, 0], "shift": 8.0}},
        POS: {"class_type": "SaladTestConditioning", "inputs": {"batch": 1, "seed": 1, "mode": "random"}},
        NEG: {"class_type": "SaladTestConditioning", "inputs": {"batch": 1, "seed": 0, "mode": "zeros"}},
        # 128x128x9 -> latent [1, 16, 3, 16, 16] -> 3 x 8 x 8 = 192 tokens = 3 blocks of 64.
        LATENT: {"class_type": "EmptyHunyuanLatentVideo",
                 "inputs": {"width": 128, "height": 128, "length": 9, "batch_size": 1}},
        KSAMPLER: {"class_type": "KSampler", "inputs": {
            "model": [APPLY, 0] if salad else [MS, 0], "seed": 7, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "simple", "positive": [POS, 0], "negative": [NEG, 0],
            "latent_image": [LATENT, 0], "denoise": 1.0}},
    }
    if salad:
        p[APPLY] = {"class_type": "SaladApply", "inputs": {"model": [MS, 0], **widgets}}
        if weights is not None:
            p[LOADER] = {"class_type": "SaladWeightsLoader", "inputs": {"weights_name": weights}}
            p[APPLY]["inputs"]["salad_weights"] = [LOADER, 0]
        if stats:
            p[STATS] = {"class_type": "SaladStats", "inputs": {"model": [APPLY, 0], "latent": [KSAMPLER, 0]}}
    if STATS not in p:  # the stock output node, so the prompt has an output
        p[SINK] = {"class_type": "SaveLatent", "inputs": {"samples": [KSAMPLER, 0], "filename_prefix": "salad_test"}}
    return p


@pytest.fixture(scope="session")
def tiny_name(tiny_wan_path):
    return tiny_wan_path.name


def salad_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("salad")[0])


def write_weights(name, info, *, gate_means=None, seed=0, scale=0.05):
    """A SALAD weights file in models/salad with a non-zero projection (so the branch matters)."""
    import folder_paths

    from salad_core.weights import SaladWeights, fresh_salad_weights, save_salad_weights

    w = fresh_salad_weights(info)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(v.shape, generator=g) * scale if k.endswith("proj.weight") else v)
               for k, v in w.tensors.items()}
    w = SaladWeights(w.meta, tensors)
    if gate_means is not None:
        w = w.with_meta(gate_means=tuple(gate_means), gate_thresholds={"50": sorted(gate_means)[len(gate_means) // 2]})
    path = salad_dir() / name
    save_salad_weights(w, str(path), overwrite=True)
    folder_paths.filename_list_cache.pop("salad", None)
    return path


def tiny_info():
    from salad_core.tiny_wan import WanShape
    from salad_core.wan import WanModelInfo

    s = WanShape.tiny()
    return WanModelInfo(s.dim, s.num_heads, s.num_layers, "t2v")


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def test_pack_registers_through_comfyui(graph_nodes):
    import folder_paths

    nodes = graph_nodes
    for node_id in NODE_IDS + ("SaladTestConditioning",):
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SaladApply"] == "SALAD Apply"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SaladWeightsLoader"] == "SALAD Weights Loader"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SaladStats"] == "SALAD Stats"
    paths, exts = folder_paths.folder_names_and_paths["salad"]
    assert ".safetensors" in exts and paths

    # What /object_info serves to the frontend.
    info = nodes.NODE_CLASS_MAPPINGS["SaladApply"].GET_NODE_INFO_V1()
    assert info["category"] == "SALAD" and info["output"] == ["MODEL"]
    req, opt = info["input"]["required"], info["input"].get("optional", {})
    assert req["model"][0] == "MODEL" and opt["salad_weights"][0] == "SALAD_WEIGHTS"
    assert req["sparse_mode"][1]["options"] == ["topk", "st_swa"] and req["sparse_mode"][1]["default"] == "topk"
    assert req["backend"][1]["options"] == ["auto", "triton", "flex", "torch"]
    spec = {"sparsity": (0.9, 0.0, 0.99, 0.01), "topk": (0, 0, 4096, None),
            "gate_drop_percentile": (0.0, 0.0, 100.0, 1.0), "linear_scale": (1.0, 0.0, 4.0, 0.05),
            "dense_steps": (0, 0, 1000, None)}
    for name, (default, lo, hi, step) in spec.items():
        opts = req[name][1]
        assert (opts["default"], opts["min"], opts["max"]) == (default, lo, hi), name
        if step is not None:
            assert opts["step"] == step, name
    for name, (_, opts) in {**req, **opt}.items():
        assert opts.get("tooltip"), f"SaladApply.{name} has no tooltip"

    loader = nodes.NODE_CLASS_MAPPINGS["SaladWeightsLoader"].GET_NODE_INFO_V1()
    assert loader["output"] == ["SALAD_WEIGHTS", "STRING"]
    assert loader["input"]["required"]["weights_name"][1]["options"][0] == TRAINING_FREE
    stats = nodes.NODE_CLASS_MAPPINGS["SaladStats"].GET_NODE_INFO_V1()
    assert stats["output"] == ["IMAGE", "STRING"] and stats["output_node"] is True
    assert list(stats["input"]["required"]) == ["model", "latent"]


def test_loader_lists_files_in_models_salad(graph_nodes):
    path = write_weights("listed_check.safetensors", tiny_info())
    try:
        info = graph_nodes.NODE_CLASS_MAPPINGS["SaladWeightsLoader"].GET_NODE_INFO_V1()
        assert path.name in info["input"]["required"]["weights_name"][1]["options"]
    finally:
        path.unlink()


def test_import_clash_raises_named_importerror(graph_nodes, monkeypatch):
    """A foreign top-level ``kernels`` (e.g. a pip package) must give a clear ImportError."""
    fake = types.ModuleType("kernels")
    fake.__file__ = "/elsewhere/site-packages/kernels/__init__.py"
    monkeypatch.setitem(sys.modules, "kernels", fake)
    spec = importlib.util.spec_from_file_location(
        "salad_clash_probe", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing the pack is side-effect free; the entry point checks
    with pytest.raises(ImportError, match=r"'kernels'.*/elsewhere/site-packages/kernels.*pip uninstall kernels"):
        asyncio.run(module.comfy_entrypoint())


# --------------------------------------------------------------------------------------------
# Whole prompts
# --------------------------------------------------------------------------------------------

def test_graph_runs_end_to_end(runner, tiny_name):
    run = runner.run(base_prompt(tiny_name, backend="auto", steps=3))
    assert run.error is None and run.success, run.error
    assert {UNET, MS, APPLY, KSAMPLER, STATS} <= set(run.executed)
    latent = run.output(KSAMPLER)["samples"]
    assert latent.shape == (1, 16, 3, 16, 16) and torch.isfinite(latent).all()

    plot, summary = run.output(STATS, 0), run.output(STATS, 1)
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0 and float(plot.std()) > 0
    assert "measured sparsity: 0.6" in summary  # 3 blocks, topk 1 (+ diagonal) -> 2/3 skipped
    assert "steps: 3 SALAD + 0 dense" in summary
    assert "inactive (zero projection, training-free/untrained): 0, 1" in summary
    ui = run.ui(STATS)
    assert ui["images"] and ui["text"][0] == summary

    # SALAD Apply cloned: the MODEL it was given carries no SALAD patch.
    from salad_core.patch import ROPE_KEY, salad_runtime

    upstream, patched = run.output(MS), run.output(APPLY)
    assert patched is not upstream and salad_runtime(upstream) is None and salad_runtime(patched) is not None
    assert not any("self_attn" in k for k in upstream.object_patches) and ROPE_KEY not in upstream.object_patches


def test_query_block_widget_values_map_to_query_groups(graph_nodes):
    apply_mod = sys.modules[graph_nodes.NODE_CLASS_MAPPINGS["SaladApply"].__module__]
    assert apply_mod.build_config(topk_query_block="128").query_group == 2
    assert apply_mod.build_config(topk_query_block="64").query_group == 1
    with pytest.raises(ValueError, match=r"Expected topk_query_block in \('128', '64'\).*got '96'.*Try '128'"):
        apply_mod.build_config(topk_query_block="96")


def test_query_block_widget_reaches_the_selection(runner, tiny_name):
    # A run's outputs are read from ComfyUI's cache, so each is read before the next run.
    fine = runner.run(base_prompt(tiny_name, topk_query_block="64"))
    assert fine.error is None
    fine_summary, fine_latent = fine.output(STATS, 1), fine.output(KSAMPLER)["samples"].clone()
    coarse = runner.run(base_prompt(tiny_name, topk_query_block="128"))
    assert coarse.error is None
    assert "64-token query blocks; measured sparsity: 0.667" in fine_summary  # 1 key block of 3 per query block
    # Blocks 0 and 1 share one list holding both diagonals; block 2's list has its own + the best other.
    assert "128-token query blocks; measured sparsity: 0.333" in coarse.output(STATS, 1)
    assert rel_err(coarse.output(KSAMPLER)["samples"], fine_latent) > 1e-4
    bad = copy.deepcopy(base_prompt(tiny_name))
    bad[APPLY]["inputs"]["topk_query_block"] = "96"
    assert APPLY in runner.run(bad, expect_valid=False)


def test_interactive_requeue_does_not_reload_model(runner, tiny_name):
    first = runner.run(base_prompt(tiny_name, sparsity=0.9))
    assert first.error is None and UNET in first.executed
    lat_90 = first.output(KSAMPLER)["samples"].clone()

    second = runner.run(base_prompt(tiny_name, sparsity=0.5))
    assert second.error is None
    assert UNET not in second.executed and MS not in second.executed
    assert {APPLY, KSAMPLER, STATS} <= set(second.executed)
    lat_50 = second.output(KSAMPLER)["samples"]
    assert rel_err(lat_50, lat_90) > 1e-4
    assert "target sparsity 0.50" in second.output(STATS, 1)

    third = runner.run(base_prompt(tiny_name, sparsity=0.5, topk=3))  # 3 of 3 blocks: dense
    assert third.error is None and UNET not in third.executed and KSAMPLER in third.executed
    assert rel_err(third.output(KSAMPLER)["samples"], lat_50) > 1e-4
    assert "measured sparsity: 0.000" in third.output(STATS, 1)

    # Unchanged prompt: everything cached, nothing re-runs.
    fourth = runner.run(base_prompt(tiny_name, sparsity=0.5, topk=3))
    assert fourth.error is None and fourth.executed == []


def test_gate_drop_requeue_with_calibrated_weights(runner, tiny_name):
    path = write_weights("calibrated_tiny.safetensors", tiny_info(), gate_means=(0.3, 0.7))
    try:
        first = runner.run(base_prompt(tiny_name, weights=path.name, gate_drop_percentile=0.0))
        assert first.error is None, first.error
        lat_keep = first.output(KSAMPLER)["samples"].clone()
        assert "linear branch active in 2/2 layers" in first.output(STATS, 1)
        meta = first.output(LOADER, 1)
        for part in ("base model: wan2.1-t2v-d256-l2", "sparse mode: topk", "lora rank: none",
                     "trained steps: 0", "calibrated windows: no", "gate thresholds: yes"):
            assert part in meta, part

        second = runner.run(base_prompt(tiny_name, weights=path.name, gate_drop_percentile=50.0))
        assert second.error is None, second.error
        assert UNET not in second.executed and LOADER not in second.executed
        assert {APPLY, KSAMPLER, STATS} <= set(second.executed)
        assert rel_err(second.output(KSAMPLER)["samples"], lat_keep) > 1e-5
        summary = second.output(STATS, 1)
        assert "dropped by gate_drop_percentile 50: 1 (calibrated gate >= 0.7000)" in summary
        assert "linear branch active in 1/2 layers: 0" in summary
    finally:
        path.unlink()


def test_sparsity_zero_matches_stock_sampler(runner, tiny_name):
    stock = runner.run(base_prompt(tiny_name, salad=False, steps=3))
    assert stock.error is None
    ref = stock.output(KSAMPLER)["samples"].clone()
    salad = runner.run(base_prompt(tiny_name, steps=3, sparsity=0.0, topk=0, weights=TRAINING_FREE))
    assert salad.error is None and UNET not in salad.executed
    assert salad.output(LOADER, 0) is None and "training-free" in salad.output(LOADER, 1)
    out = salad.output(KSAMPLER)["samples"]
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    assert "measured sparsity: 0.000" in salad.output(STATS, 1)


def test_stats_plot_and_summary_for_a_full_size_run(graph_nodes):
    """The plot/summary code on a 1.3B-shaped run (30 layers, 25 steps, 6 dropped), no sampling."""
    from salad_core.config import SaladConfig
    from salad_core.stats import RunSummary
    from salad_core.wan import WanModelInfo

    stats_mod = sys.modules[graph_nodes.NODE_CLASS_MAPPINGS["SaladStats"].__module__]
    apply_mod = sys.modules[graph_nodes.NODE_CLASS_MAPPINGS["SaladApply"].__module__]
    layers, steps = 30, 25
    g = torch.Generator().manual_seed(0)
    means = (torch.rand(layers, generator=g) * 0.6 + 0.2).tolist()
    drop = sorted(sorted(range(layers), key=lambda i: means[i])[-6:])
    gates = [[None if i in drop else means[i] + 0.01 * j for i in range(layers)] for j in range(steps)]
    summary = RunSummary(gates, list(range(2, 2 + steps)), 0.9, [12.0] * steps, 2)
    runtime = types.SimpleNamespace(
        config=SaladConfig(gate_drop_percentile=20, dense_steps=2), info=WanModelInfo(1536, 12, layers, "t2v"),
        linear_layers=frozenset(set(range(layers)) - set(drop)), source="/models/salad/wan13b.safetensors")
    info = apply_mod.SaladNodeInfo("wan13b", layers, tuple(drop), (), tuple(means),
                                   min(means[i] for i in drop), 20.0)
    img = stats_mod.image_tensor(stats_mod.draw_plot(runtime, info, summary))
    assert img.shape == (1, stats_mod.HEIGHT, stats_mod.WIDTH, 3)
    # the dashed threshold line is drawn in red
    red = torch.tensor(stats_mod.RED, dtype=torch.float32) / 255
    assert ((img[0] - red).abs().sum(-1) < 1e-3).sum() > 50
    text = stats_mod.summarize(runtime, info, summary)
    assert "wan13b.safetensors; wan2.1-t2v-1.3b" in text and "measured sparsity: 0.900" in text
    assert f"dropped by gate_drop_percentile 20: {', '.join(map(str, drop))}" in text
    assert "steps: 25 SALAD + 2 dense" in text and "12.00 ms/step" in text and ", ..." in text


# --------------------------------------------------------------------------------------------
# Errors surface at the node, before sampling
# --------------------------------------------------------------------------------------------

NON_WAN_NODE = "SaladTestNonWanModel"


@pytest.fixture
def non_wan_node(graph_nodes):
    """A MODEL (real comfy ModelPatcher) around a non-Wan diffusion model, as a registered node."""
    import comfy.model_patcher
    from comfy_api.latest import io

    class NotWan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))

    class SaladTestNonWanModel(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=NON_WAN_NODE, category="SALAD/testing", outputs=[io.Model.Output()])

        @classmethod
        def execute(cls):
            cpu = torch.device("cpu")
            return io.NodeOutput(comfy.model_patcher.ModelPatcher(NotWan(), load_device=cpu, offload_device=cpu))

    graph_nodes.NODE_CLASS_MAPPINGS[NON_WAN_NODE] = SaladTestNonWanModel
    yield NON_WAN_NODE
    graph_nodes.NODE_CLASS_MAPPINGS.pop(NON_WAN_NODE, None)


def assert_error_at_apply(run, *fragments):
    assert run.error is not None and not run.success
    assert run.error["node_id"] == APPLY and run.error["node_type"] == "SaladApply"
    assert run.error["exception_type"] == "ValueError"
    for frag in fragments:
        assert frag in run.error["exception_message"], (frag, run.error["exception_message"])
    assert KSAMPLER not in run.executed and STATS not in run.executed


def test_non_wan_model_errors_at_apply(runner, tiny_name, non_wan_node):
    prompt = base_prompt(tiny_name)
    prompt[APPLY]["inputs"]["model"] = ["10", 0]
    prompt["10"] = {"class_type": non_wan_node, "inputs": {}}
    del prompt[UNET], prompt[MS]
    run = runner.run(prompt)
    assert_error_at_apply(run, "Expected a Wan2.1 diffusion model", "Sequential", "UNETLoader")


def test_mismatched_weights_error_at_apply(runner, tiny_name):
    from salad_core.wan import WanModelInfo

    path = write_weights("wider_model.safetensors", WanModelInfo(384, 3, 2, "t2v"))
    try:
        run = runner.run(base_prompt(tiny_name, weights=path.name))
        assert_error_at_apply(run, str(path), "dim 256", "dim 384", "Try SALAD weights made for wan2.1-t2v-d256-l2")
    finally:
        path.unlink()


def test_gate_drop_without_calibration_errors_at_apply(runner, tiny_name):
    path = write_weights("uncalibrated.safetensors", tiny_info())
    try:
        run = runner.run(base_prompt(tiny_name, weights=path.name, gate_drop_percentile=50.0))
        assert_error_at_apply(run, path.name, "salad.gate_means", "SALAD Calibrate")
    finally:
        path.unlink()


def test_unreadable_weights_error_at_loader(runner, tiny_name):
    import folder_paths

    path = salad_dir() / "truncated.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00not a safetensors header")
    folder_paths.filename_list_cache.pop("salad", None)
    try:
        run = runner.run(base_prompt(tiny_name, weights=path.name))
        assert run.error is not None and run.error["node_id"] == LOADER
        msg = run.error["exception_message"]
        assert "truncated.safetensors" in msg and "Try" in msg
        assert APPLY not in run.executed and KSAMPLER not in run.executed
    finally:
        path.unlink()


def test_stats_on_unpatched_model_errors(runner, tiny_name):
    prompt = base_prompt(tiny_name, salad=False, steps=1)
    prompt[STATS] = {"class_type": "SaladStats", "inputs": {"model": [MS, 0], "latent": [KSAMPLER, 0]}}
    del prompt[SINK]
    run = runner.run(prompt)
    assert run.error is not None and run.error["node_id"] == STATS
    assert "Expected a MODEL from SALAD Apply" in run.error["exception_message"]


def test_widget_validation_rejects_out_of_range(runner, tiny_name):
    prompt = copy.deepcopy(base_prompt(tiny_name))
    prompt[APPLY]["inputs"]["sparsity"] = 1.5
    errors = runner.run(prompt, expect_valid=False)
    assert APPLY in errors
