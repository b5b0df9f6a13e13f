"""Attention benchmark (design.md §7): cuDNN dense vs FlexAttention vs SALAD, Wan2.1 shapes.

    python bench/attention.py [--out bench/results] [--shapes wan1.3b_480p81,wan14b_720p81]
                              [--reps 50] [--sweep] [--profile]

Per shape, in one run: dense_cudnn; for mode in (topk_q128, topk, stswa) (``--modes``; topk_q128
is Top-K with 128-token query blocks, the pack's default, topk with 64-token ones) and sparsity
in (90, 95):
flex_<mode>_<s> (FlexAttention, same block mask, mask prebuilt), salad_sparse_<mode>_<s>
(Triton sparse branch alone; topk includes no selection), salad_full_<mode>_<s> (selection for
topk — stswa's is static and cached — + gate + kernels.salad_attention: sparse branch with
the gated Proj bias in its epilogue, linear branch with Proj folded into its state, in row chunks
multiplied into O in place; for topk, linear_state_pooled makes the state and the selection's
pooled blocks in one pass, as the pack's hot path does),
salad_full_<mode>_<s>_unfused (separate sparse, linear and Proj ops), and
salad_sparse_stswa_<s>_permute (explicit permutation copies instead of the fused gather).
Linear branch alone: linear_only (forward), linear_bwd (forward + the op's analytic backward) and
linear_bwd_recompute (forward + the backward it replaced: autograd through the fp32 torch
reference recomputed from q, k, v).
Times are medians of >= ``--reps`` calls queued back to back, each between CUDA events, after
warm-up (time_ms). Prints one JSON line per measurement and writes
bench/results/attention-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import git_sha, short_commit  # noqa: E402
import kernels  # noqa: E402
from kernels.block_sparse_attn import triton as bsa_triton  # noqa: E402
from kernels.block_sparse_attn.flex import block_mask_from_selection, flex_call  # noqa: E402
from kernels.block_sparse_attn.naive import block_sparse_attention_torch, to_working_order  # noqa: E402
from kernels.linear_attn.naive import linear_attention_torch  # noqa: E402

SHAPES = {
    # name: (B, H, grid (frames, h, w) after patchify, D)
    "wan1.3b_480p81": (1, 12, (21, 30, 52), 128),
    "wan14b_720p81": (1, 40, (21, 45, 80), 128),
}
BLOCK = 64
RECORDS: list[dict] = []


def time_ms(fn, reps: int, warmup: int = 5, synced: bool = False) -> float:
    """Median GPU time of one call. The calls are queued back to back with an event pair around
    each and one synchronisation at the end, as in a model's forward: a per-call sync would add
    the host's launch time of the op's first kernels (~0.3 ms for the full SALAD op's small
    launches) to every sample, which a running model hides behind the previous layer.
    ``synced``: the session-1..4 method instead (a sync after every call), for the ms_synced rows."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if synced:
            end.synchronize()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak


def record(ctx, case, metric, value, **extra):
    rec = {
        "bench": "attention", "case": case, "shape": ctx["shape"], "device": ctx["device"],
        "metric": metric, "value": round(float(value), 5), "commit": ctx["commit"], "date": ctx["date"],
    }
    if metric == "ms" and not case.startswith("dense_") and "dense_ms" in ctx:
        rec["baseline_case"] = "dense_cudnn"
        rec["speedup"] = round(ctx["dense_ms"] / value, 3)
    rec.update(extra)
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def linear_bwd(q, k, v, grad_out):
    """Training step of the linear branch: the Triton forward, the op's analytic backward."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    return torch.autograd.grad(kernels.linear_attention(*leaves, backend="triton"), leaves, grad_out)


def linear_bwd_recompute(q, k, v, grad_out):
    """The same with the backward that linear_bwd replaced: recompute with the fp32 torch
    reference and differentiate it."""
    kernels.linear_attention(q, k, v, backend="triton")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    return torch.autograd.grad(linear_attention_torch(*leaves), leaves, grad_out)


def topk_for(nb: int, sparsity: int) -> int:
    return max(1, round(nb * (100 - sparsity) / 100))


def window_for(nb: int, sparsity: int) -> int:
    radius = max(0, round((nb * (100 - sparsity) / 100 - 1) / 2))
    return radius * BLOCK


def run_shape(name, args, ctx):
    b, h, grid, d = SHAPES[name]
    n = grid[0] * grid[1] * grid[2]
    c = h * d
    nb = kernels.num_blocks(n, BLOCK)
    ctx["shape"] = name
    dev = "cuda"
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    # Wan layout: [B, N, H, D] tensors, ops see [B, H, N, D] views.
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype, generator=gen).transpose(1, 2) for _ in range(3))
    x = torch.randn(b, n, c, device=dev, dtype=dtype, generator=gen)
    w_gate = torch.randn(1, c, device=dev, dtype=dtype, generator=gen) * c**-0.5
    b_gate = torch.zeros(1, device=dev, dtype=dtype)
    w_proj = torch.randn(c, c, device=dev, dtype=dtype, generator=gen) * c**-0.5
    b_proj = torch.zeros(c, device=dev, dtype=dtype)
    lam_s = 1.0  # lambda * s_l, static
    q_bytes = q.numel() * q.element_size()
    reps = args.reps

    qc, kc, vc = (t.contiguous() for t in (q, k, v))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    dense_case, backend = "dense_cudnn", SDPBackend.CUDNN_ATTENTION

    def dense():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qc, kc, vc)

    try:
        dense()
    except Exception as exc:  # no cuDNN attention in this build: say so, use flash
        print(f"# cuDNN SDPA failed ({exc}); timing flash SDPA as the baseline", flush=True)
        dense_case, backend = "dense_flash", SDPBackend.FLASH_ATTENTION
    dense_ms = time_ms(dense, max(reps, 50))
    ctx["dense_ms"] = dense_ms
    record(ctx, dense_case, "ms", dense_ms)
    record(ctx, dense_case, "ms_synced", time_ms(dense, max(reps, 50), synced=True))
    record(ctx, dense_case, "extra_mem_x_q", peak_extra_bytes(dense) / q_bytes)

    temporal = torch.arange(h) % 2 == 1
    for sparsity in args.sparsities:
        topk = topk_for(nb, sparsity)
        window = window_for(nb, sparsity)
        sel_topk = kernels.select_topk_blocks(q, k, BLOCK, topk, backend="triton")
        # One key list per 128-token query block (SaladConfig.query_group 2, the default); topk: per 64.
        sel_topk128 = kernels.select_topk_blocks(q, k, BLOCK, topk, backend="triton", query_group=2)
        sel_sw = kernels.sliding_window_blocks(b, grid, BLOCK, torch.tensor([window] * h), temporal, dev, backend="triton")
        for mode, sel in (("topk", sel_topk), ("topk_q128", sel_topk128), ("stswa", sel_sw)):
            if mode not in args.modes:
                continue
            tag = f"{mode}_{sparsity}"
            try:
                meas = 100 * sel.sparsity()
                # Correctness at full size: Triton vs the torch (chunked) backend.
                if args.check and name == "wan1.3b_480p81":
                    ref, _ = block_sparse_attention_torch(q, k, v, sel)
                    out, _ = kernels.block_sparse_attention(q, k, v, sel, backend="triton")
                    record(ctx, f"salad_sparse_{tag}", "rel_l2_vs_torch",
                           ((out.float() - ref.float()).norm() / ref.float().norm()).item())
                    del ref, out

                # FlexAttention on exactly this mask (permutation done outside the timing).
                try:
                    if args.no_flex:
                        raise RuntimeError("skipped (--no-flex)")
                    bm = block_mask_from_selection(sel)
                    qw, kw, vw = (to_working_order(t, sel.token_order).contiguous() for t in (qc, kc, vc))
                    flex_ms = time_ms(lambda: flex_call(qw, kw, vw, bm, d**-0.5, BLOCK), reps)
                    record(ctx, f"flex_{tag}", "ms", flex_ms, sparsity=round(meas, 2))
                    del qw, kw, vw, bm
                except Exception as exc:  # report, keep benchmarking
                    print(f"# flex failed for {tag}: {type(exc).__name__}: {exc}", flush=True)
                    flex_ms = None

                def sparse():
                    return kernels.block_sparse_attention(q, k, v, sel, backend="triton")

                sp_ms = time_ms(sparse, reps)
                extra = {"sparsity": round(meas, 2), "kernel": bsa_triton.sparse_forward_kernel(q, k, v, sel)}
                if flex_ms:
                    extra["vs_flex"] = round(sp_ms / flex_ms, 3)
                record(ctx, f"salad_sparse_{tag}", "ms", sp_ms, **extra)
                record(ctx, f"salad_sparse_{tag}", "ms_synced", time_ms(sparse, reps, synced=True))
                record(ctx, f"salad_sparse_{tag}", "extra_mem_x_q", peak_extra_bytes(sparse) / q_bytes)
                if extra["kernel"] == "gluon":  # the Triton kernel on the same inputs, same run
                    bsa_triton.USE_GLUON = False
                    try:
                        record(ctx, f"salad_sparse_{tag}_triton_kernel", "ms", time_ms(sparse, reps),
                               sparsity=round(meas, 2), kernel="triton")
                    finally:
                        bsa_triton.USE_GLUON = True
                if mode == "stswa":
                    bsa_triton.ORDER_MODE = "permute"
                    record(ctx, f"salad_sparse_{tag}_permute", "ms", time_ms(sparse, reps), sparsity=round(meas, 2))
                    record(ctx, f"salad_sparse_{tag}_permute", "extra_mem_x_q", peak_extra_bytes(sparse) / q_bytes)
                    bsa_triton.ORDER_MODE = "gather"

                def full(mode=mode, sel=sel, topk=topk):
                    s, state = sel, None
                    if mode != "stswa":  # as SaladSelfAttention: one pass for the state and the pooling
                        *state, qp, kpt = kernels.linear_state_pooled(q, k, v, BLOCK, backend="triton")
                        s = kernels.select_topk_pooled(qp, kpt, BLOCK, topk, n, backend="triton",
                                                       query_group=sel.query_group)
                    gate = torch.sigmoid(F.linear(x, w_gate, b_gate).float()).mean(dim=(1, 2)) * lam_s  # [B]
                    out = kernels.salad_attention(q, k, v, s, w_proj, b_proj, linear_scale=gate, backend="triton",
                                                  linear_state=state)
                    return out.transpose(1, 2).reshape(b, n, c)  # free: out keeps Wan's layout

                def full_unfused(mode=mode, sel=sel, topk=topk):
                    s = sel if mode == "stswa" else kernels.select_topk_blocks(
                        q, k, BLOCK, topk, backend="triton", query_group=sel.query_group)
                    gate = torch.sigmoid(F.linear(x, w_gate, b_gate).float()).mean(dim=(1, 2)) * lam_s
                    out, _ = kernels.block_sparse_attention(q, k, v, s, backend="triton")
                    out_l = kernels.linear_attention(q, k, v, backend="triton")
                    o = out.transpose(1, 2).reshape(b, n, c)
                    p = F.linear(out_l.transpose(1, 2).reshape(b, n, c), w_proj, b_proj)
                    return o + gate.to(dtype).view(b, 1, 1) * p

                full_ms = time_ms(full, reps)
                record(ctx, f"salad_full_{tag}", "ms_synced", time_ms(full, reps, synced=True))
                record(ctx, f"salad_full_{tag}", "ms", full_ms, sparsity=round(meas, 2))
                record(ctx, f"salad_full_{tag}", "extra_mem_x_q", peak_extra_bytes(full) / q_bytes)
                record(ctx, f"salad_full_{tag}_unfused", "ms", time_ms(full_unfused, reps), sparsity=round(meas, 2))
                if mode != "stswa":
                    record(ctx, f"select_{tag}", "ms", time_ms(lambda topk=topk, g=sel.query_group: kernels.select_topk_blocks(
                        q, k, BLOCK, topk, backend="triton", query_group=g), reps))
                if sparsity == 90 and mode == "topk":
                    record(ctx, "linear_only", "ms", time_ms(lambda: kernels.linear_attention(q, k, v, backend="triton"), reps))
                    grad_lin = torch.randn_like(q)
                    for case, step in (("linear_bwd", linear_bwd), ("linear_bwd_recompute", linear_bwd_recompute)):
                        record(ctx, case, "ms", time_ms(lambda step=step: step(q, k, v, grad_lin), reps))
                    del grad_lin
                    record(ctx, "proj_gemm", "ms", time_ms(lambda: F.linear(x, w_proj, b_proj), reps))
                if args.profile and sparsity == 90 and name == "wan1.3b_480p81":
                    profile(full, f"{name}_{tag}", args)
                if args.sweep and sparsity == 90 and name == "wan1.3b_480p81":
                    sweep(sparse, ctx, tag, reps)
            except Exception as exc:  # one broken case must not lose the rest
                import traceback

                print(f"# FAILED {name} {tag}: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                bsa_triton.ORDER_MODE = "gather"
    del q, k, v, x, qc, kc, vc
    torch.cuda.empty_cache()


def sweep(fn, ctx, tag, reps):
    warps0, stages0 = dict(bsa_triton.NUM_WARPS), bsa_triton.NUM_STAGES
    for warps in (4, 8):
        for stages in (2, 3, 4):
            bsa_triton.NUM_WARPS[BLOCK] = warps
            bsa_triton.NUM_STAGES = stages
            try:
                record(ctx, f"sweep_sparse_{tag}_w{warps}s{stages}", "ms", time_ms(fn, reps))
            except Exception as exc:
                print(f"# sweep w{warps}s{stages} failed: {exc}", flush=True)
    bsa_triton.NUM_WARPS.clear()
    bsa_triton.NUM_WARPS.update(warps0)
    bsa_triton.NUM_STAGES = stages0


def profile(fn, label, args):
    from torch.profiler import ProfilerActivity, profile as tprofile

    fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    path = Path(args.out) / f"attention-profile-{label}.txt"
    path.write_text(table)
    print(table, flush=True)


def write_outputs(args, device_tag):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_tag = device_tag + args.tag
    (out / f"attention-{device_tag}.json").write_text(json.dumps(RECORDS, indent=1) + "\n")
    lines = [
        f"# attention benchmark — {RECORDS[0]['device']} — commit {short_commit(RECORDS[0]['commit'])} — {RECORDS[0]['date']}",
        "",
        "Median of >= 50 calls queued back to back, each between CUDA events; bf16; B=1, D=128, block 64. speedup = dense_cudnn ms / case ms (same run). sparse kernel: gluon (Hopper) or triton; *_triton_kernel rows time the Triton kernel on the same inputs.",
        "",
        "| shape | case | ms | speedup | sparsity % | vs flex | sparse kernel |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in RECORDS:
        if r["metric"] != "ms":
            continue
        lines.append(
            f"| {r['shape']} | {r['case']} | {r['value']:.3f} | {r.get('speedup', '')} | "
            f"{r.get('sparsity', '')} | {r.get('vs_flex', '')} | {r.get('kernel', '')} |"
        )
    lines += ["", "| shape | case | metric | value |", "| --- | --- | --- | ---: |"]
    for r in RECORDS:
        if r["metric"] != "ms":
            lines.append(f"| {r['shape']} | {r['case']} | {r['metric']} | {r['value']:.4g} |")
    (out / f"attention-{device_tag}.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sparsities", default="90,95", type=lambda t: [int(x) for x in t.split(",")])
    ap.add_argument("--modes", default="topk,topk_q128,stswa", type=lambda t: t.split(","))
    ap.add_argument("--tag", default="", help="suffix for the result file stem, e.g. -run3")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    device_tag = "h100" if "H100" in name else ("h200" if "H200" in name else name.split()[-1].lower())
    ctx = {"device": name, "commit": git_sha(), "date": datetime.date.today().isoformat()}
    torch.backends.cuda.matmul.allow_tf32 = False
    for shape in args.shapes.split(","):
        run_shape(shape, args, ctx)
        write_outputs(args, device_tag)
    print(f"# wrote {args.out}/attention-{device_tag}.json/.md", flush=True)


if __name__ == "__main__":
    main()
