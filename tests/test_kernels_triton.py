"""Triton (and FlexAttention) kernels against the torch references in kernels/*/naive.py.

CPU: runs under the Triton interpreter (CI exports TRITON_INTERPRET=1) at tiny shapes.
GPU (``@pytest.mark.gpu``): the full matrix of odd shapes, both dtypes, flex, torch.compile; on
Hopper both sparse forward kernels (Gluon and Triton). CPU also compiles the Gluon kernel for
sm_90 (no GPU needed) and reads ptxas's verdict: no spills, no serialised wgmma.
Error rule: ||kernel - fp64 ref|| <= 2 x ||torch backend (same precision) - fp64 ref|| (+ a tiny
absolute floor), outputs NaN-poisoned before each launch, fresh random inputs for every case.
"""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels.block_select.naive import (
    select_topk_blocks_naive,
    sliding_window_blocks_naive,
    spatial_temporal_token_order,
)
from kernels.block_sparse_attn.naive import block_sparse_attention_naive, block_sparse_attention_torch
from kernels.linear_attn.naive import linear_attention_naive, linear_attention_torch
from kernels.layout import out_like

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def is_hopper() -> bool:
    """Asked inside GPU tests only: no CUDA initialisation at collection."""
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # test ids

cpu_only = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET), reason="CPU kernel tests need Triton with TRITON_INTERPRET=1"
)


def gpu_only(fn):
    fn = pytest.mark.skipif(
        not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs CUDA + Triton (no interpreter)"
    )(fn)
    return pytest.mark.gpu(fn)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every Triton launch starts from NaN / -1 outputs."""
    if not HAS_TRITON:
        return
    from kernels.block_select import triton as sel_t
    from kernels.block_sparse_attn import triton as bsa_t
    from kernels.linear_attn import triton as lin_t

    for mod in (sel_t, bsa_t, lin_t):
        monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def wan_qkv(b, h, n, d, dtype, device, seed):
    """q, k, v as [B, H, N, D] views of [B, N, H, D] tensors (Wan's layout), fresh each call."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(b, n, h, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).transpose(1, 2)
        for _ in range(3)
    ]


def check_topk(q, k, bs, topk, query_group=1):
    """The Triton selection (pooling at bs, then groups of query_group query blocks scored with
    their token-weighted mean) against the naive one (pooling q at bs * query_group directly)."""
    from kernels.block_select.triton import select_topk_blocks_triton

    sel = select_topk_blocks_triton(q, k, bs, topk, query_group)
    ref = select_topk_blocks_naive(q, k, bs, topk, query_group)
    assert sel.query_group == ref.query_group == query_group
    assert sel.kv_indices.shape == ref.kv_indices.shape
    assert torch.equal(sel.kv_counts, ref.kv_counts)
    assert int(sel.kv_indices.min()) >= 0
    idx = sel.kv_indices.long()
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "ids must be ascending and unique"
    nb = idx.shape[2]
    rows = torch.arange(nb, device=idx.device)
    for offset in range(query_group):  # every block of a group holds its group's diagonal blocks
        diag = (rows // query_group * query_group + offset).clamp(max=nb - 1)
        assert bool((idx == diag[:, None]).any(-1).all())
    if query_group == 2:  # and one list per group
        assert torch.equal(idx[:, :, 1::2], idx[:, :, 0:nb - 1:2][:, :, :idx[:, :, 1::2].shape[2]])
    if not torch.equal(sel.kv_indices, ref.kv_indices):
        # Near-ties may legitimately differ: the chosen set's scores must match the reference's.
        from kernels.block_select.naive import mean_pool_blocks

        q_rows = mean_pool_blocks(q, bs * query_group).double().repeat_interleave(query_group, dim=2)[:, :, :nb]
        scores = q_rows @ mean_pool_blocks(k, bs).double().transpose(-1, -2)
        scores = scores + (rows[None, :] // query_group == rows[:, None] // query_group).to(scores.dtype) * 1e30
        got = scores.gather(-1, idx).sort(-1).values
        want = scores.gather(-1, ref.kv_indices.long()).sort(-1).values
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return sel


def check_attention(q, k, v, sel, backend="triton"):
    out, lse = kernels.block_sparse_attention(q, k, v, sel, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = block_sparse_attention_naive(q.double(), k.double(), v.double(), sel)
    base_out, base_lse = block_sparse_attention_torch(q, k, v, sel)
    assert rel(out, ref_out) <= 2 * rel(base_out, ref_out) + 1e-6, (rel(out, ref_out), rel(base_out, ref_out))
    assert rel(lse, ref_lse) <= 2 * rel(base_lse, ref_lse) + 1e-5, (rel(lse, ref_lse), rel(base_lse, ref_lse))
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    return out, lse


def check_linear(q, k, v, backend="triton"):
    out = kernels.linear_attention(q, k, v, backend=backend)
    assert not out.isnan().any()
    ref = linear_attention_naive(q.double(), k.double(), v.double())
    base = linear_attention_torch(q, k, v)
    assert rel(out, ref) <= 2 * rel(base, ref) + 1e-6, (rel(out, ref), rel(base, ref))
    return out


def salad_reference(q, k, v, sel, w, bias, coeff):
    """Alg. 1's combine in fp64 from the naive branches: O_s + c * (O_l W^T + b), head-merged."""
    b, h, n, dv = v.shape
    o_s, _ = block_sparse_attention_naive(q.double(), k.double(), v.double(), sel)
    o_l = linear_attention_naive(q.double(), k.double(), v.double())
    proj = o_l.transpose(1, 2).reshape(b, n, h * dv) @ w.double().t()
    if bias is not None:
        proj = proj + bias.double()
    if coeff is not None:
        proj = proj * coeff.double().view(b, 1, 1)
    return o_s + proj.view(b, n, h, dv).transpose(1, 2)


def check_salad(q, k, v, sel, seed, with_bias=True, with_scale=True):
    """kernels.salad_attention (Triton) vs the fp64 reference, within 2x the torch backend's error."""
    b, h, _, dv = v.shape
    g = torch.Generator().manual_seed(seed)
    c = h * dv
    w = (torch.randn(c, c, generator=g) * c**-0.5).to(q.device, q.dtype)
    bias = torch.randn(c, generator=g).to(q.device) if with_bias else None
    coeff = (torch.rand(b, generator=g) + 0.25).to(q.device) if with_scale else None
    out = kernels.salad_attention(q, k, v, sel, w, bias, linear_scale=coeff, backend="triton")
    assert not out.isnan().any() and out.dtype == q.dtype and out.stride() == out_like(q, dv).stride()
    ref = salad_reference(q, k, v, sel, w, bias, coeff)
    base = kernels.salad_attention(q, k, v, sel, w, bias, linear_scale=coeff, backend="torch")
    assert rel(out, ref) <= 2 * rel(base, ref) + 1e-6, (rel(out, ref), rel(base, ref))
    return out


def stswa(b, h, grid, bs, device, windows):
    temporal = torch.arange(h) % 2 == 1
    sel = kernels.sliding_window_blocks(b, grid, bs, torch.tensor(windows), temporal, device, backend="triton")
    n = grid[0] * grid[1] * grid[2]
    order = spatial_temporal_token_order(grid, temporal, device)
    ref = sliding_window_blocks_naive(b, n, bs, torch.tensor(windows), order, device)
    assert torch.equal(sel.kv_counts, ref.kv_counts)
    assert torch.equal(sel.kv_indices, ref.kv_indices)
    return sel


# --------------------------------------------------------------------------- CPU (interpreter)

CPU_CASES = [
    # (B, H, N, D, block, topk, dtype)
    (2, 3, 200, 64, 32, 3, torch.bfloat16),
    (2, 2, 150, 128, 16, 1, torch.float16),
    (2, 2, 131, 64, 32, 99, torch.bfloat16),  # k = all blocks
    (1, 12, 70, 64, 16, 2, torch.float16),
]


@cpu_only
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"B{c[0]}H{c[1]}N{c[2]}D{c[3]}bs{c[4]}k{c[5]}{str(c[6])[-4:]}")
def test_topk_attention_linear_cpu(case):
    b, h, n, d, bs, topk, dtype = case
    q, k, v = wan_qkv(b, h, n, d, dtype, "cpu", seed=b * 1000 + h * 100 + n + d + topk)
    sel = check_topk(q, k, bs, topk)
    out, _ = check_attention(q, k, v, sel)
    assert out.stride() == q.stride()  # Wan layout kept: no copy on the way out
    check_linear(q, k, v)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stswa_token_order_cpu(dtype):
    grid, bs, b, h = (4, 3, 7), 16, 2, 2  # N = 84: partial last block
    q, k, v = wan_qkv(b, h, 84, 64, dtype, "cpu", seed=7)
    sel = stswa(b, h, grid, bs, "cpu", [16, 20])
    check_attention(q, k, v, sel)


@cpu_only
@pytest.mark.parametrize("order_mode", ["gather", "permute"])
@pytest.mark.parametrize("chunk_rows", [32, 8192], ids=["chunked", "one_chunk"])
def test_salad_attention_op_cpu(chunk_rows, order_mode, monkeypatch):
    """The whole combine: ST-SWA (token order) and Top-K, Proj applied over several row chunks
    (a partial last one) or one, with and without bias / per-sample scale."""
    from kernels.block_sparse_attn import triton as bsa_t

    monkeypatch.setattr(bsa_t, "PROJ_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(bsa_t, "ORDER_MODE", order_mode)
    grid, bs, b, h = (3, 4, 10), 16, 2, 2  # N = 120: partial last block
    q, k, v = wan_qkv(b, h, 120, 64, torch.bfloat16, "cpu", seed=11)
    check_salad(q, k, v, stswa(b, h, grid, bs, "cpu", [16, 40]), seed=1)
    sel = kernels.select_topk_blocks(q, k, bs, 3, backend="triton")
    check_salad(q, k, v, sel, seed=2, with_bias=False, with_scale=False)
    # q as a plain contiguous [B, H, N, D] tensor: no head-merged view of the output exists.
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    check_salad(qc, kc, vc, sel, seed=3)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_features_and_folded_projection_cpu(dtype):
    """The fused op's linear branch: features relu(q_d) z_d / den * c from the kernel (a row
    range of a Wan-layout q, partial last tile; B = 2 so the fold is batched) times the
    Proj-folded state == c * O_l W^T in fp64."""
    from kernels.linear_attn.triton import linear_features_triton, linear_fold_projection, linear_state_triton

    b, h, n, d = 2, 3, 150, 64
    q, k, v = wan_qkv(b, h, n, d, dtype, "cpu", seed=21)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(h * d, h * d, generator=g) * (h * d) ** -0.5).to(dtype)
    coeff = torch.rand(b, generator=g) + 0.25
    state, z = linear_state_triton(k, v)
    folded = linear_fold_projection(state, z, w, dtype)
    rows = slice(37, n)
    feats = linear_features_triton(q[:, :, rows], z, 1e-6, coeff)
    assert feats.shape == (b, n - 37, h * d) and feats.dtype == dtype and not feats.isnan().any()

    wq = q[:, :, rows].double().clamp_min(0) * z.double()[:, :, None, :]
    want = (wq / (wq.sum(-1, keepdim=True) + 1e-6) * coeff.double().view(b, 1, 1, 1)).transpose(1, 2).reshape(b, n - 37, h * d)
    same_precision = want.to(dtype)  # what a torch computation in q's dtype would store
    assert rel(feats, want) <= 2 * rel(same_precision, want) + 1e-6, (rel(feats, want), rel(same_precision, want))

    o_l = linear_attention_naive(q.double(), k.double(), v.double())[:, :, rows]
    ref = o_l.transpose(1, 2).reshape(b, n - 37, h * d) @ w.double().t() * coeff.double().view(b, 1, 1)
    got = torch.stack([feats[i].float() @ folded[i].float() for i in range(b)])
    unfolded = torch.stack([o_l.to(dtype).transpose(1, 2).reshape(b, n - 37, h * d)[i].float() @ w.float().t() for i in range(b)])
    base = unfolded * coeff.view(b, 1, 1)  # the unfolded path: O_l rounded to dtype, then Proj
    assert rel(got, ref) <= 2 * rel(base, ref) + 1e-6, (rel(got, ref), rel(base, ref))


@cpu_only
def test_salad_attention_fp16_stays_finite_when_a_key_channel_is_never_positive():
    """fp16: a head whose k channel 0 is never positive (z_0 = 0) and whose q is positive only
    there, with large v: the features must not overflow (an earlier fold scaled them by max|S|
    and turned such rows into inf * 0 = NaN); the op matches the fp64 reference."""
    b, h, n, d = 1, 2, 64, 32
    q, k, v = wan_qkv(b, h, n, d, torch.float32, "cpu", seed=8)
    k[:, 0, :, 0] = -1.0
    q[:, 0] = -q[:, 0].abs()
    q[:, 0, :, 0] = 2.0
    v = v * 50
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    sel = kernels.select_topk_blocks(q, k, 16, 2, backend="torch")
    check_salad(q, k, v, sel, seed=3)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,bs", [(150, 16), (200, 32), (131, 64)], ids=["N150bs16", "N200bs32", "N131bs64"])
@pytest.mark.parametrize("capped", [False, True], ids=["splits", "capped_splits"])
def test_linear_state_pooled_cpu(n, bs, dtype, capped, monkeypatch):
    """One pass for the linear state and the Top-K pooling (N not a multiple of the block, more
    than one row split; capped: fewer splits of more rows, as at 14B's 40 heads): S, z vs fp64
    within 2x the torch backend's error; pooled blocks equal the pooling kernel's; the selection
    made from them equals select_topk_blocks'."""
    from kernels.block_select.naive import mean_pool_blocks
    from kernels.linear_attn import triton as lin_t
    from kernels.linear_attn.naive import linear_attention_state

    b, h, d = 2, 3, 64
    monkeypatch.setattr(lin_t, "STATE_ROWS", bs)  # several splits even at these N
    if capped:  # 2 splits (from 3 to 10): each of several blocks, the last one partial
        monkeypatch.setattr(lin_t, "STATE_PROGRAMS", 2 * b * h)
    q, k, v = wan_qkv(b, h, n, d, dtype, "cpu", seed=n + bs)
    state, z, qp, kpt = kernels.linear_state_pooled(q, k, v, bs, backend="triton")
    want_s, want_z = (t.double() for t in linear_attention_state(k.double(), v.double()))
    base_s, base_z = linear_attention_state(k, v)
    assert rel(state, want_s) <= 2 * rel(base_s, want_s) + 1e-6, (rel(state, want_s), rel(base_s, want_s))
    assert rel(z, want_z) <= 2 * rel(base_z, want_z) + 1e-6, (rel(z, want_z), rel(base_z, want_z))
    torch.testing.assert_close(qp, mean_pool_blocks(q, bs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kpt, mean_pool_blocks(k, bs).transpose(-1, -2), rtol=1e-5, atol=1e-6)
    sel = kernels.select_topk_pooled(qp, kpt, bs, 3, n, backend="triton")
    ref = kernels.select_topk_blocks(q, k, bs, 3, backend="torch")
    assert torch.equal(sel.kv_indices, ref.kv_indices) and torch.equal(sel.kv_counts, ref.kv_counts)


@cpu_only
def test_linear_state_pooled_rejects_what_it_cannot_pool():
    """The Triton pass pools one block per loop step: other block sizes are refused (the torch
    backend takes them); q and k of different shapes are refused by the op."""
    q, k, v = wan_qkv(1, 2, 40, 16, torch.bfloat16, "cpu", seed=0)
    with pytest.raises(ValueError, match=r"Expected block_size in \(16, 32, 64, 128\), got 8"):
        kernels.linear_state_pooled(q, k, v, 8, backend="triton")
    assert kernels.linear_state_pooled(q, k, v, 8, backend="torch")[2].shape == (1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"Expected q and k of one shape"):
        kernels.linear_state_pooled(q[:, :, :32], k, v, 16, backend="torch")


def test_select_topk_pooled_rejects_mismatched_blocks():
    qp = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"Expected pooled q \[B, H, 2, D\]"):
        kernels.select_topk_pooled(qp, torch.zeros(1, 2, 16, 3), 32, 1, 40, backend="torch")


@cpu_only
def test_salad_attention_takes_a_precomputed_state():
    """salad_attention with (S, z) handed in uses them: with another pair of k, v's state it
    equals the op run on those k, v for the linear branch (both backends); the pooled pass's
    state gives the op's own result; a state of the wrong shape or dtype is refused."""
    q, k, v = wan_qkv(2, 2, 120, 64, torch.bfloat16, "cpu", seed=4)
    _, k2, v2 = wan_qkv(2, 2, 120, 64, torch.bfloat16, "cpu", seed=5)
    sel = kernels.select_topk_blocks(q, k, 16, 3, backend="torch")
    w = (torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 0.1).to(torch.bfloat16)
    for backend in ("torch", "triton"):
        state, z, _, _ = kernels.linear_state_pooled(q, k, v, 16, backend=backend)
        own = kernels.salad_attention(q, k, v, sel, w, backend=backend, linear_state=(state, z))
        assert torch.equal(own, kernels.salad_attention(q, k, v, sel, w, backend=backend)), backend
        state2, z2, _, _ = kernels.linear_state_pooled(q, k2, v2, 16, backend=backend)
        got = kernels.salad_attention(q, k, v, sel, w, backend=backend, linear_state=(state2, z2))
        # O_s(k, v) + Proj(O_l(k2, v2)) = O_s(k, v) + [full(k2, v2) - O_s(k2, v2)]: built from ops
        sparse = kernels.block_sparse_attention(q, k, v, sel, backend="torch")[0].float()
        sparse2 = kernels.block_sparse_attention(q, k2, v2, sel, backend="torch")[0].float()
        other = kernels.salad_attention(q, k2, v2, sel, w, backend="torch").float()
        want = sparse + other - sparse2
        assert rel(got, want) < 2e-2 and rel(got, own) > 5e-2, (backend, rel(got, want), rel(got, own))
    with pytest.raises(ValueError, match=r"Expected linear state S \(2, 2, 64, 64\)"):
        kernels.salad_attention(q, k, v, sel, w, backend="torch", linear_state=(state[:1], z))
    with pytest.raises(ValueError, match=r"Expected an fp32 linear state"):
        kernels.salad_attention(q, k, v, sel, w, backend="torch", linear_state=(state.half(), z))


def test_salad_attention_op_rejects_bad_proj():
    q, k, v = wan_qkv(1, 2, 40, 16, torch.float32, "cpu", seed=0)
    sel = kernels.select_topk_blocks(q, k, 16, 1, backend="torch")
    with pytest.raises(ValueError, match=r"Expected Proj weight \[32, 32\]"):
        kernels.salad_attention(q, k, v, sel, torch.zeros(16, 16), backend="torch")
    with pytest.raises(ValueError, match=r"Expected linear_scale of shape \(1,\)"):
        kernels.salad_attention(q, k, v, sel, torch.zeros(32, 32), linear_scale=torch.ones(2), backend="torch")


def test_registry_fallbacks(monkeypatch, caplog):
    """No Triton: one warning, torch path; a backend that fails to load falls back to torch."""
    from kernels import registry

    monkeypatch.setattr(registry, "triton_available", lambda: False)
    registry._warn_once.cache_clear()
    cuda = torch.device("cuda")
    with caplog.at_level("WARNING", logger="salad"):
        assert registry.resolve_backend("linear_attention", "auto", cuda) == "torch"
        assert registry.resolve_backend("block_sparse_attention", "triton", cuda) == "torch"
        assert registry.resolve_backend("select_topk_blocks", "auto", cuda) == "torch"
    assert sum("Triton is not installed" in r.message for r in caplog.records) == 1
    assert registry.resolve_backend("linear_attention", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SALAD_KERNEL_BACKEND", "torch")
    assert registry.resolve_backend("block_sparse_attention", "auto", cuda) == "torch"
    monkeypatch.delenv("SALAD_KERNEL_BACKEND")

    def broken(op, backend):
        if backend != "torch":
            raise ImportError("no triton")
        return "torch-impl"

    monkeypatch.setattr(registry, "load_implementation", broken)
    monkeypatch.setattr(registry, "resolve_backend", lambda op, req, dev: "triton")
    assert registry.implementation("linear_attention", "auto", cuda) == "torch-impl"
    registry._warn_once.cache_clear()


def test_broken_triton_install_falls_back_for_every_op(monkeypatch):
    """Triton found but failing to import: every op with a Triton entry loads its torch
    implementation instead (each Triton entry lives in a module that imports Triton, so the
    failure shows at load time, where the registry catches it, not at the first call)."""
    import sys

    from kernels import registry

    triton_modules = {f"kernels.{entry['triton'].split(':')[0]}" for entry in registry.IMPLEMENTATIONS.values() if "triton" in entry}
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in triton_modules:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(registry, "resolve_backend", lambda op, req, dev: "triton")
    registry.load_implementation.cache_clear()
    registry._warn_once.cache_clear()
    try:
        for op, entry in registry.IMPLEMENTATIONS.items():
            if "triton" in entry:
                impl = registry.implementation(op, "triton", torch.device("cuda"))
                want = entry["torch"].split(":")[1]
                assert impl.__name__ == want, f"{op}: got {impl.__module__}.{impl.__name__}, expected the torch {want}"
    finally:
        registry.load_implementation.cache_clear()
        registry._warn_once.cache_clear()


def test_fake_impls_match_layout():
    """register_fake output strides equal the real ones (torch.compile relies on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = wan_qkv(1, 2, 40, 16, torch.float32, "cpu", seed=3)
    sel = kernels.select_topk_blocks(q, k, 16, 2, backend="torch")
    real_o, real_l = kernels.block_sparse_attention(q, k, v, sel, backend="torch")
    real_lin = kernels.linear_attention(q, k, v, backend="torch")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fsel = kernels.BlockSelection(mode.from_tensor(sel.kv_indices), mode.from_tensor(sel.kv_counts), 16, 40)
        fo, fl = kernels.block_sparse_attention(fq, fk, fv, fsel, backend="torch")
        flin = kernels.linear_attention(fq, fk, fv, backend="torch")
    assert fo.stride() == real_o.stride() and fl.stride() == real_l.stride()
    assert flin.stride() == real_lin.stride()


# --------------------------------------------------------------------------- GPU

GPU_SHAPES = [(2, 12, 1000, 128), (2, 40, 777, 64), (2, 12, 1000, 64), (1, 40, 1100, 128)]


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("topk", [1, 4, 10_000], ids=["k1", "k4", "kall"])
def test_topk_gpu(shape, dtype, topk):
    b, h, n, d = shape
    q, k, v = wan_qkv(b, h, n, d, dtype, "cuda", seed=n + h + d + topk)
    sel = check_topk(q, k, 64, topk)
    check_attention(q, k, v, sel)
    check_linear(q, k, v)
    if topk == 4 and shape == GPU_SHAPES[0] and dtype == torch.bfloat16:  # flex compiles per shape
        check_attention(q, k, v, sel, backend="flex")
    if topk == 4:
        check_salad(q, k, v, sel, seed=n)
    if is_hopper():  # the Triton kernel too (the Gluon one ran above)
        from kernels.block_sparse_attn import triton as bsa_t

        assert bsa_t.sparse_forward_kernel(q, k, v, sel) == "gluon"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bsa_t, "USE_GLUON", False)
            check_attention(q, k, v, sel)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads,d", [(12, 128), (40, 64)])
def test_stswa_gpu(heads, d, dtype):
    grid = (5, 12, 20)  # N = 1200, 18.75 blocks of 64
    b = 2
    q, k, v = wan_qkv(b, heads, 1200, d, dtype, "cuda", seed=heads + d)
    windows = [64 * (1 + (i % 4)) for i in range(heads)]
    sel = stswa(b, heads, grid, 64, "cuda", windows)
    check_attention(q, k, v, sel)
    if heads == 12 and dtype == torch.bfloat16:
        check_attention(q, k, v, sel, backend="flex")
    from kernels.block_sparse_attn import triton as bsa_t

    old = bsa_t.ORDER_MODE
    bsa_t.ORDER_MODE = "permute"
    try:
        check_attention(q, k, v, sel)
    finally:
        bsa_t.ORDER_MODE = old
    check_salad(q, k, v, sel, seed=heads)


@gpu_only
def test_gluon_kernel_choice_layouts_and_edges_gpu():
    if not is_hopper():
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    from kernels.block_sparse_attn import triton as bsa_t

    q, k, v = wan_qkv(2, 12, 1000, 128, torch.bfloat16, "cuda", seed=11)
    sel = kernels.select_topk_blocks(q, k, 64, 3)
    assert bsa_t.sparse_forward_kernel(q, k, v, sel) == "gluon"
    # Contiguous [B, H, N, D], the other layout it reads.
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    assert bsa_t.sparse_forward_kernel(qc, kc, vc, sel) == "gluon"
    check_attention(qc, kc, vc, sel)
    # The per-head output bias (Wan's layout), LSE included.
    bias = torch.randn(2, 12 * 128, device="cuda")
    out, lse = bsa_t.block_sparse_attention_triton(q, k, v, sel, out_bias=bias)
    ref, ref_lse = block_sparse_attention_naive(q.double(), k.double(), v.double(), sel)
    ref = ref + bias.double().view(2, 12, 1, 128)
    base, base_lse = block_sparse_attention_torch(q, k, v, sel)  # same precision: the sum rounded once
    base = (base.float() + bias.view(2, 12, 1, 128)).to(q.dtype)
    assert rel(out, ref) <= 2 * rel(base, ref) + 1e-6, (rel(out, ref), rel(base, ref))
    assert rel(lse, ref_lse) <= 2 * rel(base_lse, ref_lse) + 1e-5
    # Value head dim != query head dim.
    v64 = wan_qkv(2, 12, 1000, 64, torch.bfloat16, "cuda", seed=13)[2]
    assert bsa_t.sparse_forward_kernel(q, k, v64, sel) == "gluon"
    check_attention(q, k, v64, sel)
    # Rows past N must not see the neighbouring batch: Inf there may not turn 0 * Inf into NaN.
    v_inf = v.clone()
    v_inf[1, :, :64] = float("inf")  # batch 1's first block; batch 0's last block (N = 1000) ends at row 1024
    out_inf, _ = bsa_t.block_sparse_attention_triton(q, k, v_inf, sel)
    assert not out_inf[0].isnan().any()
    # Empty rows (count 0): zero output and -inf LSE, as in the Triton kernel.
    empty = kernels.BlockSelection(sel.kv_indices, sel.kv_counts.clone().index_fill_(2, torch.tensor([0, 7], device="cuda"), 0),
                                   64, 1000)
    out_e, lse_e = bsa_t.block_sparse_attention_triton(q, k, v, empty)
    rows = torch.cat([torch.arange(0, 64), torch.arange(448, 512)])
    assert bool((out_e[:, :, rows] == 0).all()) and bool(torch.isneginf(lse_e[:, :, rows]).all())
    full, full_lse = bsa_t.block_sparse_attention_triton(q, k, v, sel)
    others = torch.ones(1000, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out_e[:, :, others], full[:, :, others]) and torch.equal(lse_e[:, :, others], full_lse[:, :, others])
    # What it does not take goes to the Triton kernel.
    assert bsa_t.sparse_forward_kernel(q, k, v, kernels.select_topk_blocks(q, k, 32, 3)) == "triton"
    assert bsa_t.sparse_forward_kernel(q, kc, v, sel) == "triton"  # q in Wan's layout, k contiguous
    assert bsa_t.sparse_forward_kernel(q, k, vc, sel) == "triton"  # only v differs
    assert bsa_t.sparse_forward_kernel(q, k, v.half(), sel) == "triton"  # mixed dtypes


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("topk", [1, 4, 10_000], ids=["k1", "k4", "kall"])
def test_gluon_grouped_kernel_gpu(shape, dtype, topk):
    """query_group 2 (one list per pair of query blocks): the warp-specialised Gluon kernel
    against the fp64 reference, and equal to the single-block kernel on the same lists."""
    if not is_hopper():
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    from kernels.block_sparse_attn import triton as bsa_t

    b, h, n, d = shape
    q, k, v = wan_qkv(b, h, n, d, dtype, "cuda", seed=n + h + d + topk + 7)
    sel = check_topk(q, k, 64, topk, query_group=2)
    assert bsa_t.sparse_forward_kernel(q, k, v, sel) == "gluon"
    out, lse = check_attention(q, k, v, sel)
    single = kernels.BlockSelection(sel.kv_indices, sel.kv_counts, 64, n)  # the same lists, one block a program
    out1, lse1 = kernels.block_sparse_attention(q, k, v, single, backend="triton")
    assert torch.equal(out, out1) and torch.equal(lse, lse1)
    if topk == 4:
        check_salad(q, k, v, sel, seed=n + 1)  # the per-head output bias in the grouped epilogue
        v_inf = v.clone()
        v_inf[-1, :, :64] = float("inf")  # the last batch's first block, just past the others' rows
        out_inf, _ = bsa_t.block_sparse_attention_triton(q, k, v_inf, sel)
        assert not out_inf[:-1].isnan().any()


@gpu_only
def test_gluon_compile_failure_warns_once_and_uses_the_triton_kernel_gpu(monkeypatch, caplog):
    if not is_hopper():
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    from triton.compiler.errors import CompilationError

    from kernels.block_sparse_attn import gluon as bsa_g
    from kernels.block_sparse_attn import triton as bsa_t

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise CompilationError(None, None, "warpgroup_mma: unexpected keyword")

    monkeypatch.setattr(bsa_g, "block_sparse_attention_gluon", broken)
    monkeypatch.setattr(bsa_t, "_gluon_failed", False)
    q, k, v = wan_qkv(1, 4, 700, 128, torch.bfloat16, "cuda", seed=12)
    sel = kernels.select_topk_blocks(q, k, 64, 3)
    with caplog.at_level("WARNING", logger="salad"):
        check_attention(q, k, v, sel)
        check_attention(q, k, v, sel)
    assert len(calls) == 1, "the Gluon kernel must not be retried after a compile failure"
    warnings = [r.getMessage() for r in caplog.records if "Gluon" in r.getMessage()]
    assert len(warnings) == 1 and "unexpected keyword" in warnings[0] and "Triton 3.6" in warnings[0], warnings
    assert bsa_t.sparse_forward_kernel(q, k, v, sel) == "triton"


# Run in a fresh interpreter: under TRITON_INTERPRET=1 (CI) Gluon's jit makes interpreter objects.
_COMPILE_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from kernels.block_sparse_attn import gluon as bsa_g

dtype_name, d, dv, has_bias, ptx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
grouped = sys.argv[6] == "1"
torch_dtype = {"bf16": bsa_g.torch.bfloat16, "fp16": bsa_g.torch.float16}[dtype_name]
desc = {w: f"tensordesc<{dtype_name}[1,64,{w}],{bsa_g._smem_layout(64, w, torch_dtype)!r}>" for w in (d, dv)}
fn = bsa_g._bsa_fwd_hopper_grouped_kernel if grouped else bsa_g._bsa_fwd_hopper_kernel
sig = {name: "i32" for name in fn.arg_names}
sig.update(q_desc=desc[d], k_desc=desc[d], v_desc=desc[dv], O="*" + dtype_name, LSE="*fp32", KVI="*i32",
           KVC="*i32", OBIAS="*fp32", qk_scale="fp32")
const = dict(BS=64, D=d, DV=dv, STAGES=bsa_g.GROUPED_STAGES if grouped else bsa_g.STAGES, HAS_OBIAS=has_bias)
options = {"num_warps": 4}
if grouped:
    const["CONSUMER_REGS"] = bsa_g.CONSUMER_REGS
    options["maxnreg"] = bsa_g.GROUPED_MAXNREG
sig.update({name: "constexpr" for name in const})
src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): val for k, val in const.items()})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
open(ptx, "w").write(compiled.asm["ptx"])
"""


def _ptxas_verdict(dtype_name, d, dv, has_bias, tmp_path, grouped=False):
    """Compile the Gluon kernel for sm_90a on this (GPU-less) machine; ptxas -v's report. (Integer
    arguments are plain i32 here, without the divisibility hints a real launch specialises on.)"""
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in this Triton ({ptxas})")
    ptx = str(tmp_path / "bsa_gluon.ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, dtype_name, str(d), str(dv), str(int(has_bias)), ptx,
                    str(int(grouped))],
                   env=env, cwd=root, check=True, timeout=300)
    run = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True, text=True,
                         check=True, timeout=300)
    return run.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype_name,d,dv,has_bias", [("bf16", 128, 128, True), ("fp16", 64, 64, False), ("bf16", 128, 64, False)])
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_gluon_kernel_compiles_for_hopper_without_spills_or_serialised_wgmma(dtype_name, d, dv, has_bias, grouped,
                                                                              tmp_path):
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    verdict = _ptxas_verdict(dtype_name, d, dv, has_bias, tmp_path, grouped)
    assert "0 bytes spill stores, 0 bytes spill loads" in verdict, verdict
    # C7514/C7515: ptxas waits after every wgmma because registers of one in flight are touched.
    assert "serialized" not in verdict, verdict


@gpu_only
def test_torch_compile_gpu():
    q, k, v = wan_qkv(1, 12, 700, 128, torch.bfloat16, "cuda", seed=5)

    def f(q, k, v):
        sel = kernels.select_topk_blocks(q, k, 64, 3)
        out, _ = kernels.block_sparse_attention(q, k, v, sel)
        lin = kernels.linear_attention(q, k, v)
        return (out + lin).transpose(1, 2).reshape(1, 700, -1)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)


@cpu_only
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_topk_impls_cpu(impl, monkeypatch):
    from kernels.block_select import triton as sel_t

    monkeypatch.setattr(sel_t, "TOPK_IMPL", impl)
    q, k, _ = wan_qkv(2, 3, 170, 64, torch.bfloat16, "cpu", seed=17)
    for topk in (1, 4, 50):
        check_topk(q, k, 16, topk)


@cpu_only
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", [(2, 2, 267, 32, 16, 1), (2, 3, 267, 32, 16, 5), (2, 2, 245, 32, 16, 99),
                                  (1, 1, 4399, 16, 4, 118)], ids=lambda c: "B{}H{}N{}D{}bs{}k{}".format(*c))
def test_topk_query_group_cpu(case, impl, monkeypatch):
    """128-token query blocks over 64-token key blocks, in small: nb 17 (an odd count, the last
    group a single partial block), nb 16 with k = all, nb 1100 (two column segments)."""
    from kernels.block_select import triton as sel_t

    monkeypatch.setattr(sel_t, "TOPK_IMPL", impl)
    b, h, n, d, bs, topk = case
    q, k, _ = wan_qkv(b, h, n, d, torch.bfloat16, "cpu", seed=n + topk + 1)
    sel = check_topk(q, k, bs, topk, query_group=2)
    assert int(sel.kv_counts.min()) == min(max(topk, 2), -(-n // bs))  # both diagonal blocks even at k = 1
    # Through the public op, from blocks the linear-state pass pooled.
    qp, kpt = sel_t.mean_pool_blocks_triton(q, k, bs)
    pooled = kernels.select_topk_pooled(qp, kpt, bs, topk, n, backend="triton", query_group=2)
    assert pooled.query_group == 2 and torch.equal(pooled.kv_indices, sel.kv_indices)


def test_block_selection_query_group_rules():
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="query_group"):
        kernels.BlockSelection(idx, cnt, 64, 100, query_group=3)
    with pytest.raises(ValueError, match="token_order"):
        kernels.BlockSelection(idx, cnt, 64, 100, torch.arange(100)[None], query_group=2)
    with pytest.raises(ValueError, match="query_group"):
        kernels.select_topk_blocks(torch.zeros(1, 1, 100, 16), torch.zeros(1, 1, 100, 16), 64, 1, query_group=4)


def tied_qk(b, h, nb, bs, n, d, seed):
    """bf16 q, k [B, H, N, D] whose scores are small exact integers with many exact ties.

    Entries are -1, 0 or 1 and constant within a block, so the pooled means and their dot
    products are exact in any summation order; the key blocks are drawn from 4 distinct
    vectors, so every row has long runs of equal scores, both signs."""
    g = torch.Generator().manual_seed(seed)
    q_blocks = torch.randint(-1, 2, (b, h, nb, d), generator=g)
    distinct = torch.randint(-1, 2, (b, h, 4, d), generator=g)
    pick = torch.randint(0, 4, (b, h, nb), generator=g)
    k_blocks = distinct.gather(2, pick[..., None].expand(-1, -1, -1, d))
    return [x.repeat_interleave(bs, dim=2)[:, :, :n].to(torch.bfloat16) for x in (q_blocks, k_blocks)]


def topk_lowest_ids(q, k, bs, topk):
    """The Top-K contract with ties broken by lowest block id (torch.topk leaves that open)."""
    from kernels.block_select.naive import mean_pool_blocks

    scores = mean_pool_blocks(q, bs) @ mean_pool_blocks(k, bs).transpose(-1, -2)
    scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    k_eff = max(1, min(topk, scores.shape[-1]))
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :k_eff].sort(dim=-1).values.to(torch.int32)


TOPK_TRITON_CASES = [
    # (B, H, N, D, block, topk): nb = ceil(N / block)
    (2, 2, 267, 32, 16, 1),  # nb 17 (partial last block), diagonal only
    (2, 3, 267, 32, 16, 5),
    (2, 2, 267, 32, 16, 17),  # k = nb
    (2, 2, 261, 16, 8, 7),  # nb 33
    (2, 2, 512, 16, 16, 10),  # nb 32, a power of two
    (2, 2, 512, 16, 16, 32),  # k = nb with no padding column
    (1, 1, 4399, 16, 4, 118),  # nb 1100: 1024 + 256 columns, as at 14B (nb 1182)
]


@cpu_only
@pytest.mark.parametrize("case", TOPK_TRITON_CASES, ids=lambda c: "B{}H{}N{}D{}bs{}k{}".format(*c))
def test_topk_triton_kernel_cpu(case, monkeypatch):
    from kernels.block_select import triton as sel_t

    monkeypatch.setattr(sel_t, "TOPK_IMPL", "triton")
    b, h, n, d, bs, topk = case
    q, k, _ = wan_qkv(b, h, n, d, torch.bfloat16, "cpu", seed=n + topk)
    check_topk(q, k, bs, topk)


@cpu_only
@pytest.mark.parametrize(
    "nb,bs,topk",
    [(17, 8, 1), (17, 8, 6), (40, 8, 13), (40, 8, 40), (600, 4, 150)],
    ids=lambda v: str(v),
)
def test_topk_triton_ties_cpu(nb, bs, topk, monkeypatch):
    """Exact ties across the threshold go to the lowest block ids, also when the tied blocks
    straddle the two column segments (nb 40: 32 + 16 columns, nb 600: 512 + 128)."""
    from kernels.block_select import triton as sel_t

    monkeypatch.setattr(sel_t, "TOPK_IMPL", "triton")
    b, h = (1, 1) if nb > 64 else (2, 2)
    n = nb * bs - 3
    q, k = tied_qk(b, h, nb, bs, n, 16, seed=nb + topk)
    sel = sel_t.select_topk_blocks_triton(q, k, bs, topk)
    assert torch.equal(sel.kv_counts, torch.full_like(sel.kv_counts, min(topk, nb)))
    assert torch.equal(sel.kv_indices, topk_lowest_ids(q, k, bs, topk))


@cpu_only
def test_topk_triton_rejects_head_dim(monkeypatch):
    from kernels.block_select import triton as sel_t

    monkeypatch.setattr(sel_t, "TOPK_IMPL", "triton")
    q, k, _ = wan_qkv(1, 1, 64, 8, torch.bfloat16, "cpu", seed=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        sel_t.select_topk_blocks_triton(q, k, 16, 2)
