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


def test_compiled_salad_attention_frees_k_v_before_the_linear_half():
    """kernels.salad_attention under Inductor: the same result as eager, the linear half adds
    into the sparse half's output in place (no copy), and k and v are freed between the two
    halves, so the linear branch's buffers never coexist with them (the step's memory peak)."""
    import re

    from torch._inductor.utils import run_and_get_code

    import kernels

    b, n, h, d = 1, 96, 2, 32
    c = h * d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, c, generator=g)
    wq, wk, wv, wo = (torch.randn(c, c, generator=g) * c**-0.5 for _ in range(4))
    w_proj, b_proj = torch.randn(c, c, generator=g) * 0.1, torch.randn(c, generator=g)

    def layer(x):
        q, k, v = ((x @ w).view(b, n, h, d).transpose(1, 2) for w in (wq, wk, wv))
        sel = kernels.select_topk_blocks(q, k, 16, 2, backend="torch")
        out = kernels.salad_attention(q, k, v, sel, w_proj, b_proj, linear_scale=torch.full((b,), 0.5), backend="torch")
        return out.transpose(1, 2).reshape(b, n, c) @ wo

    torch._dynamo.reset()
    try:
        got, (code, *_) = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
    lines = code.splitlines()
    sparse = next(i for i, s in enumerate(lines) if "torch.ops.salad.salad_sparse.default(" in s)
    out, _q, k, v = re.findall(r"\b(buf\d+|arg\d+_\d+)\b", lines[sparse])[:4]  # out = op(q, k, v, ...)
    linear = next(i for i, s in enumerate(lines) if "torch.ops.salad.salad_linear_add_.default(" in s)
    assert re.search(rf"salad_linear_add_\.default\({out}\b", lines[linear]), lines[linear]
    freed = {s.strip()[4:] for s in lines[sparse:linear] if s.strip().startswith("del ")}
    assert {k, v} <= freed, f"k ({k}) and v ({v}) still allocated when the linear half runs: {lines[sparse:linear]}"
