"""Analytic backward of ReLU linear attention (kernels/linear_attn/triton_bwd.py, the torch
formulas in kernels/linear_attn/naive.py) and its wiring into ``salad::linear_attention``.

CPU: the torch formulas at any dtype; the Triton kernels under the interpreter
(TRITON_INTERPRET=1) at tiny shapes, bf16 and fp16. GPU (``@pytest.mark.gpu``): odd shapes,
D = 64 and 128, bf16 and fp16.
Error rule, as in test_block_sparse_attn_bwd.py: ||grad - fp64 ref|| <= 2 x ||autograd through
linear_attention_torch (same precision) - fp64 ref|| + a tiny floor, per gradient; Triton
gradients NaN-poisoned before each launch. The fp64 reference is autograd through the O(N^2)
kernel form ``linear_attention_naive`` in fp64, which shares no code with the analytic formulas.
Inputs are shifted negative (about 70% of q and k below zero) so the relu masks matter.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.linear_attn import naive
from kernels.linear_attn.naive import (
    linear_attention_backward_torch,
    linear_attention_naive,
    linear_attention_torch,
)
from test_kernels_triton import DTYPE_NAMES, HAS_TRITON, cpu_only, gpu_only, rel

FLOOR = 1e-6  # relative
EPS = 1e-6
SHIFT = 0.5  # subtracted from q and k


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every Triton launch (forward and backward) starts from NaN outputs."""
    if not HAS_TRITON:
        return
    from kernels.linear_attn import triton as lin_t
    from kernels.linear_attn import triton_bwd

    monkeypatch.setattr(lin_t, "POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_bwd, "POISON_OUTPUTS", True)


def make_inputs(b, h, n, d, dv, dtype, device, seed, v_scale=1.0):
    """q, k, v, dO as [B, H, N, *] views of [B, N, H, *] tensors (Wan's layout)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def wan(dim, shift=0.0, scale=1.0):
        x = (torch.randn(b, n, h, dim, generator=g) - shift) * scale
        return x.to(device=device, dtype=dtype).transpose(1, 2)

    return wan(d, SHIFT), wan(d, SHIFT), wan(dv, scale=v_scale), wan(dv)


def autograd_grads(attention, q, k, v, grad_out, dtype=None):
    """Autograd (dq, dk, dv) of ``attention``, with the inputs cast to ``dtype`` (default: kept)."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, EPS)
    return torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))


def check_grads(got, q, k, v, grad_out, layout=True):
    """``got`` = (dq, dk, dv) against the fp64 reference by the error rule, in the inputs' dtypes
    and (``layout``: the kernels' promise, not the torch formulas') their strides."""
    ref = autograd_grads(linear_attention_naive, q, k, v, grad_out, torch.float64)
    base = autograd_grads(linear_attention_torch, q, k, v, grad_out)
    for name, g, b, r, x in zip(("dq", "dk", "dv"), got, base, ref, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert not layout or g.stride() == x.stride(), f"{name}: layout not kept"
        assert not g.isnan().any(), f"{name}: unwritten (NaN) elements"
        assert rel(g, r) <= 2 * rel(b, r) + FLOOR, (name, rel(g, r), rel(b, r))


def triton_grads(q, k, v, grad_out):
    from kernels.linear_attn.triton_bwd import linear_attention_backward_triton

    return linear_attention_backward_triton(grad_out, q, k, v, EPS)


def op_grads(q, k, v, grad_out, backend="torch"):
    """Gradients through the public op (its registered autograd)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = kernels.linear_attention(q, k, v, eps=EPS, backend=backend)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def all_negative_head(q, k, head=0):
    """k < 0 everywhere in one head (z = 0, so den = eps there), q < 0 on every other row."""
    k[:, head] = -k[:, head].abs() - 0.1
    q[:, :, ::2] = -q[:, :, ::2].abs() - 0.1


# --------------------------------------------------------------------------- torch formulas (no Triton)

TORCH_CASES = [
    # (B, H, N, D, Dv, dtype)
    (2, 3, 97, 16, 16, torch.float32),
    (2, 3, 150, 64, 32, torch.float32),  # Dv != D
    (1, 2, 77, 16, 64, torch.bfloat16),
    (2, 3, 100, 64, 64, torch.bfloat16),
    (2, 2, 90, 32, 32, torch.float16),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: "B{}H{}N{}D{}Dv{}-".format(*c[:5]) + DTYPE_NAMES[c[5]])
def test_torch_formulas(case):
    b, h, n, d, dv, dtype = case
    q, k, v, do = make_inputs(b, h, n, d, dv, dtype, "cpu", seed=n + d + dv)
    check_grads(linear_attention_backward_torch(do, q, k, v, EPS), q, k, v, do, layout=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_formulas_den_eps(dtype):
    q, k, v, do = make_inputs(2, 3, 70, 16, 32, dtype, "cpu", seed=4)
    all_negative_head(q, k)
    got = linear_attention_backward_torch(do, q, k, v, EPS)
    check_grads(got, q, k, v, do, layout=False)
    for g in got:
        assert g.isfinite().all() and not g[:, 0].any()  # output 0 there, locally constant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_backward_cpu(dtype):
    """CPU autograd of the op takes the torch formulas (auto choice)."""
    q, k, v, do = make_inputs(2, 3, 85, 16, 32, dtype, "cpu", seed=5)
    check_grads(op_grads(q, k, v, do), q, k, v, do, layout=False)


@pytest.mark.parametrize("env", ["auto", "torch", pytest.param("triton", marks=cpu_only)])
def test_backward_does_not_recompute_forward(monkeypatch, env):
    """The backward never calls the forward (the old path differentiated linear_attention_torch)."""
    import kernels.autograd as ag

    monkeypatch.setenv(ag.BACKWARD_ENV, env)
    q, k, v, do = make_inputs(1, 2, 40, 16, 16, torch.bfloat16, "cpu", seed=6)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = kernels.linear_attention(q, k, v, eps=EPS, backend="torch")

    def boom(*args, **kwargs):
        raise AssertionError("the backward recomputed the forward")

    for name in ("linear_attention_torch", "linear_attention_naive"):
        monkeypatch.setattr(naive, name, boom)
        monkeypatch.setattr(ag, name, boom, raising=False)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert all(g is not None and g.isfinite().all() for g in grads)


@pytest.mark.skipif(not HAS_TRITON, reason="the auto choice assumes Triton is installed")
def test_linear_backward_backend_choice(monkeypatch):
    from kernels.autograd import BACKWARD_ENV
    from kernels.autograd import linear_backward_backend as choose

    def linear_backward_backend(device, dtype, head_dim, value_dim, v_dtype=None):
        return choose(device, (dtype, dtype, v_dtype or dtype), head_dim, value_dim)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = dict(dtype=torch.bfloat16, head_dim=128, value_dim=128)
    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    assert linear_backward_backend(cuda, **bf16) == "triton"
    assert linear_backward_backend(cuda, **{**bf16, "dtype": torch.float16, "value_dim": 16}) == "triton"
    assert linear_backward_backend(cpu, **bf16) == "torch"
    for other in (dict(dtype=torch.float32), dict(dtype=torch.float64), dict(head_dim=96), dict(value_dim=256),
                  dict(v_dtype=torch.float32)):  # mixed dtypes: the kernels multiply in one
        assert linear_backward_backend(cuda, **{**bf16, **other}) == "torch", other
    monkeypatch.setenv(BACKWARD_ENV, "torch")
    assert linear_backward_backend(cuda, **bf16) == "torch"
    monkeypatch.setenv(BACKWARD_ENV, "flex")
    assert linear_backward_backend(cuda, **bf16) == "triton"  # no flex version
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    assert linear_backward_backend(cuda, **{**bf16, "dtype": torch.float32}) == "torch"  # cuBLAS fp32
    advice = r"\. Try SALAD_BACKWARD_BACKEND=torch\.$"
    with pytest.raises(ValueError, match=r"^Expected head dims .*got 96 \(q, k\).*" + advice):
        linear_backward_backend(cuda, **{**bf16, "head_dim": 96})
    with pytest.raises(ValueError, match=r"^Expected q, k and v in one dtype, got .*float32.*" + advice):
        linear_backward_backend(cuda, **bf16, v_dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_backward_backend(cpu, **bf16)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
def test_backward_kernel_errors():
    q = torch.zeros(1, 1, 32, 24, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^Expected head dims .*got 24 .*\. Try SALAD_BACKWARD_BACKEND=torch\.$"):
        triton_grads(q, q, q, q)
    q = q[..., :16]
    with pytest.raises(ValueError, match=r"^Expected a dtype .*got float32\. Try SALAD_BACKWARD_BACKEND=torch\.$"):
        triton_grads(q.float(), q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match=r"^Expected q, k, v and grad_out in one dtype, got .*Try casting"):
        triton_grads(q, q, q, q.half())


# --------------------------------------------------------------------------- CPU (interpreter)

CPU_CASES = [
    # (B, H, N, D, Dv, dtype)
    (2, 3, 100, 16, 16, torch.bfloat16),  # N not a multiple of either kernel's tile
    (2, 3, 77, 64, 64, torch.bfloat16),
    (1, 2, 150, 16, 64, torch.bfloat16),  # Dv != D
    (2, 3, 99, 32, 16, torch.float16),
    (1, 2, 2100, 16, 16, torch.bfloat16),  # 3 row ranges: atomics across programs
]


@cpu_only
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}H{}N{}D{}Dv{}-".format(*c[:5]) + DTYPE_NAMES[c[5]])
def test_backward_kernel_cpu(case):
    b, h, n, d, dv, dtype = case
    q, k, v, do = make_inputs(b, h, n, d, dv, dtype, "cpu", seed=n + d + dv)
    check_grads(triton_grads(q, k, v, do), q, k, v, do)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_kernel_den_eps_cpu(dtype):
    """den = eps (z = 0): dO / den reaches 1e6 x dO, past fp16's range, without inf or NaN."""
    check_den_eps(*make_inputs(2, 3, 70, 16, 32, dtype, "cpu", seed=8))


def check_den_eps(q, k, v, do):
    """Head 0 gets all-negative k (den = eps): its gradients are finite and exactly zero."""
    all_negative_head(q, k)
    got = triton_grads(q, k, v, do)
    check_grads(got, q, k, v, do)
    for g in got:
        assert g.isfinite().all() and not g[:, 0].any()


@cpu_only
def test_backward_kernel_fp16_large_state_cpu():
    """S beyond fp16's range (|v| ~ 3000, 1100 rows): the split's power-of-two scaling keeps it."""
    q, k, v, do = make_inputs(1, 2, 1100, 16, 16, torch.float16, "cpu", seed=9, v_scale=3000.0)
    assert float(naive.linear_attention_state(k, v)[0].abs().max()) > 65504
    check_grads(triton_grads(q, k, v, do), q, k, v, do)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_op_triton_backward_cpu(monkeypatch, dtype):
    """SALAD_BACKWARD_BACKEND=triton: the op's backward runs the kernels (fp32: torch formulas)."""
    from kernels.autograd import BACKWARD_ENV
    from kernels.linear_attn import triton_bwd

    calls = []
    real = triton_bwd.linear_attention_backward_triton

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(triton_bwd, "linear_attention_backward_triton", spy)
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    q, k, v, do = make_inputs(2, 3, 72, 16, 32, dtype, "cpu", seed=10)
    check_grads(op_grads(q, k, v, do, backend="triton"), q, k, v, do, layout=dtype != torch.float32)
    assert len(calls) == (dtype != torch.float32)


@cpu_only
def test_op_triton_backward_traces_under_compile_cpu(monkeypatch):
    """torch.compile (AOTAutograd) traces the Triton backward through its custom op's fake."""
    from kernels.autograd import BACKWARD_ENV

    monkeypatch.setenv(BACKWARD_ENV, "triton")
    q, k, v, do = make_inputs(1, 2, 70, 16, 16, torch.bfloat16, "cpu", seed=11)

    def loss(q, k, v):
        return (kernels.linear_attention(q, k, v, eps=EPS, backend="torch") * do).float().sum()

    def grads(fn):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves)

    compiled = grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, grads(loss)):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- GPU

GPU_SHAPES = [(2, 12, 1000, 128, 128), (2, 3, 777, 64, 64), (1, 40, 1100, 128, 128), (1, 12, 3001, 64, 128)]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}D{}Dv{}".format(*s))
def test_backward_kernel_gpu(shape, dtype):
    b, h, n, d, dv = shape
    q, k, v, do = make_inputs(b, h, n, d, dv, dtype, "cuda", seed=n + h + d)
    check_grads(triton_grads(q, k, v, do), q, k, v, do)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_kernel_den_eps_gpu(dtype):
    check_den_eps(*make_inputs(2, 6, 900, 128, 128, dtype, "cuda", seed=12))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_op_backward_gpu(monkeypatch, dtype):
    """The default (auto) backward of the op on CUDA: kernels for 16-bit inputs, cuBLAS fp32."""
    from kernels.autograd import BACKWARD_ENV

    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    q, k, v, do = make_inputs(2, 12, 1200, 128, 128, dtype, "cuda", seed=13)
    check_grads(op_grads(q, k, v, do, backend="auto"), q, k, v, do, layout=dtype != torch.float32)
