"""The test harness itself: tiny random Wan checkpoints load in the real ComfyUI as Wan 2.1."""

import hashlib
from pathlib import Path

import pytest
import torch

from salad_core.tiny_wan import WanShape, wan_param_shapes, wan_state_dict, write_wan_checkpoint


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_tiny_wan_detected_as_wan21(tiny_wan_path, load_wan):
    import comfy.ldm.wan.model
    import comfy.supported_models

    patcher = load_wan(tiny_wan_path)
    cfg = patcher.model.model_config
    assert type(cfg) is comfy.supported_models.WAN21_T2V
    assert cfg.unet_config["image_model"] == "wan2.1"
    assert cfg.unet_config["model_type"] == "t2v"
    dm = patcher.model.diffusion_model
    assert type(dm) is comfy.ldm.wan.model.WanModel
    assert len(dm.blocks) == 2 and dm.num_layers == 2
    assert dm.num_heads == 2 and dm.dim == 256 and dm.dim // dm.num_heads == 128
    assert dm.ffn_dim == 512
    assert type(dm.blocks[0].self_attn) is comfy.ldm.wan.model.WanSelfAttention


def test_keys_and_shapes_match_comfy_wanmodel(comfy):
    """Every parameter of ComfyUI's WanModel is in the file with the same shape, and nothing else."""
    import comfy.ldm.wan.model
    import comfy.ops

    for shape in (WanShape.tiny(), WanShape.tiny_i2v()):
        with torch.device("meta"):
            model = comfy.ldm.wan.model.WanModel(
                model_type=shape.model_type, in_dim=shape.in_dim, dim=shape.dim, ffn_dim=shape.ffn_dim,
                freq_dim=shape.freq_dim, text_dim=shape.text_dim, out_dim=shape.out_dim,
                num_heads=shape.num_heads, num_layers=shape.num_layers, operations=comfy.ops.disable_weight_init)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert wan_param_shapes(shape) == want
        assert shape.num_params() == sum(v.numel() for v in model.state_dict().values())


def test_loaded_weights_are_the_file_weights(tiny_wan_path, load_wan):
    patcher = load_wan(tiny_wan_path)
    sd = wan_state_dict(WanShape.tiny(), seed=0)
    dm = patcher.model.diffusion_model
    got = dict(dm.named_parameters())
    for key in ("blocks.1.self_attn.q.weight", "head.modulation", "blocks.0.self_attn.norm_q.weight"):
        torch.testing.assert_close(got[key].float().cpu(), sd[key])


def test_forward_is_finite_and_shaped(tiny_wan_path, load_wan, wan_inputs, run_wan):
    patcher = load_wan(tiny_wan_path)
    inp = wan_inputs(patcher, batch=2, frames=3, height=8, width=12, seed=1)
    assert inp["x"].shape == (2, 16, 3, 8, 12)
    assert inp["sigma"].shape == (2,)
    assert inp["context"].shape == (2, 512, 4096)
    out = run_wan(patcher, inp)
    assert out.shape == inp["x"].shape
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e3
    # Deterministic: same inputs -> same output; different seed -> different output.
    torch.testing.assert_close(run_wan(patcher, wan_inputs(patcher, batch=2, seed=1)), out)
    assert not torch.allclose(run_wan(patcher, wan_inputs(patcher, batch=2, seed=2)), out)


def test_transformer_options_reach_the_model(tiny_wan_path, load_wan, wan_inputs, run_wan):
    """A DIFFUSION_MODEL wrapper on the patcher sees the options run_wan builds (as the sampler would)."""
    import comfy.patcher_extension

    patcher = load_wan(tiny_wan_path).clone()
    seen = {}

    def wrapper(executor, x, timestep, context, *args, **kwargs):
        to = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        seen.update(to)
        seen["grid"] = tuple(x.shape[2:])
        return executor(x, timestep, context, *args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "salad_test", wrapper)
    inp = wan_inputs(patcher)
    run_wan(patcher, inp, transformer_options={"salad_probe": 7})
    assert seen.get("salad_probe") == 7
    assert seen["grid"] == (3, 8, 12)
    torch.testing.assert_close(seen["sigmas"].cpu(), inp["sigma"])


def test_checkpoint_bytes_deterministic(tmp_path):
    a = write_wan_checkpoint(tmp_path / "a.safetensors", WanShape.tiny(), seed=3)
    b = write_wan_checkpoint(tmp_path / "b.safetensors", WanShape.tiny(), seed=3)
    c = write_wan_checkpoint(tmp_path / "c.safetensors", WanShape.tiny(), seed=4)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


def test_state_dict_init_ranges():
    sd = wan_state_dict(WanShape.tiny(), seed=0, std=0.02)
    assert all(v.dtype == torch.float32 for v in sd.values())
    norm = sd["blocks.0.self_attn.norm_q.weight"]
    assert (norm - 1).abs().max() < 0.2
    assert sd["blocks.0.modulation"].abs().max() < 0.2
    assert 0.015 < sd["blocks.0.ffn.0.weight"].std() < 0.025
    assert wan_state_dict(WanShape.tiny(), seed=0, dtype=torch.bfloat16)["head.head.weight"].dtype == torch.bfloat16


def test_presets():
    assert (WanShape.wan_1_3b().dim, WanShape.wan_1_3b().num_heads, WanShape.wan_1_3b().num_layers) == (1536, 12, 30)
    assert (WanShape.wan_14b().dim, WanShape.wan_14b().num_heads, WanShape.wan_14b().num_layers) == (5120, 40, 40)
    assert round(WanShape.wan_1_3b().num_params() / 1e9, 2) == 1.42
    assert round(WanShape.wan_14b().num_params() / 1e9, 1) == 14.3
    with pytest.raises(ValueError):
        WanShape(dim=200, ffn_dim=512, num_layers=2)


def test_i2v_detected(tiny_wan_i2v_path, load_wan, wan_inputs, run_wan):
    import comfy.supported_models

    patcher = load_wan(tiny_wan_i2v_path)
    cfg = patcher.model.model_config
    assert type(cfg) is comfy.supported_models.WAN21_I2V
    assert cfg.unet_config["model_type"] == "i2v"
    dm = patcher.model.diffusion_model
    assert dm.in_dim == 36 and dm.img_emb is not None
    inp = wan_inputs(patcher)
    assert inp["c_concat"].shape == (1, 20, 3, 8, 12)
    out = run_wan(patcher, inp)
    assert out.shape == inp["x"].shape and torch.isfinite(out).all()


def test_non_wan_not_detected(comfy):
    import comfy.model_detection

    sd = {
        "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "input_blocks.0.0.bias": torch.zeros(320),
        "middle_block.1.proj_in.weight": torch.zeros(1280, 1280, 1, 1),
        "out.2.weight": torch.zeros(4, 320, 3, 3),
    }
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    assert cfg is None or cfg.get("image_model") != "wan2.1"
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    assert mc is None or "wan" not in type(mc).__name__.lower()
    # And a Wan file missing its head.modulation key is no longer Wan.
    wan = wan_state_dict(WanShape.tiny())
    del wan["head.modulation"]
    cfg = comfy.model_detection.detect_unet_config(wan, "")
    assert cfg is None or cfg.get("image_model") != "wan2.1"


def test_unet_loader_lists_tiny_model(tiny_wan_path):
    import folder_paths

    assert tiny_wan_path.name in folder_paths.get_filename_list("diffusion_models")
    assert Path(folder_paths.get_full_path("diffusion_models", tiny_wan_path.name)) == tiny_wan_path
