"""Training-side attention benchmark (issue 8): forward + backward of the sparse branch at the
shape SALAD trains on, against dense cuDNN attention, in one run.

    python bench/attention_bwd.py [--out bench/results] [--frames 77] [--sweep] [--flex]

Shape: Wan2.1-1.3B at 480x832 (H 12, D 128, bf16), ``--frames`` video frames (77 = the paper's
recipe: 20 latent frames x 30 x 52 = 31,200 tokens), Top-K at ``--sparsity`` with block 64 from
random q/k (selection not timed). Cases (median ms of CUDA-event-timed calls after warm-up):
dense_cudnn_fwd / _fwdbwd, salad_sparse_fwd / _fwdbwd (the Triton forward + the Triton
backward of kernels/block_sparse_attn/triton_bwd.py through autograd), salad_sparse_bwd_only
(the backward kernels alone, from saved out/LSE), optionally flex_fwdbwd (FlexAttention, same
block mask, compiled). ``--sweep`` also times the backward alone for each launch setting
(warps x stages per kernel) and prints the best. Writes attention-bwd-<device>.json (+ .md).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench.attention import git_sha, time_ms  # noqa: E402
from bench.provenance import short_commit  # noqa: E402
from kernels.block_sparse_attn import triton_bwd  # noqa: E402

BLOCK = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--frames", type=int, default=77)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    name = torch.cuda.get_device_name()
    tag = a.tag or ("h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower())
    b, h, d = 1, 12, 128
    n = ((a.frames - 1) // 4 + 1) * 30 * 52
    shape = f"wan1.3b_480p{a.frames}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Wan layout: [B, N, H, D] storage, the ops see [B, H, N, D] views (as in training).
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
               for _ in range(3))
    nb = kernels.num_blocks(n, BLOCK)
    topk = max(1, round(nb * (1 - a.sparsity)))
    sel = kernels.select_topk_blocks(q, k, BLOCK, topk)
    grad = torch.randn_like(q)
    records = []
    base = {"bench": "attention_bwd", "shape": shape, "device": name, "commit": git_sha(),
            "date": datetime.date.today().isoformat(), "tokens": n, "topk": topk, "n_blocks": nb}

    def rec(case, value, baseline=None, **extra):
        r = {**base, "case": case, "metric": "ms", "value": round(value, 4), **extra}
        if baseline:
            r.update(baseline_case=baseline, speedup=round(by_case[baseline] / value, 3))
        records.append(r)
        by_case[case] = value
        print(json.dumps(r), flush=True)

    by_case: dict[str, float] = {}
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense_fwd():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qc, kc, vc)

    def dense_fwdbwd():
        dense_fwd().backward(grad)

    def salad_fwd():
        return kernels.block_sparse_attention(*leaves, sel)[0]

    def salad_fwdbwd():
        salad_fwd().backward(grad)

    with torch.no_grad():
        out, lse = kernels.block_sparse_attention(q, k, v, sel)

    def bwd_only():
        return triton_bwd.block_sparse_attention_backward_triton(grad, q, k, v, out, lse, sel)

    rec("dense_cudnn_fwd", time_ms(dense_fwd, a.reps))
    rec("dense_cudnn_fwdbwd", time_ms(dense_fwdbwd, a.reps))
    rec("salad_sparse_fwd", time_ms(salad_fwd, a.reps), "dense_cudnn_fwd")
    rec("salad_sparse_fwdbwd", time_ms(salad_fwdbwd, a.reps), "dense_cudnn_fwdbwd")
    rec("salad_sparse_bwd_only", time_ms(bwd_only, a.reps),
        config=dict(dkdv=(triton_bwd.NUM_WARPS_DKDV[d], triton_bwd.NUM_STAGES_DKDV),
                    dq=(triton_bwd.NUM_WARPS_DQ[d], triton_bwd.NUM_STAGES_DQ)))
    if a.sweep:
        sweep(bwd_only, rec, d, a.reps)
    if a.flex:
        flex_case(q, k, v, sel, grad, rec, a.reps)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"attention-bwd-{tag}.json").write_text(json.dumps(records, indent=1) + "\n")
    lines = [f"# Sparse-branch forward + backward ({name}, commit {short_commit(base['commit'])})", "",
             f"{shape}: B 1, H 12, N {n}, D 128, bf16, Top-K {topk}/{nb} blocks of 64 "
             f"({100 * (1 - topk / nb):.1f}% sparse). Median of {a.reps} CUDA-event-timed calls.", "",
             "| case | ms | vs baseline |", "|---|---:|---|"]
    for r in records:
        sp = f"{r['speedup']:.2f}x {r['baseline_case']}" if r.get("speedup") else ""
        lines.append(f"| {r['case']} | {r['value']:.3f} | {sp} |")
    (out_dir / f"attention-bwd-{tag}.md").write_text("\n".join(lines) + "\n")


def flex_case(q, k, v, sel, grad, rec, reps):
    """FlexAttention fwd + its compiled bwd on the same block mask, as kernels/autograd.py's
    flex backward runs it. A failure to lower is reported, not fatal: it is a finding."""
    from kernels.autograd import flex_sparse_attention

    fq, fk, fv = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    g = grad.contiguous()
    try:
        ms = time_ms(lambda: flex_sparse_attention(fq, fk, fv, sel, fq.shape[-1] ** -0.5).backward(g), reps)
    except Exception as exc:  # Inductor lowering errors come in many types
        print(f"# flex_fwdbwd failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        return
    rec("flex_fwdbwd", ms, "dense_cudnn_fwdbwd")


def sweep(fn, rec, d, reps):
    """Backward alone per launch setting; restores the defaults afterwards."""
    saved = (dict(triton_bwd.NUM_WARPS_DKDV), dict(triton_bwd.NUM_WARPS_DQ),
             triton_bwd.NUM_STAGES_DKDV, triton_bwd.NUM_STAGES_DQ)
    results = {}
    try:
        for wk, sk, wq, sq in itertools.product((4, 8), (1, 2, 3), (4, 8), (2, 3, 4)):
            triton_bwd.NUM_WARPS_DKDV[d], triton_bwd.NUM_STAGES_DKDV = wk, sk
            triton_bwd.NUM_WARPS_DQ[d], triton_bwd.NUM_STAGES_DQ = wq, sq
            try:
                ms = time_ms(fn, max(5, reps // 2), warmup=2)
            except Exception as exc:  # e.g. out of shared memory for a setting: skip it
                print(f"# sweep dkdv w{wk}s{sk} dq w{wq}s{sq} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            results[(wk, sk, wq, sq)] = ms
            rec(f"sweep_bwd_dkdv_w{wk}s{sk}_dq_w{wq}s{sq}", ms)
    finally:
        (triton_bwd.NUM_WARPS_DKDV, triton_bwd.NUM_WARPS_DQ,
         triton_bwd.NUM_STAGES_DKDV, triton_bwd.NUM_STAGES_DQ) = saved
    if results:
        best = min(results, key=results.get)
        print(f"# best backward setting: dkdv w{best[0]}s{best[1]}, dq w{best[2]}s{best[3]}: "
              f"{results[best]:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
