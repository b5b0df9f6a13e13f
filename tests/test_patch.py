"""SALAD patched into a real ComfyUI (v0.3.75) Wan model loaded by ComfyUI's own loader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from salad_core import SaladConfig, fresh_salad_weights, load_salad_weights, save_salad_weights, wan_info
from salad_core.attention import SaladSelfAttention
from salad_core.patch import ROPE_KEY, apply_salad, salad_runtime, self_attn_key
from salad_core.wan import WanModelInfo
from salad_core.weights import SaladWeightsError, branch_key, lora_key

BLOCK = 16
DENSE_TOPK = SaladConfig(sparsity=0.0, block_size=BLOCK)


@pytest.fixture
def base(tiny_wan_path, load_wan):
    return load_wan(tiny_wan_path)


@pytest.fixture
def inputs(base, wan_inputs):
    return wan_inputs(base, batch=2, frames=3, height=16, width=16, seed=3)  # 192 tokens, 12 blocks


def close(a, b, tol=2e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def random_branches(weights, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    tensors = dict(weights.tensors)
    for key, value in tensors.items():
        if ".salad.proj" in key or ".salad.gate" in key:
            tensors[key] = torch.randn(value.shape, generator=g) * scale
    return type(weights)(weights.meta, tensors, weights.source)


def random_lora(info, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in range(info.num_layers):
        for target in ("q", "k", "v", "o"):
            lora[lora_key(layer, target, "A")] = torch.randn(rank, info.dim, generator=g) * 0.3
            lora[lora_key(layer, target, "B")] = torch.randn(info.dim, rank, generator=g) * 0.3
    return lora


def test_full_density_zero_projection_equals_stock(base, inputs, run_wan):
    stock = run_wan(base, inputs)
    for config in (DENSE_TOPK, SaladConfig(sparse_mode="st_swa", sparsity=0.0, block_size=BLOCK)):
        out = run_wan(apply_salad(base, config), inputs)
        assert close(out, stock), config
    # A live linear branch changes the output, and high sparsity does too: the patch is really on.
    info = wan_info(base.model.diffusion_model)
    live = apply_salad(base, DENSE_TOPK, random_branches(fresh_salad_weights(info), scale=1.0))
    assert not close(run_wan(live, inputs), stock, tol=1e-3)
    assert not close(run_wan(apply_salad(base, SaladConfig(block_size=BLOCK)), inputs), stock, tol=1e-3)


def test_patch_replaces_every_block_and_never_mutates_the_input(base, inputs, run_wan):
    before = run_wan(base, inputs)
    patched = apply_salad(base, SaladConfig(block_size=BLOCK))
    assert base.object_patches == {} and base.patches == {}
    keys = {self_attn_key(i) for i in range(len(base.model.diffusion_model.blocks))}
    assert set(patched.object_patches) == keys | {ROPE_KEY}
    assert all(isinstance(patched.object_patches[k], SaladSelfAttention) for k in keys)
    module = patched.object_patches[self_attn_key(0)]
    stock_attn = base.model.diffusion_model.blocks[0].self_attn
    assert module.q is stock_attn.q and module.norm_k is stock_attn.norm_k  # reused, not copied
    run_wan(patched, inputs)
    assert torch.equal(run_wan(base, inputs), before)
    # Loading the stock patcher again unpatched the shared model.
    assert type(base.model.diffusion_model.blocks[0].self_attn).__name__ == "WanSelfAttention"


def test_model_size_counts_salad_weights_once(base):
    """ComfyUI plans unloading and partial loads from model_size(): the SALAD clone's must be what
    ComfyUI itself measures on the patched model, also when SALAD is applied over SALAD."""
    import comfy.model_management

    stock_size = base.model_size()
    patched = apply_salad(base, SaladConfig(block_size=BLOCK))
    again = apply_salad(patched, SaladConfig(block_size=BLOCK, sparsity=0.5))
    assert base.model_size() == stock_size
    info = wan_info(base.model.diffusion_model)
    itemsize = patched.object_patches[self_attn_key(0)].salad.proj.weight.element_size()
    branch = info.num_layers * (info.dim * info.dim + 2 * info.dim + 2) * itemsize  # Proj W, b; gate w, b; scale
    assert patched.model_size() == again.model_size() == stock_size + branch
    for model in (patched, again):
        model.patch_model()
        try:
            assert comfy.model_management.module_size(model.model) == model.model_size()
        finally:
            model.unpatch_model()


def test_branches_follow_the_call_device_unless_comfyui_loaded_partially():
    """place_branches (the GPU flows are in test_comfy_gpu_loading.py): in a full load every
    branch weight moves to the call's device once; in a partial (lowvram) load Proj and the gate
    stay where ComfyUI put them and only the scale moves. The meta device stands in for a GPU."""
    from types import SimpleNamespace

    from salad_core.attention import SaladBranch
    from salad_core.patch import place_branches

    def devices(branches, part):
        return {p.device.type for b in branches for p in getattr(b, part).parameters()}

    meta = torch.device("meta")
    branches = [SaladBranch(32), SaladBranch(32)]
    place_branches(branches, SimpleNamespace(model_lowvram=True), meta)
    assert devices(branches, "proj") == devices(branches, "gate") == {"cpu"}
    assert {b.scale.device.type for b in branches} == {"meta"}
    place_branches(branches, SimpleNamespace(model_lowvram=False), meta)  # Proj on the CPU, scale already there
    assert devices(branches, "proj") == devices(branches, "gate") == {"meta"}


def test_salad_over_salad_keeps_one_set_of_wrappers_and_callbacks(base):
    import comfy.patcher_extension as ext

    again = apply_salad(apply_salad(base, SaladConfig(block_size=BLOCK)), SaladConfig(block_size=BLOCK, sparsity=0.5))
    for kind in (ext.WrappersMP.DIFFUSION_MODEL, ext.WrappersMP.OUTER_SAMPLE):
        assert len(again.get_wrappers(kind, "salad")) == 1, kind
    assert len(again.get_callbacks(ext.CallbacksMP.ON_DETACH, "salad")) == 1


def test_salad_weights_never_stay_pinned(base, monkeypatch):
    """A lowvram load pins offloaded weights by key path, in a set every patcher of the model
    shares; SALAD's are unpinned after each load and at detach, while its modules are attached,
    or a dense load of the same model strands keys that no longer resolve (ComfyUI's next
    unpin_all_weights raised AttributeError on an H100)."""
    import comfy.model_management
    import comfy.patcher_extension as ext

    unpinned = []
    monkeypatch.setattr(comfy.model_management, "unpin_memory", lambda t: unpinned.append(t) or True)
    salad_key, stock_key = "diffusion_model.blocks.0.self_attn.salad.proj.weight", "diffusion_model.blocks.0.self_attn.q.weight"
    patched = apply_salad(base, SaladConfig(block_size=BLOCK))
    proj = patched.object_patches[self_attn_key(0)].salad.proj.weight
    patched.patch_model()
    try:
        for kind in (ext.CallbacksMP.ON_LOAD, ext.CallbacksMP.ON_DETACH):
            patched.pinned.update({salad_key, stock_key})
            for callback in patched.get_callbacks(kind, "salad"):
                callback(patched, None, None, None, None)
            assert patched.pinned == {stock_key}, kind
        assert unpinned == [proj] * 2
    finally:
        patched.pinned.clear()
        patched.unpatch_model()


def test_removing_the_patch_from_the_clone_is_bit_identical(base, inputs, run_wan):
    import comfy.patcher_extension

    stock = run_wan(base, inputs)
    patched = apply_salad(base, SaladConfig(block_size=BLOCK))
    run_wan(patched, inputs)
    patched.object_patches.clear()
    for kind in (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE):
        patched.remove_wrappers_with_key(kind, "salad")
    assert torch.equal(run_wan(patched, inputs), stock)


def test_stock_lora_behaves_the_same_with_salad(base, inputs, run_wan, tmp_path):
    import comfy.sd

    info = wan_info(base.model.diffusion_model)
    lora = random_lora(info)
    stock = run_wan(base, inputs)
    stock_lora = run_wan(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0], inputs)
    assert not close(stock_lora, stock, tol=1e-3)  # the LoRA matters

    fresh = fresh_salad_weights(info)
    weights = fresh.with_meta(lora_rank=4)
    weights = type(weights)(weights.meta, {**weights.tensors, **lora})
    path = tmp_path / "with_lora.safetensors"
    save_salad_weights(weights, str(path))
    salad_lora = run_wan(apply_salad(base, DENSE_TOPK, load_salad_weights(str(path))), inputs)
    assert close(salad_lora, stock_lora)
    # And a stock LoRA loader node placed before SALAD Apply gives the same result.
    chained = apply_salad(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0], DENSE_TOPK)
    assert close(run_wan(chained, inputs), stock_lora)


def test_weights_roundtrip_and_runtime_attachment(base, tmp_path):
    info = wan_info(base.model.diffusion_model)
    weights = random_branches(fresh_salad_weights(info)).with_meta(gate_means=(0.2, 0.4), trained_steps=7)
    path = str(tmp_path / "w.safetensors")
    save_salad_weights(weights, path)
    with pytest.raises(FileExistsError, match="Expected a new file name"):
        save_salad_weights(weights, path)
    loaded = load_salad_weights(path)
    assert loaded.meta == weights.meta
    assert all(torch.equal(loaded.tensors[k], v) for k, v in weights.tensors.items())
    patched = apply_salad(base, SaladConfig(gate_drop_percentile=50), loaded)
    runtime = salad_runtime(patched)
    assert runtime.linear_layers == frozenset({0})  # the larger-gate layer 1 is dropped


def write_weights(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return str(path)


def bad_files(base, tmp_path):
    info = wan_info(base.model.diffusion_model)
    good = fresh_salad_weights(info)
    meta = good.meta.to_metadata()
    cases = {}

    path = tmp_path / "truncated.safetensors"
    save_salad_weights(good, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    cases["truncated"] = (str(path), "readable safetensors")

    wide = fresh_salad_weights(WanModelInfo(512, 4, info.num_layers, "t2v"))
    cases["width"] = (save_salad_weights(wide, str(tmp_path / "wide.safetensors")), "dim 256")

    deep = fresh_salad_weights(WanModelInfo(info.dim, info.num_heads, 5, "t2v"))
    cases["layers"] = (save_salad_weights(deep, str(tmp_path / "deep.safetensors")), "2 layers")

    tensors = dict(good.tensors)
    del tensors[branch_key(1, "gate.bias")]
    cases["missing"] = (write_weights(tmp_path / "missing.safetensors", tensors, meta), "blocks.1.salad.gate.bias")

    cases["version"] = (
        write_weights(tmp_path / "future.safetensors", good.tensors, {**meta, "salad.format_version": "9"}),
        "format_version",
    )
    cases["not salad"] = (write_weights(tmp_path / "plain.safetensors", good.tensors, {}), "SALAD weights metadata")
    cases["bad windows"] = (
        write_weights(tmp_path / "windows.safetensors", good.tensors, {**meta, "salad.windows": json.dumps([[{"kind": "x"}]])}),
        "salad.windows",
    )
    cases["gate means"] = (
        write_weights(tmp_path / "means.safetensors", good.tensors, {**meta, "salad.gate_means": json.dumps([0.5])}),
        "salad.gate_means with one value per layer",
    )
    return cases


def test_bad_weight_files_name_file_mismatch_and_fix_and_leave_model_unpatched(base, inputs, run_wan, tmp_path):
    stock = run_wan(base, inputs)
    for name, (path, mismatch) in bad_files(base, tmp_path).items():
        with pytest.raises(SaladWeightsError) as err:
            apply_salad(base, SaladConfig(), load_salad_weights(path))
        message = str(err.value)
        assert path in message and mismatch in message and "Try " in message, (name, message)
        assert base.object_patches == {} and base.patches == {}
    assert torch.equal(run_wan(base, inputs), stock)


def test_gate_drop_without_calibration_is_a_clear_error(base):
    weights = random_branches(fresh_salad_weights(wan_info(base.model.diffusion_model)))
    with pytest.raises(SaladWeightsError, match="salad.gate_means.*Try"):
        apply_salad(base, SaladConfig(gate_drop_percentile=50), weights)


def test_random_drop_plan_needs_no_calibration(base):
    weights = random_branches(fresh_salad_weights(wan_info(base.model.diffusion_model)))
    patched = apply_salad(base, SaladConfig(gate_drop_percentile=50, gate_drop_plan="random", block_size=BLOCK), weights)
    assert len(salad_runtime(patched).linear_layers) == 1


def test_fp8_model_keeps_salad_branch_in_compute_precision(tiny_wan_path, load_wan):
    """An fp8-stored model (UNETLoader weight_dtype fp8_e4m3fn, common for 14B): SALAD's small
    trained weights must not be rounded to fp8 (about 14% error at |w| ~ 0.004)."""
    fp8 = load_wan(tiny_wan_path, model_options={"dtype": torch.float8_e4m3fn})
    assert fp8.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    weights = random_branches(fresh_salad_weights(wan_info(fp8.model.diffusion_model)), scale=0.004)
    patched = apply_salad(fp8, SaladConfig(block_size=BLOCK), weights)
    proj = patched.object_patches[self_attn_key(0)].salad.proj.weight
    want = fp8.model.manual_cast_dtype
    assert want in (torch.float32, torch.float16, torch.bfloat16) and proj.dtype == want
    assert torch.equal(proj, weights.branch_state(0)["proj.weight"].to(want))


def test_file_windows_and_block_size_decide_st_swa_and_are_reported(base, caplog):
    from salad_core.config import HeadWindow

    info = wan_info(base.model.diffusion_model)
    windows = tuple(tuple(HeadWindow("spatial", 32) for _ in range(info.num_heads)) for _ in range(info.num_layers))
    weights = fresh_salad_weights(info).with_meta(windows=windows, block_size=32)
    with caplog.at_level("INFO", logger="salad"):
        swa = apply_salad(base, SaladConfig(sparse_mode="st_swa", sparsity=0.5, block_size=BLOCK), weights)
    cfg = salad_runtime(swa).config
    assert cfg.windows == windows and cfg.block_size == 32
    assert any("sparsity setting is not used" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="salad"):
        topk = apply_salad(base, SaladConfig(sparse_mode="topk", block_size=BLOCK), weights)
    assert salad_runtime(topk).config.windows is None
    assert any("does not use" in r.message and "st_swa" in r.message for r in caplog.records)


def test_topk_keeping_every_block_warns_once(base, inputs, run_wan, caplog):
    patched = apply_salad(base, SaladConfig(topk=4096, block_size=BLOCK))
    with caplog.at_level("WARNING", logger="salad"):
        run_wan(patched, inputs)
        run_wan(patched, inputs)
    hits = [r.message for r in caplog.records if "keeps all" in r.message]
    assert len(hits) == 1 and "12 key blocks" in hits[0] and "Try topk 0" in hits[0], hits


def test_non_wan_model_is_refused(comfy):
    import comfy.model_patcher
    import comfy.supported_models

    from salad_core import NotWanModelError

    flux_shape = dict(
        image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=768,
        context_in_dim=4096, hidden_size=256, mlp_ratio=2.0, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
    )
    model = comfy.supported_models.Flux(flux_shape).get_model({})
    cpu = torch.device("cpu")
    flux = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    with pytest.raises(NotWanModelError, match=r"Expected a Wan2.1 diffusion model .*got Flux\. Try .*UNETLoader"):
        apply_salad(flux, SaladConfig())
    assert flux.object_patches == {}


def test_st_swa_needs_the_video_grid(base, wan_inputs, run_wan):
    """Reference latents add tokens outside the grid: ST-SWA must refuse, not guess."""
    from salad_core.runtime import CALL_KEY, CallInfo

    patched = apply_salad(base, SaladConfig(sparse_mode="st_swa", block_size=BLOCK))
    inputs = wan_inputs(base, frames=3, height=16, width=16)
    module = patched.object_patches[self_attn_key(0)]
    x = torch.randn(1, 10, 256)
    freqs = torch.zeros(1, 10, 1, 64, 2, 2)
    with pytest.raises(ValueError, match="Expected the latent grid .* Try sparse_mode 'topk'"):
        module(x, freqs, {CALL_KEY: CallInfo(grid=(3, 8, 8))})
    assert run_wan(patched, inputs).isfinite().all()


def test_file_metadata_is_strings_and_loadable_by_safetensors(base, tmp_path):
    path = save_salad_weights(fresh_salad_weights(wan_info(base.model.diffusion_model)), str(tmp_path / "f.safetensors"))
    tensors = load_file(path)
    assert set(tensors) == {branch_key(i, p) for i in range(2) for p in ("proj.weight", "proj.bias", "gate.weight", "gate.bias", "scale")}
    assert float(tensors[branch_key(0, "scale")]) == 1.0 and not tensors[branch_key(0, "proj.weight")].any()


def test_query_block_is_recorded_and_a_mismatch_warns(base, tmp_path, caplog):
    info = wan_info(base.model.diffusion_model)
    weights = fresh_salad_weights(info).with_meta(query_block=64, trained_steps=5)
    path = save_salad_weights(weights, str(tmp_path / "q64.safetensors"))
    assert load_salad_weights(path).meta.query_block == 64
    meta = weights.meta.to_metadata()
    older = {k: v for k, v in meta.items() if k != "salad.query_block"}  # written before the field existed
    assert load_salad_weights(write_weights(tmp_path / "old.safetensors", weights.tensors, older)).meta.query_block is None
    for bad_value in ("0", "true", "128.0", '"128"'):
        bad = write_weights(tmp_path / "bad.safetensors", weights.tensors, {**meta, "salad.query_block": bad_value})
        with pytest.raises(SaladWeightsError, match="salad.query_block.*Try"):
            load_salad_weights(bad)

    def warnings(config, w):
        caplog.clear()
        with caplog.at_level("WARNING", logger="salad"):
            patched = apply_salad(base, config, w)
        return salad_runtime(patched).config, [r.message for r in caplog.records if "query block" in r.message]

    config, said = warnings(SaladConfig(query_group=2), load_salad_weights(path))
    assert config.query_group == 2  # the setting wins, with a warning that names the widget value
    assert len(said) == 1 and "trained with 64-token Top-K query blocks; running with 128" in said[0]
    assert "set topk_query_block to 64" in said[0]
    # Compared in tokens: 32-token blocks in pairs are 64-token query blocks, as the file's.
    assert warnings(SaladConfig(query_group=2, block_size=32), load_salad_weights(path))[1] == []
    assert warnings(SaladConfig(query_group=1), load_salad_weights(path))[1] == []
    assert warnings(SaladConfig(sparse_mode="st_swa", block_size=BLOCK), load_salad_weights(path))[1] == []
    odd = weights.with_meta(query_block=32)  # no widget value matches: the Python fix is named
    assert "block_size * query_group = 32" in warnings(SaladConfig(), odd)[1][0]
    # A trained file that does not say: warned (files before the field were mostly 64); an untrained one is not.
    unknown = weights.with_meta(query_block=None)
    assert "does not record the Top-K query block" in warnings(SaladConfig(), unknown)[1][0]
    assert warnings(SaladConfig(), unknown.with_meta(trained_steps=0))[1] == []
