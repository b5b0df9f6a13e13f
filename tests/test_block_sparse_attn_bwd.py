"""Triton backward of block-sparse attention (kernels/block_sparse_attn/triton_bwd.py) against
autograd through the torch references, and its wiring into the custom op (kernels/autograd.py).

CPU: runs under the Triton interpreter (TRITON_INTERPRET=1) at tiny shapes, fp32 (+ one bf16).
GPU (``@pytest.mark.gpu``): odd shapes, D = 64 and 128, bf16 and fp16.
Error rule, as in test_kernels_triton.py: ||kernel - fp64 ref|| <= 2 x ||torch (same precision)
- fp64 ref|| + a tiny floor, per gradient; gradients NaN-poisoned before each launch.
The fp64 reference is a dense masked softmax written here: the torch backends compute in fp32
internally even for fp64 inputs, so they cannot be the ground truth for fp32 inputs.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.block_select.naive import sliding_window_blocks_naive, spatial_temporal_token_order
from kernels.block_sparse_attn.naive import block_sparse_attention_torch, from_working_order, to_working_order
from kernels.selection import num_blocks, selection_from_block_mask
from test_kernels_triton import DTYPE_NAMES, HAS_TRITON, cpu_only, gpu_only, rel, wan_qkv

FLOOR = 1e-6  # relative; fp32 recomputes P as exp2(s - lse), about 1e-6 from a softmax


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every Triton launch (forward and backward) starts from NaN outputs."""
    if not HAS_TRITON:
        return
    from kernels.block_sparse_attn import triton as bsa_t
    from kernels.block_sparse_attn import triton_bwd

    monkeypatch.setattr(bsa_t, "POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_bwd, "POISON_OUTPUTS", True)


def dense_reference_fp64(q, k, v, selection, scale):
    """(out, lse) in fp64 with the block mask expanded to tokens (tiny shapes only)."""
    n = q.shape[2]
    order = selection.token_order
    qw, kw, vw = (to_working_order(t.double(), order) for t in (q, k, v))
    token_block = torch.arange(n, device=q.device) // selection.block_size
    block_mask = selection.to_dense_block_mask()
    mask = block_mask[:, :, token_block][:, :, :, token_block]
    scores = (qw @ kw.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, -1) @ vw
    return from_working_order(out, order), from_working_order(scores.logsumexp(-1), order)


def input_grads(attention, q, k, v, selection, scale, grad_out, grad_lse, dtype=None):
    """Autograd (dq, dk, dv) of ``attention``, with the inputs cast to ``dtype`` (default: kept)."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = attention(q, k, v, selection, scale)
    return torch.autograd.grad((out, lse), (q, k, v), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))


def random_grads(q, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, n, d = q.shape
    grad_out = torch.randn(b, h, n, d, generator=g).to(device=q.device, dtype=q.dtype)
    grad_lse = torch.randn(b, h, n, generator=g).to(q.device)
    return grad_out, grad_lse


def check_backward(q, k, v, selection, scale=None, seed=0):
    """Triton (dq, dk, dv) from the Triton forward's out/lse vs fp64 autograd, by the error rule."""
    from kernels.block_sparse_attn.triton import block_sparse_attention_triton
    from kernels.block_sparse_attn.triton_bwd import block_sparse_attention_backward_triton

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad_out, grad_lse = random_grads(q, seed)
    out, lse = block_sparse_attention_triton(q, k, v, selection, scale)
    got = block_sparse_attention_backward_triton(grad_out, q, k, v, out, lse, selection, scale, grad_lse)
    ref = input_grads(dense_reference_fp64, q, k, v, selection, scale, grad_out, grad_lse, torch.float64)
    base = input_grads(block_sparse_attention_torch, q, k, v, selection, scale, grad_out, grad_lse)
    for name, g, b, r, x in zip(("dq", "dk", "dv"), got, base, ref, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert not g.isnan().any(), f"{name}: unwritten (NaN) elements"
        assert rel(g, r) <= 2 * rel(b, r) + FLOOR, (name, rel(g, r), rel(b, r))


def topk_selection(q, k, block_size, topk):
    return kernels.select_topk_blocks(q, k, block_size, topk, backend="torch")


def stswa_selection(batch, heads, grid, block_size, windows, device):
    """ST-SWA with odd heads temporal: a per-head token_order and uneven kv counts (padding)."""
    temporal = torch.arange(heads) % 2 == 1
    order = spatial_temporal_token_order(grid, temporal, device)
    n = grid[0] * grid[1] * grid[2]
    return sliding_window_blocks_naive(batch, n, block_size, torch.tensor(windows), order, device)


# --------------------------------------------------------------------------- no Triton needed

def test_transpose_selection_matches_dense_mask():
    from kernels.block_sparse_attn.triton_bwd import transpose_selection

    g = torch.Generator().manual_seed(0)
    b, h, n, bs = 2, 3, 150, 16
    nb = num_blocks(n, bs)
    mask = torch.rand(b, h, nb, nb, generator=g) < 0.3
    mask |= torch.eye(nb, dtype=torch.bool)
    selection = selection_from_block_mask(mask, bs, n)
    assert bool((selection.kv_counts < selection.max_kv).any()), "want padding entries"
    q_block_ids, starts, counts = transpose_selection(selection)
    by_key_block = mask.transpose(-1, -2).reshape(b * h * nb, nb)
    assert torch.equal(counts.long(), by_key_block.sum(-1))
    for column in range(b * h * nb):
        ids = q_block_ids[starts[column]:starts[column] + counts[column]].long()
        assert torch.equal(ids, by_key_block[column].nonzero().flatten()), column


@pytest.mark.skipif(not HAS_TRITON, reason="the auto choice assumes Triton is installed")
def test_backward_backend_choice(monkeypatch):
    from kernels.autograd import BACKWARD_ENV, backward_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    assert backward_backend(cpu) == "torch"
    assert backward_backend(cuda) == "triton"
    monkeypatch.setenv(BACKWARD_ENV, "torch")
    assert backward_backend(cuda) == "torch"
    monkeypatch.setenv(BACKWARD_ENV, "flex")
    with pytest.raises(ValueError, match="SALAD_BACKWARD_BACKEND=torch"):
        backward_backend(cpu)
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backward_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backward_backend(cpu) == "triton"
    monkeypatch.setenv(BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match="Expected SALAD_BACKWARD_BACKEND in"):
        backward_backend(cpu)


TRITON_BWD_OK = dict(dtype=torch.bfloat16, head_dim=128, value_dim=128, block_size=64)
TRITON_BWD_UNSUPPORTED = [  # (what changes, what the error names)
    (dict(dtype=torch.float64), "float64"),
    (dict(head_dim=96), "96"),
    (dict(value_dim=80), "80"),
    (dict(block_size=8), "8"),
    (dict(dtype=torch.float32, head_dim=256, value_dim=256), "256"),  # fp32 tiles exceed sm_90 smem
]


@pytest.mark.skipif(not HAS_TRITON, reason="the auto choice assumes Triton is installed")
def test_auto_backward_takes_triton_only_for_inputs_it_supports(monkeypatch):
    from kernels.autograd import BACKWARD_ENV, backward_backend
    from kernels.registry import flex_available

    cuda = torch.device("cuda")
    monkeypatch.delenv(BACKWARD_ENV, raising=False)
    assert backward_backend(cuda, **TRITON_BWD_OK) == "triton"
    assert backward_backend(cuda, **{**TRITON_BWD_OK, "dtype": torch.float32, "head_dim": 16}) == "triton"
    other = "flex" if flex_available() else "torch"
    for bad, _ in TRITON_BWD_UNSUPPORTED:
        assert backward_backend(cuda, **{**TRITON_BWD_OK, **bad}) == other, bad


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
@pytest.mark.parametrize("bad,named", TRITON_BWD_UNSUPPORTED, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_explicit_triton_backward_refuses_unsupported_inputs(monkeypatch, bad, named):
    from kernels.autograd import BACKWARD_ENV, backward_backend

    monkeypatch.setenv(BACKWARD_ENV, "triton")
    with pytest.raises(ValueError, match=rf"^Expected .*, got .*\b{named}\b.*\. Try SALAD_BACKWARD_BACKEND=torch\.$"):
        backward_backend(torch.device("cuda"), **{**TRITON_BWD_OK, **bad})


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
def test_backward_kernel_errors_advise_backward_env():
    """The Triton backward's own checks point at SALAD_BACKWARD_BACKEND; the forward's keep
    their backend='torch' advice."""
    from kernels.block_sparse_attn.triton import block_sparse_attention_triton
    from kernels.block_sparse_attn.triton_bwd import block_sparse_attention_backward_triton

    def bwd(q, k, v, selection):
        out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
        block_sparse_attention_backward_triton(out, q, k, v, out, lse, selection)

    n = 32
    q = torch.zeros(1, 1, n, 24)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    sel16 = selection_from_block_mask(mask, 16, n)
    advice = r"\. Try SALAD_BACKWARD_BACKEND=torch\.$"
    with pytest.raises(ValueError, match=r"^Expected .*got 24.*" + advice):
        bwd(q, q, q, sel16)
    with pytest.raises(ValueError, match=r"Try backend='torch'"):
        block_sparse_attention_triton(q, q, q, sel16)
    q = torch.zeros(1, 1, n, 16)
    with pytest.raises(ValueError, match=r"^Expected block_size .*got 8" + advice):
        bwd(q, q, q, selection_from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 8, n))
    q64 = q.double()
    with pytest.raises(ValueError, match=r"^Expected .*got .*float64.*" + advice):
        bwd(q64, q64, q64, sel16)


# --------------------------------------------------------------------------- CPU (interpreter)

CPU_CASES = [
    # (B, H, N, D, block, topk, dtype)
    (2, 3, 100, 16, 16, 2, torch.float32),  # N not a multiple of the block
    (1, 2, 70, 32, 16, 1, torch.float32),  # k = 1: the diagonal only
    (2, 2, 75, 64, 32, 99, torch.float32),  # k = all blocks
    (1, 2, 150, 16, 128, 1, torch.float32),  # 128-token blocks walked as 64-token tiles
    (2, 3, 100, 16, 16, 2, torch.bfloat16),  # the interpreter's round-to-nearest-even path
]


@cpu_only
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}H{}N{}D{}bs{}k{}-{}".format(*c[:6], DTYPE_NAMES[c[6]]))
def test_backward_kernel_cpu(case):
    b, h, n, d, bs, topk, dtype = case
    q, k, v = wan_qkv(b, h, n, d, dtype, "cpu", seed=n + d + topk)
    check_backward(q, k, v, topk_selection(q, k, bs, topk), scale=0.3, seed=n)


@cpu_only
def test_backward_token_order_cpu():
    grid, bs, b, h = (4, 3, 7), 16, 2, 2  # N = 84: partial last block
    q, k, v = wan_qkv(b, h, 84, 32, torch.float32, "cpu", seed=7)
    selection = stswa_selection(b, h, grid, bs, [16, 20], "cpu")
    assert selection.token_order is not None
    check_backward(q, k, v, selection)


def op_grads(q, k, v, selection, scale, grad_out, grad_lse):
    """Gradients through the public custom op (its registered autograd), forward on Triton."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = torch.ops.salad.block_sparse_attention(
        q, k, v, selection.kv_indices, selection.kv_counts, selection.token_order,
        selection.block_size, selection.query_group, scale, "triton")
    return torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))


def check_op_backends(monkeypatch, q, k, v, selection, scale):
    from kernels.autograd import BACKWARD_ENV

    grad_out, grad_lse = random_grads(q, seed=1)
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    got = op_grads(q, k, v, selection, scale, grad_out, grad_lse)
    monkeypatch.setenv(BACKWARD_ENV, "torch")
    base = op_grads(q, k, v, selection, scale, grad_out, grad_lse)
    ref = input_grads(dense_reference_fp64, q, k, v, selection, scale, grad_out, grad_lse, torch.float64)
    for name, g, b, r, x in zip(("dq", "dk", "dv"), got, base, ref, (q, k, v)):
        assert g.stride() == x.stride(), f"{name}: layout not kept"
        assert rel(g, r) <= 2 * rel(b, r) + FLOOR, (name, rel(g, r), rel(b, r))


@cpu_only
def test_op_triton_backward_matches_torch_cpu(monkeypatch):
    grid, bs, b, h = (3, 4, 6), 16, 2, 2  # N = 72
    q, k, v = wan_qkv(b, h, 72, 16, torch.float32, "cpu", seed=21)  # Wan [B, N, H, D] views
    selection = stswa_selection(b, h, grid, bs, [16, 24], "cpu")
    check_op_backends(monkeypatch, q, k, v, selection, scale=0.3)


@cpu_only
@pytest.mark.parametrize("lse_in_loss", [True, False], ids=["out+lse", "out"])
def test_op_triton_backward_traces_under_compile_cpu(monkeypatch, lse_in_loss):
    """torch.compile (AOTAutograd) traces the Triton backward through its custom op's fake,
    also with lse outside the loss (its gradient not materialised)."""
    from kernels.autograd import BACKWARD_ENV

    monkeypatch.setenv(BACKWARD_ENV, "triton")
    q, k, v = wan_qkv(1, 2, 70, 16, torch.float32, "cpu", seed=5)
    selection = topk_selection(q, k, 16, 2)

    def loss(q, k, v):
        out, lse = kernels.block_sparse_attention(q, k, v, selection, backend="torch")
        return out.square().sum() + (lse.sum() if lse_in_loss else 0)

    def grads(fn):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves)

    compiled = grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, grads(loss)):
        torch.testing.assert_close(got, want)


@cpu_only
def test_explicit_triton_backward_refuses_unsupported_head_dim_at_forward(monkeypatch):
    """The op's setup decides the backward from q: an unsupported head dim fails at once."""
    from kernels.autograd import BACKWARD_ENV

    monkeypatch.setenv(BACKWARD_ENV, "triton")
    q, k, v = (t.requires_grad_(True) for t in wan_qkv(1, 2, 40, 24, torch.float32, "cpu", seed=3))
    selection = topk_selection(q.detach(), k.detach(), 16, 2)
    with pytest.raises(ValueError, match=r"got 24.*Try SALAD_BACKWARD_BACKEND=torch"):
        kernels.block_sparse_attention(q, k, v, selection, backend="torch")


@cpu_only
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("used", ["out", "lse"])
def test_unused_output_gradient_is_not_materialized(monkeypatch, backend, used):
    """A loss of ``out`` alone reaches the backward with grad_lse None (no B*H*N zeros to
    allocate and read), one of ``lse`` alone with grad_out None; gradients stay exact."""
    import kernels.autograd as ag

    monkeypatch.setenv(ag.BACKWARD_ENV, backend)
    seen = []
    if backend == "triton":
        real_op = ag._bsa_backward_triton_op

        def spy_op(grad_out, q, k, v, out, lse, grad_lse, *rest):
            seen.append((grad_out, grad_lse))
            return real_op(grad_out, q, k, v, out, lse, grad_lse, *rest)

        monkeypatch.setattr(ag, "_bsa_backward_triton_op", spy_op)
    else:
        real_grads = ag._grads

        def spy_grads(outputs, inputs, grad_outputs):
            seen.append(tuple(grad_outputs))
            return real_grads(outputs, inputs, grad_outputs)

        monkeypatch.setattr(ag, "_grads", spy_grads)
    q, k, v = wan_qkv(1, 2, 72, 16, torch.float32, "cpu", seed=11)
    selection = topk_selection(q, k, 16, 2)
    grad_out, grad_lse = random_grads(q, seed=2)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = kernels.block_sparse_attention(*leaves, selection, scale=0.3, backend="torch")
    if used == "out":
        got = torch.autograd.grad(out, leaves, grad_out)
        grad_lse = torch.zeros_like(grad_lse)
    else:
        got = torch.autograd.grad(lse, leaves, grad_lse)
        grad_out = torch.zeros_like(grad_out)
    assert len(seen) == 1
    seen_out, seen_lse = seen[0]
    if used == "out":
        assert seen_lse is None and seen_out is not None
    else:  # the Triton kernels need a dO: zeros, made only in this rare case
        assert seen_lse is not None and (seen_out is None if backend == "torch" else not seen_out.any())
    ref = input_grads(dense_reference_fp64, q, k, v, selection, 0.3, grad_out, grad_lse, torch.float64)
    base = input_grads(block_sparse_attention_torch, q, k, v, selection, 0.3, grad_out, grad_lse)
    for name, g, b, r in zip(("dq", "dk", "dv"), got, base, ref):
        assert rel(g, r) <= 2 * rel(b, r) + FLOOR, (name, rel(g, r), rel(b, r))


# --------------------------------------------------------------------------- GPU

GPU_SHAPES = [(2, 12, 1000, 128), (2, 3, 777, 64), (1, 40, 1100, 128)]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("topk", [1, 4, 10_000], ids=["k1", "k4", "kall"])
def test_backward_kernel_gpu(shape, dtype, topk):
    b, h, n, d = shape
    q, k, v = wan_qkv(b, h, n, d, dtype, "cuda", seed=n + h + d + topk)
    check_backward(q, k, v, topk_selection(q, k, 64, topk), seed=topk)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,d", [(12, 128), (6, 64)])
def test_backward_token_order_gpu(heads, d, dtype):
    grid, b = (5, 12, 20), 2  # N = 1200, 18.75 blocks of 64
    q, k, v = wan_qkv(b, heads, 1200, d, dtype, "cuda", seed=heads + d)
    windows = [64 * (1 + (i % 4)) for i in range(heads)]
    check_backward(q, k, v, stswa_selection(b, heads, grid, 64, windows, "cuda"))


@gpu_only
def test_backward_block128_gpu():
    q, k, v = wan_qkv(1, 4, 900, 128, torch.bfloat16, "cuda", seed=3)
    check_backward(q, k, v, topk_selection(q, k, 128, 3), scale=0.1)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_op_triton_backward_matches_torch_gpu(monkeypatch, dtype):
    q, k, v = wan_qkv(2, 6, 1200, 128, dtype, "cuda", seed=9)
    windows = [64 * (1 + (i % 3)) for i in range(6)]
    check_op_backends(monkeypatch, q, k, v, stswa_selection(2, 6, (5, 12, 20), 64, windows, "cuda"), 0.1)


@gpu_only
@pytest.mark.parametrize("block_size", [64, 128])
def test_flex_backward_is_correct_or_falls_back_with_a_warning_gpu(monkeypatch, caplog, block_size):
    """SALAD_BACKWARD_BACKEND=flex: either FlexAttention's backward lowers, or (torch 2.11 at
    64-token blocks) one warning names the failure and the torch path runs. Either way the
    gradients of ``out`` meet the error rule. Flex ignores grad_lse, so only dO flows here."""
    import logging

    from kernels import autograd
    from kernels.autograd import BACKWARD_ENV

    q, k, v = wan_qkv(1, 4, 1000, 128, torch.bfloat16, "cuda", seed=block_size)
    selection = topk_selection(q, k, block_size, 3)
    grad_out, _ = random_grads(q, seed=2)
    zero_lse = torch.zeros(q.shape[:3], device="cuda")
    monkeypatch.setenv(BACKWARD_ENV, "flex")
    monkeypatch.setattr(autograd, "_FLEX_BROKEN", False)
    with caplog.at_level(logging.WARNING, logger="salad"):
        got = op_grads(q, k, v, selection, 0.1, grad_out, zero_lse)
    warned = [r for r in caplog.records if "FlexAttention backward failed" in r.getMessage()]
    assert bool(warned) == autograd._FLEX_BROKEN
    monkeypatch.setenv(BACKWARD_ENV, "torch")
    base = op_grads(q, k, v, selection, 0.1, grad_out, zero_lse)
    ref = input_grads(dense_reference_fp64, q, k, v, selection, 0.1, grad_out, zero_lse, torch.float64)
    for name, g, b, r in zip(("dq", "dk", "dv"), got, base, ref):
        assert rel(g, r) <= 2 * rel(b, r) + FLOOR, (name, rel(g, r), rel(b, r))
