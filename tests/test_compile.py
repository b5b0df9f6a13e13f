"""SALAD under ComfyUI's torch.compile node (issue 6): the whole diffusion model is compiled,
SALAD's DIFFUSION_MODEL wrapper included, so per-step host state must not reach Dynamo's guards."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "st_swa"])
def test_compiled_salad_sampling_compiles_once(tiny_wan_path, load_wan, mode):
    """After the first sampling step nothing is compiled again: the step index, the stats lists
    and the selection cache change every step and would each force a recompile (and after
    Dynamo's cache limit, a silent fall back to eager) if the wrapper let Dynamo see them."""
    import comfy.sample
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    from salad_core import SaladConfig
    from salad_core.patch import apply_salad, salad_runtime

    base = load_wan(tiny_wan_path)
    model = apply_salad(base, SaladConfig(block_size=16, sparsity=0.5, sparse_mode=mode, backend="torch"))
    set_torch_compile_wrapper(model=model, backend="inductor")
    latent = torch.zeros(1, 16, 3, 8, 8)
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(0)), {}]]
    graphs_after = []

    def after_step(step, x0, x, total):
        graphs_after.append(counters["stats"]["unique_graphs"])

    torch._dynamo.reset()
    counters.clear()
    try:
        out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 4, 1.0, "euler", "simple", cond, cond,
                                  latent, disable_pbar=True, callback=after_step)
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(out).all()
    assert len(graphs_after) == 4 and graphs_after[0] > 0
    assert graphs_after[-1] == graphs_after[0], f"recompiled after step 0: graphs per step {graphs_after}"
    summary = salad_runtime(model).stats.summary()
    assert list(summary.steps) == [0, 1, 2, 3]  # the wrapper's bookkeeping still ran eagerly
