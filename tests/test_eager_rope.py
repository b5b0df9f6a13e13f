"""SALAD's patch runs Wan's RoPE embedder eagerly (salad_core.eager_rope): outside
torch.compile, wrapping the stock module, and no reference cycle keeping a freed model alive."""

import gc
import weakref

import torch

from salad_core import SaladConfig
from salad_core.patch import ROPE_KEY, apply_salad

CONFIG = SaladConfig(block_size=16, sparsity=0.5, backend="torch")


def sample(model, steps=3):
    import comfy.sample

    latent = torch.zeros(1, 16, 3, 8, 8)
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(0)), {}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 1.0, "euler", "simple", cond, cond,
                               latent, disable_pbar=True)


def test_compiled_sampling_makes_the_rope_table_eagerly(tiny_wan_path, load_wan, monkeypatch):
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    base = load_wan(tiny_wan_path)
    stock = base.model.diffusion_model.rope_embedder
    compiling = []
    stock_forward = stock.forward
    monkeypatch.setattr(stock, "forward", lambda ids: compiling.append(torch.compiler.is_compiling()) or stock_forward(ids))
    eager = sample(apply_salad(base, CONFIG))
    model = apply_salad(base, CONFIG)
    set_torch_compile_wrapper(model=model, backend="inductor")
    compiling.clear()
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = sample(model)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0, "nothing was compiled"
    assert compiling and not any(compiling), f"the RoPE embedder was traced by Dynamo: {compiling}"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_salad_wraps_the_stock_embedder_over_salad_and_after_a_sampled_clone(tiny_wan_path, load_wan):
    base = load_wan(tiny_wan_path)
    stock = base.model.diffusion_model.rope_embedder
    twice = apply_salad(apply_salad(base, CONFIG), CONFIG)
    assert twice.object_patches[ROPE_KEY].stock is stock
    sample(twice)  # ComfyUI leaves the shared model patched until the next load
    assert not isinstance(base.model.diffusion_model.rope_embedder, type(stock))
    assert apply_salad(base, CONFIG).object_patches[ROPE_KEY].stock is stock


def test_a_dropped_salad_model_is_freed_without_the_garbage_collector(tiny_wan_path, load_wan):
    """ComfyUI frees models by reference counting: nothing SALAD patches may form a cycle
    through the diffusion model (an object patch on a bound method would)."""
    import comfy.model_management as mm

    base = load_wan(tiny_wan_path)
    patched = apply_salad(base, CONFIG)
    sample(patched)
    model = weakref.ref(base.model.diffusion_model)
    gc.collect()
    gc.disable()
    try:
        mm.unload_all_models()
        del patched, base
        mm.cleanup_models()
        assert model() is None, "the diffusion model outlived its patchers (a reference cycle)"
    finally:
        gc.enable()
