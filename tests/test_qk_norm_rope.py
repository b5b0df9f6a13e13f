"""salad::qk_norm_rope: the torch reference mirrors ComfyUI's Wan q/k path bit for bit; the
Triton kernel (CPU interpreter here, CUDA on the GPU box) matches the reference.

Backward (training): the Triton kernel against autograd through an independent fp64 forward,
with the error rule of test_kernels_triton.py: ||kernel - fp64|| <= 2 x ||torch autograd in the
same precision - fp64|| + a tiny floor; outputs NaN-poisoned before each launch. Note: the
Triton interpreter rounds fp32 -> bf16 by truncation (CUDA rounds to nearest), so CPU bf16
errors are up to about twice the GPU's."""

import importlib.util
import os

import pytest
import torch

from kernels.qk_norm_rope import qk_norm_rope
from kernels.qk_norm_rope.naive import qk_norm_rope_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Tests that need the Triton kernels on CPU tensors (elsewhere backend "triton" falls to torch).
triton_cpu = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="CPU Triton tests need Triton with TRITON_INTERPRET=1",
)
FLOOR = 1e-6  # relative: fp32 kernels and fp32 torch both sit near 1e-7 from fp64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every Triton launch (forward and backward) starts from NaN outputs."""
    if HAS_TRITON:
        from kernels.qk_norm_rope import triton as qk_triton

        monkeypatch.setattr(qk_triton, "POISON_OUTPUTS", True)


def rope_freqs(b, n, d, seed=0):
    """Random rotations as Wan builds them: [B, N, 1, D/2, 2, 2] fp32 of (cos, -sin; sin, cos)."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(b, n, 1, d // 2, generator=g, dtype=torch.float64) * 6.28
    cos, sin = ang.cos(), ang.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(b, n, 1, d // 2, 2, 2).float()


def inputs(b=2, n=37, h=3, d=16, dtype=torch.float32, seed=0, batch_freqs=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, h * d, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(h * d, generator=g)).to(dtype)
    return x, w, rope_freqs(b if batch_freqs else 1, n, d, seed + 1)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_reference_is_comfyui_rmsnorm_then_apply_rope1(comfy):
    import comfy.rmsnorm
    from comfy.ldm.flux.math import apply_rope1

    for dtype in (torch.float32, torch.bfloat16):
        x, w, f = inputs(dtype=dtype)
        stock = apply_rope1(comfy.rmsnorm.rms_norm(x, w, 1e-6).view(2, 37, 3, 16), f)
        assert torch.equal(qk_norm_rope_torch(x, w, f, 3, 1e-6), stock)
        assert torch.equal(qk_norm_rope(x, w, f, 3, backend="torch"), stock)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch_freqs", [True, False])
def test_triton_matches_reference(dtype, tol, batch_freqs):
    x, w, f = inputs(dtype=dtype, batch_freqs=batch_freqs, seed=3)
    want = qk_norm_rope_torch(x, w, f, 3, 1e-6)
    got = qk_norm_rope(x, w, f, 3, backend="triton")
    assert got.shape == (2, 37, 3, 16) and got.dtype == dtype and got.is_contiguous()
    assert torch.isfinite(got).all()
    assert rel(got, want) < tol, rel(got, want)
    if dtype == torch.bfloat16:  # at most a rounding step apart
        assert float((got.float() - want.float()).abs().max()) <= 0.02 * float(want.float().abs().max())


def test_triton_non_power_of_two_channels_and_strided_input():
    # C = 5 * 16 = 80 (40 pairs, masked to 64); x a slice of a wider projection (row stride != C)
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(1, 9, 200, generator=g)
    x = wide[..., :80]
    w = 1 + 0.1 * torch.randn(80, generator=g)
    f = rope_freqs(1, 9, 16, 6)
    got = qk_norm_rope(x, w, f, 5, backend="triton")
    assert rel(got, qk_norm_rope_torch(x, w, f, 5, 1e-6)) < 1e-5


def test_fake_kernel_shape_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, f = torch.empty(2, 7, 64), torch.empty(64), torch.empty(1, 7, 1, 16, 2, 2)
        out = qk_norm_rope(x, w, f, 2)
    assert out.shape == (2, 7, 2, 32)


@pytest.mark.gpu
def test_cuda_bf16_wan_shape_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 4680, 1536, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    f = rope_freqs(1, 4680, 128).cuda()
    got = qk_norm_rope(x, w, f, 12, backend="triton")
    assert rel(got, qk_norm_rope_torch(x, w, f, 12, 1e-6)) < 1e-2


def reference_fp64(x, w, f, num_heads, eps=1e-6):
    """Independent fp64 forward: RMSNorm over C, then each (even, odd) pair times its token's
    2x2 matrix as a matmul."""
    b, n, c = x.shape
    x, w, f = x.double(), w.double(), f.double()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w
    pairs = y.view(b, n, num_heads, c // num_heads // 2, 2, 1)
    return (f @ pairs).reshape(b, n, num_heads, c // num_heads)


def reference_grads(x, w, f, num_heads, dy):
    """(dx, dw) in fp64."""
    x, w = (t.detach().double().requires_grad_(True) for t in (x, w))
    return torch.autograd.grad(reference_fp64(x, w, f, num_heads), (x, w), dy.double())


def op_grads(x, w, f, num_heads, dy, backend, weight_grad=False):
    """(dx,) or (dx, dw) of salad::qk_norm_rope on ``backend``, x keeping its strides."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(weight_grad)
    out = qk_norm_rope(x, w, f, num_heads, backend=backend)
    return torch.autograd.grad(out, (x, w) if weight_grad else (x,), dy)


def backward_inputs(dtype, b=2, n=37, h=5, d=16, seed=11):
    """Odd shapes: N = 37, C = 5 * 16 = 80 (40 pairs, masked to 64), freqs of batch 1 shared by
    B = 2, x a slice of a wider projection (row stride != C), and dy a [B, H, N, D] gradient
    seen as [B, N, H, D] (what attention's backward hands back)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, h * d + 24, generator=g) * 3).to(dtype)[..., : h * d]
    w = (1 + 0.1 * torch.randn(h * d, generator=g)).to(dtype)
    dy = torch.randn(b, h, n, d, generator=g).to(dtype).transpose(1, 2)
    return x, w, rope_freqs(1, n, d, seed + 1), dy


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_matches_fp64_reference(dtype):
    x, w, f, dy = backward_inputs(dtype)
    assert x.stride(1) != x.shape[-1] and dy.stride(2) != dy.shape[-1]
    want_dx, _ = reference_grads(x, w, f, 5, dy)
    (got,) = op_grads(x, w, f, 5, dy, "triton")
    (torch_dx,) = op_grads(x, w, f, 5, dy, "torch")
    assert got.shape == x.shape and got.dtype == dtype and torch.isfinite(got).all()
    bound = 2 * rel(torch_dx, want_dx) + FLOOR
    assert rel(got, want_dx) <= bound, (rel(got, want_dx), bound)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_cpu)])
def test_weight_gradient_when_the_weight_requires_grad(backend):
    x, w, f, dy = backward_inputs(torch.float32, seed=13)
    want_dx, want_dw = reference_grads(x, w, f, 5, dy)
    dx, dw = op_grads(x, w, f, 5, dy, backend, weight_grad=True)
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert rel(dx, want_dx) < 1e-5 and rel(dw, want_dw) < 1e-5, (rel(dx, want_dx), rel(dw, want_dw))


def test_torch_backward_passes_gradcheck():
    """fp64 end to end (fp64 freqs keep the rotation in fp64): x and weight gradients against
    finite differences."""
    x, w, f = inputs(b=2, n=5, h=2, d=8, dtype=torch.float64)
    f = f.double()
    torch.autograd.gradcheck(lambda x, w: qk_norm_rope(x, w, f, 2, backend="torch"),
                             (x.requires_grad_(True), w.requires_grad_(True)))


def test_freqs_that_require_grad_are_rejected():
    x, w, f = inputs()
    with pytest.raises(ValueError, match="Expected RoPE freqs that do not require grad"):
        qk_norm_rope(x.requires_grad_(True), w, f.requires_grad_(True), 3, backend="torch")


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # the graph recorder's, harmless
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_cpu)])
def test_compiles_fullgraph_with_backward(backend):
    """torch.compile traces forward and backward in one graph each (AOTAutograd needs the
    fakes); the Triton backward stays one opaque custom op in the backward graph."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    x, w, f, dy = backward_inputs(torch.float32, b=1, n=9, seed=17)
    recorder = AotEagerAndRecordGraphs()
    fn = torch.compile(lambda x: qk_norm_rope(x, w, f, 5, backend=backend), fullgraph=True, backend=recorder)
    try:
        xc = x.detach().requires_grad_(True)
        (dx,) = torch.autograd.grad(fn(xc), xc, dy)
    finally:
        torch._dynamo.reset()
    assert torch.equal(dx, op_grads(x, w, f, 5, dy, backend)[0])
    targets = {str(node.target) for node in recorder.bw_graphs[0].graph.nodes}
    assert ("salad.qk_norm_rope_backward.default" in targets) == (backend == "triton"), targets


@pytest.mark.gpu
def test_cuda_backward_wan_shape_matches_fp64_reference():
    """1.3B's q/k shape in bf16: Triton dx within 2x of torch autograd's error in bf16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4680, 1536, generator=g).cuda().bfloat16()
    w = (1 + 0.1 * torch.randn(1536, generator=g)).cuda().bfloat16()
    dy = torch.randn(1, 12, 4680, 128, generator=g).cuda().bfloat16().transpose(1, 2)
    f = rope_freqs(1, 4680, 128).cuda()
    want_dx, _ = reference_grads(x, w, f, 12, dy)
    (got,) = op_grads(x, w, f, 12, dy, "triton")
    (torch_dx,) = op_grads(x, w, f, 12, dy, "torch")
    assert torch.isfinite(got).all()
    assert rel(got, want_dx) <= 2 * rel(torch_dx, want_dx) + FLOOR, (rel(got, want_dx), rel(torch_dx, want_dx))


@pytest.mark.parametrize("live", [True, False])
def test_fused_hot_path_equals_reference_salad_attention(live):
    """salad_attention_fused (kernels.salad_attention, Proj folded into the linear state) ==
    salad_attention (the readable reference) for a live branch and for a dropped one."""
    import kernels
    from salad_core.attention import SaladBranch, salad_attention, salad_attention_fused

    g = torch.Generator().manual_seed(7)
    b, h, n, d = 2, 2, 70, 16
    q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3))
    x = torch.randn(b, n, h * d, generator=g)
    branch = SaladBranch(h * d)
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    branch = branch if live else None
    sel = kernels.select_topk_blocks(q, k, 16, 2, backend="torch")
    with torch.no_grad():
        want, gate_want = salad_attention(q, k, v, x, sel, branch, linear_scale=0.7, backend="torch")
        got, gate = salad_attention_fused(q, k, v, x, sel, branch, linear_scale=0.7, backend="triton")
    assert rel(got, want) < 1e-5, rel(got, want)
    if live:
        assert torch.allclose(gate, gate_want)


@pytest.mark.slow
def test_patched_wan_fused_backend_matches_torch_backend(tiny_wan_path, load_wan, wan_inputs, run_wan):
    """The whole patched ComfyUI model: backend 'triton' (fused q/k norm + RoPE, fused op) vs
    'torch' (stock ops, reference path) with a live linear branch."""
    from salad_core import SaladConfig, fresh_salad_weights, wan_info
    from salad_core.patch import apply_salad

    base = load_wan(tiny_wan_path)
    inputs = wan_inputs(base, batch=2, frames=3, height=16, width=16, seed=3)
    w = fresh_salad_weights(wan_info(base.model.diffusion_model))
    g = torch.Generator().manual_seed(0)
    w = type(w)(w.meta, {k: (torch.randn(t.shape, generator=g) * 0.05 if ".salad.proj" in k or ".salad.gate" in k else t)
                         for k, t in w.tensors.items()}, w.source)
    outs = [run_wan(apply_salad(base, SaladConfig(block_size=16, sparsity=0.5, backend=be), w), inputs)
            for be in ("torch", "triton")]
    assert rel(outs[1], outs[0]) < 1e-4, rel(outs[1], outs[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode,backend", [("topk", "triton"), ("st_swa", "triton"), ("topk", "torch")])
def test_salad_block_traces_without_graph_breaks(tiny_wan_path, load_wan, mode, backend):
    """torch.compile (ComfyUI's compile node compiles the diffusion model) sees one graph per
    SALAD self-attention call: stats, selection cache and the fused ops stay traceable."""
    import torch._dynamo

    from salad_core import SaladConfig, fresh_salad_weights, wan_info
    from salad_core.patch import apply_salad, salad_runtime
    from salad_core.runtime import CALL_KEY, CallInfo

    base = load_wan(tiny_wan_path)
    w = fresh_salad_weights(wan_info(base.model.diffusion_model))
    w = type(w)(w.meta, {k: (torch.randn(t.shape) * 0.05 if ".salad.proj" in k or ".salad.gate" in k else t)
                         for k, t in w.tensors.items()}, w.source)
    m = apply_salad(base, SaladConfig(block_size=16, sparsity=0.5, sparse_mode=mode, backend=backend), w)
    m.patch_model()
    try:
        attn = m.model.diffusion_model.blocks[0].self_attn
        x = torch.randn(1, 192, 256)
        freqs = m.model.diffusion_model.rope_encode(3, 16, 16, device=x.device, dtype=x.dtype)
        opts = {CALL_KEY: CallInfo(grid=(3, 8, 8), step=0, fused=backend == "triton")}
        salad_runtime(m).prepare_selections((3, 8, 8), 1, x.device)  # as the model wrapper does
        with torch.no_grad():
            explained = torch._dynamo.explain(attn)(x, freqs, transformer_options=opts)
    finally:
        m.unpatch_model()
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_reapplying_after_a_salad_run_wraps_the_stock_module(tiny_wan_path, load_wan, wan_inputs, run_wan):
    """ComfyUI leaves the last sampled clone's patches on the shared model. A new SALAD Apply on
    the base (a re-queue with a changed widget) must wrap the stock WanSelfAttention, not the
    previous SALAD module (that chained modules and kept every old branch's weights alive)."""
    from salad_core import SaladConfig
    from salad_core.attention import SaladSelfAttention
    from salad_core.patch import apply_salad, self_attn_key

    base = load_wan(tiny_wan_path)
    inputs = wan_inputs(base, frames=3, height=16, width=16)
    first = apply_salad(base, SaladConfig(block_size=16, backend="torch"))
    run_wan(first, inputs)
    assert isinstance(base.model.diffusion_model.blocks[0].self_attn, SaladSelfAttention)  # still patched
    second = apply_salad(base, SaladConfig(block_size=16, sparse_mode="st_swa", backend="torch"))
    module = second.object_patches[self_attn_key(0)]
    assert not isinstance(module._stock_forward.__self__, SaladSelfAttention)
    run_wan(second, inputs)
