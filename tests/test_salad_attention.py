"""SALAD attention in plain torch (paper Alg. 1) against independent, explicit references."""

import math
import os

import pytest
import torch

import kernels
from kernels.block_sparse_attn.naive import block_sparse_attention_naive
from kernels.qk_norm_rope import qk_norm_rope
from salad_core.attention import SaladBranch, merge_heads, salad_attention
from salad_core.gate import scalar_gate

torch.manual_seed(0)


def rand_qkv(b=2, h=3, n=150, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def explicit_attention(q, k, v, mask):
    """Softmax attention with a token-level bool mask [B, H, N, N], in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def dense_sdpa(q, k, v):
    return explicit_attention(q, k, v, torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).expand(*q.shape[:2], -1, -1))


def brute_force_topk_sets(q, k, bs, topk):
    """Per (b, h, query block): set of key blocks, from explicit loops over tokens."""
    b, h, n, _ = q.shape
    nb = math.ceil(n / bs)
    pooled = lambda x, i: x[..., i * bs:min(n, (i + 1) * bs), :].double().mean(-2)  # noqa: E731
    pq = torch.stack([pooled(q, i) for i in range(nb)], -2)
    pk = torch.stack([pooled(k, i) for i in range(nb)], -2)
    scores = pq @ pk.transpose(-1, -2)
    sets = {}
    kk = min(topk, nb)
    for bi in range(b):
        for hi in range(h):
            for i in range(nb):
                others = [j for j in scores[bi, hi, i].argsort(descending=True).tolist() if j != i]
                sets[bi, hi, i] = {i, *others[: kk - 1]}
    return sets


def selection_sets(sel):
    out = {}
    for bi in range(sel.kv_counts.shape[0]):
        for hi in range(sel.kv_counts.shape[1]):
            for i in range(sel.n_blocks):
                c = int(sel.kv_counts[bi, hi, i])
                out[bi, hi, i] = set(sel.kv_indices[bi, hi, i, :c].tolist())
    return out


@pytest.mark.parametrize("topk", [1, 3, 10])
def test_topk_selection_matches_brute_force_and_keeps_diagonal(topk):
    q, k, _ = rand_qkv(n=150)
    sel = kernels.select_topk_blocks(q, k, 32, topk, backend="torch")
    got = selection_sets(sel)
    assert got == brute_force_topk_sets(q, k, 32, topk)
    assert all(i in s for (_, _, i), s in got.items())


def test_topk_with_all_blocks_equals_dense_attention():
    q, k, v = rand_qkv(n=150)
    sel = kernels.select_topk_blocks(q, k, 32, 10**6, backend="torch")
    out, _ = kernels.block_sparse_attention(q, k, v, sel, backend="torch")
    torch.testing.assert_close(out.double(), dense_sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    assert sel.sparsity() == 0.0


def test_block_sparse_attention_matches_explicit_token_mask_and_lse():
    q, k, v = rand_qkv(n=150)
    sel = kernels.select_topk_blocks(q, k, 32, 2, backend="torch")
    n, bs = q.shape[2], 32
    sets = selection_sets(sel)
    mask = torch.zeros(*q.shape[:2], n, n, dtype=torch.bool)
    for (bi, hi, i), keep in sets.items():
        for j in keep:
            mask[bi, hi, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    out, lse = kernels.block_sparse_attention(q, k, v, sel, backend="torch")
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(lse.double(), s.masked_fill(~mask, float("-inf")).logsumexp(-1), atol=1e-5, rtol=1e-5)
    # The naive reference agrees too, and measured sparsity counts token pairs.
    ref, _ = block_sparse_attention_naive(q, k, v, sel)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sel.sparsity() == pytest.approx(1 - mask.double().mean().item())


def stswa_mask(grid, windows, temporal, bs):
    """Token-level ST-SWA mask from grid coordinates, built without any permutation tensor."""
    f_, h_, w_ = grid
    n = f_ * h_ * w_
    tok = torch.arange(n)
    frame, spot = tok // (h_ * w_), tok % (h_ * w_)
    masks = []
    for window, is_temporal in zip(windows, temporal):
        pos = spot * f_ + frame if is_temporal else tok  # position in the head's working order
        blk = pos // bs
        radius = math.ceil(window / bs)
        masks.append((blk[:, None] - blk[None, :]).abs() <= radius)
    return torch.stack(masks)


def test_st_swa_matches_coordinate_mask_and_large_window_is_dense():
    grid = (5, 6, 5)  # 150 tokens, not a multiple of the block
    q, k, v = rand_qkv(n=150)
    windows, temporal = [40, 40, 10**6], [False, True, True]
    sel = kernels.sliding_window_blocks(2, grid, 32, torch.tensor(windows), torch.tensor(temporal), "cpu")
    out, _ = kernels.block_sparse_attention(q, k, v, sel, backend="torch")
    mask = stswa_mask(grid, windows, temporal, 32).expand(2, -1, -1, -1)
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2].double(), dense_sdpa(q, k, v)[:, 2], atol=1e-5, rtol=1e-5)


def test_linear_branch_equals_explicit_relu_kernel():
    q, k, v = rand_qkv(n=97, d=16)
    eps = 1e-6
    got = kernels.linear_attention(q, k, v, eps=eps, backend="torch")
    ref = torch.empty(q.shape, dtype=torch.float64)
    fq, fk = torch.relu(q.double()), torch.relu(k.double())
    for i in range(q.shape[2]):  # eq. 3, first line, one query at a time
        w = (fq[:, :, i:i + 1] * fk).sum(-1)  # [B, H, N]
        ref[:, :, i] = (w[..., None] * v.double()).sum(2) / (w.sum(-1)[..., None] + eps)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_gate_equals_formula():
    x = torch.randn(2, 40, 16)
    gate = torch.nn.Linear(16, 1)
    ref = torch.stack([torch.sigmoid(x[b] @ gate.weight[0] + gate.bias[0]).mean() for b in range(2)])
    torch.testing.assert_close(scalar_gate(x, gate), ref)


def test_fresh_branch_is_zero_projection_and_neutral_gate():
    branch = SaladBranch(16)
    branch.reset_fresh()
    assert branch.projection_is_zero()
    assert float(scalar_gate(torch.randn(1, 5, 16), branch.gate).detach()) == pytest.approx(0.5)
    assert float(branch.scale.detach()) == 1.0


def make_branch(dim, seed=1):
    torch.manual_seed(seed)
    branch = SaladBranch(dim)
    with torch.no_grad():
        branch.scale.fill_(0.7)
    return branch


def test_salad_attention_combines_branches_as_algorithm_1():
    q, k, v = rand_qkv(b=2, h=2, n=150, d=16)
    x = torch.randn(2, 150, 32)
    branch = make_branch(32)
    sel = kernels.select_topk_blocks(q, k, 32, 2, backend="torch")
    out, gate = salad_attention(q, k, v, x, sel, branch, linear_scale=0.8, backend="torch")
    o_s, _ = block_sparse_attention_naive(q, k, v, sel)
    o_l = merge_heads(kernels.linear_attention(q, k, v, backend="torch"))
    g = torch.sigmoid(x @ branch.gate.weight[0] + branch.gate.bias[0]).mean(1)
    ref = merge_heads(o_s) + (0.8 * 0.7 * g)[:, None, None] * (o_l @ branch.proj.weight.T + branch.proj.bias)
    torch.testing.assert_close(gate, g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dropped_branch_equals_zero_lambda():
    q, k, v = rand_qkv(b=1, h=2, n=150, d=16)
    x = torch.randn(1, 150, 32)
    sel = kernels.select_topk_blocks(q, k, 32, 2, backend="torch")
    dropped, gate = salad_attention(q, k, v, x, sel, None, backend="torch")
    zero_lambda, _ = salad_attention(q, k, v, x, sel, make_branch(32), linear_scale=0.0, backend="torch")
    assert gate is None
    torch.testing.assert_close(dropped, zero_lambda)


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def train_attention(load_wan, tiny_wan_path, backend, sparsity=0.5):
    """Layer 0 of a SaladTrainModel (LoRA rank 4 on q/k/v/o, norms frozen) on the tiny Wan,
    with non-trivial LoRA and norm weights, plus x [1, 192, 256] and its RoPE freqs."""
    from salad_core import SaladConfig
    from salad_core.train import SaladTrainModel

    dm = load_wan(tiny_wan_path).model.diffusion_model
    model = SaladTrainModel(dm, SaladConfig(block_size=16, sparsity=sparsity, backend=backend), lora_rank=4)
    attn = model.attn[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("q", "k", "v"):
            getattr(attn, name).lora_B.copy_(torch.randn(256, 4, generator=g) * 0.05)
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.mul_(1 + 0.1 * torch.randn(256, generator=g))
    x = torch.randn(1, 192, 256, generator=g)
    freqs = dm.rope_encode(3, 16, 16, device=x.device, dtype=x.dtype)
    return model, attn, x, freqs


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (fused path on CPU)")
def test_fused_qk_path_under_grad_matches_stock_path(tiny_wan_path, load_wan, monkeypatch):
    """Training (grad on) takes the fused salad::qk_norm_rope: same q/k/v as the stock ops and
    the same gradients for x and the LoRA weights; a whole module call with call.fused too
    (the fused attention op stays grad-free)."""
    import salad_core.attention as attention
    from salad_core.runtime import CALL_KEY, CallInfo

    model, attn, x, freqs = train_attention(load_wan, tiny_wan_path, "triton", sparsity=0.0)  # dense: no top-k ties
    assert model.runtime.fused_kernels(x.device)
    calls = []
    monkeypatch.setattr(attention, "qk_norm_rope", lambda *a: calls.append(a[-1]) or qk_norm_rope(*a))
    lora = [p for name in ("q", "k", "v") for p in (getattr(attn, name).lora_A, getattr(attn, name).lora_B)]
    g = torch.Generator().manual_seed(4)
    grad_qkv = [torch.randn(1, 2, 192, 128, generator=g) for _ in range(3)]
    grad_out = torch.randn(1, 192, 256, generator=g)
    results = {}
    for fused in (True, False):
        xg = x.clone().requires_grad_(True)
        qkv = attn.qkv(xg, freqs, fused)
        grads = torch.autograd.grad(qkv, [xg, *lora], grad_qkv)
        xg = x.clone().requires_grad_(True)
        out = attn(xg, freqs, transformer_options={CALL_KEY: CallInfo(grid=(3, 8, 8), fused=fused)})
        module_grads = torch.autograd.grad(out, [xg, *lora], grad_out)
        results[fused] = (qkv, grads, out, module_grads)
    assert calls == ["triton"] * 4  # q and k, in qkv() and in the module call; none unfused
    (qkv, grads, out, module_grads), (qkv_ref, grads_ref, out_ref, module_grads_ref) = results[True], results[False]
    for got, want in zip((*qkv, *grads, out, *module_grads), (*qkv_ref, *grads_ref, out_ref, *module_grads_ref)):
        assert got.dtype == want.dtype and rel_err(got, want) < 1e-5, rel_err(got, want)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the stock norm's: fp32 weight
def test_qkv_casts_x_once_under_autocast(tiny_wan_path, load_wan):
    """Under autocast, q/k/v (and their LoRA) share one cast of the fp32 block input; the values
    are exactly those of the stock ops casting x each. The x gradient is bf16-close, not equal:
    the shared cast's gradient sums the six matmul gradients in bf16 (before: in fp32)."""
    _, attn, x, freqs = train_attention(load_wan, tiny_wan_path, "torch")
    seen = []
    hooks = [getattr(attn, name).register_forward_pre_hook(lambda m, args: seen.append(args[0])) for name in "qkv"]
    b, n, h, d = 1, 192, 2, 128
    g = torch.Generator().manual_seed(5)
    grad_qkv = [torch.randn(b, h, n, d, generator=g).bfloat16() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The block input is not a leaf in training (autocast would cache a leaf's cast).
        leaf = x.clone().requires_grad_(True)
        qkv = attn.qkv(leaf * 1, freqs, fused=False)
        (dx,) = torch.autograd.grad(qkv, leaf, grad_qkv)
        for hook in hooks:
            hook.remove()
        leaf_ref = x.clone().requires_grad_(True)
        xr = leaf_ref * 1
        stock = (
            attn._apply_rope(attn.norm_q(attn.q(xr)).view(b, n, h, d), freqs).transpose(1, 2),
            attn._apply_rope(attn.norm_k(attn.k(xr)).view(b, n, h, d), freqs).transpose(1, 2),
            attn.v(xr).view(b, n, h, d).transpose(1, 2),
        )
        (dx_ref,) = torch.autograd.grad(stock, leaf_ref, grad_qkv)
    assert len(seen) == 3 and all(t is seen[0] for t in seen) and seen[0].dtype == torch.bfloat16
    for got, want in zip(qkv, stock):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert dx.dtype == torch.float32 and rel_err(dx, dx_ref) < 1e-2, rel_err(dx, dx_ref)


def test_stats_record_gates_and_sparsity_per_step():
    """SaladStats against sums done by hand: per-step gate means (None where a branch did not
    run, the last call's batch when a step is called twice), sparsity from the token pairs
    really kept (partial last block included), steps in order."""
    from kernels.selection import selection_from_block_mask
    from salad_core.stats import SaladStats

    n, bs = 70, 16  # 5 blocks, the last holds 6 tokens
    mask = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    mask[..., 0] = True  # every query block reads block 0 (16 keys)
    mask[0, 1, :, 4] = True  # head 1 also the partial block (6 keys)
    sel = selection_from_block_mask(mask, bs, n)
    kept = 2 * 16 * n + 6 * n  # per query token: 16 keys (both heads) + 6 (head 1)
    stats = SaladStats(num_layers=3)
    stats.start_run()
    stats.begin_call(0, dense=False)
    stats.record_layer(0, sel, torch.tensor([0.2, 0.4]))
    stats.record_layer(1, sel, None)  # dropped branch
    stats.record_layer(2, sel, torch.tensor([0.6, 1.0]))
    stats.begin_call(1, dense=False)
    stats.record_layer(0, sel, torch.tensor([0.1, 0.3]))
    stats.begin_call(1, dense=False)  # the step's second call (e.g. uncond), another batch size
    stats.record_layer(0, sel, torch.tensor([0.5]))
    stats.record_layer(1, sel, torch.tensor([float("nan")]))  # a diverged gate shows as NaN, not "not run"
    stats.begin_call(2, dense=True)
    s = stats.summary()
    assert s.steps == [0, 1] and s.dense_steps == 1
    assert s.gates[0] == pytest.approx([0.3, None, 0.8])
    assert s.gates[1][0] == pytest.approx(0.5) and math.isnan(s.gates[1][1]) and s.gates[1][2] is None
    assert s.sparsity == pytest.approx(1 - kept / (2 * n * n))  # every call used this selection
