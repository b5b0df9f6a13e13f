"""Training benchmark (issue 8): fwd+bwd speed / peak memory of SALAD training vs dense-LoRA at
the Wan2.1-1.3B shape (random weights), the projected cost of the paper's recipe
(1600 steps x batch 8 at 480x832x77), and a short distillation run: held-out error of the
SALAD student vs the dense model, against LoRA-only (equal trainable parameters) and the
sparse-only start. Writes bench/results/train-<device>.json (+ .md), design.md section 7.

    COMFYUI_PATH=.comfy-carry/ComfyUI python bench/train.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE_SAMPLES = 1600 * 8
DEV = os.environ.get("BENCH_DEVICE", "cuda")  # BENCH_DEVICE=cpu BENCH_TINY=1: a CPU dry run
TINY = os.environ.get("BENCH_TINY") == "1"


def setup_comfy():
    root = os.environ.get("COMFYUI_PATH", str(ROOT / ".comfy-carry" / "ComfyUI"))
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    if DEV == "cpu":
        from comfy.cli_args import args

        args.cpu = True


def build_wan(dtype=torch.bfloat16, seed=0):
    import comfy.ldm.wan.model
    import comfy.ops

    from salad_core.tiny_wan import WanShape, wan_state_dict

    s = WanShape.tiny() if TINY else WanShape.wan_1_3b()
    dm = comfy.ldm.wan.model.WanModel(
        model_type="t2v", dim=s.dim, ffn_dim=s.ffn_dim, num_heads=s.num_heads, num_layers=s.num_layers,
        in_dim=16, out_dim=16, device=DEV, dtype=dtype, operations=comfy.ops.disable_weight_init)
    dm.load_state_dict(wan_state_dict(s, seed=seed, dtype=dtype, device=DEV))
    return dm


def dense_lora_model(rank):
    """Stock dense attention, LoRA on q/k/v/o, per-block checkpointing (the reference setup)."""
    from salad_core.train.lora import LoRALinear
    from salad_core.train.model import checkpoint_block

    dm = build_wan(torch.bfloat16 if DEV == "cuda" else torch.float32)
    dm.requires_grad_(False)
    for b in dm.blocks:
        for t in "qkvo":
            setattr(b.self_attn, t, LoRALinear(getattr(b.self_attn, t), rank))
        checkpoint_block(b)

    def fwd(x, sigma, ctx):
        dt = dm.blocks[0].self_attn.o.base.weight.dtype
        return dm(x.to(dt), sigma * 1000, ctx.to(dt)).float()

    return fwd, [p for p in dm.parameters() if p.requires_grad], dm


def salad_model(rank, linear_branch, sparsity=0.9):
    from salad_core.config import SaladConfig
    from salad_core.train.model import SaladTrainModel

    m = SaladTrainModel(build_wan(torch.bfloat16 if DEV == "cuda" else torch.float32),
                        SaladConfig(sparsity=sparsity, block_size=16 if TINY else 64), rank, linear_branch)
    return m, m.trainable_parameters()


def inputs(frames, h, w, batch=1, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    t = (frames - 1) // 4 + 1
    x = torch.randn(batch, 16, t, h // 8, w // 8, device=DEV, generator=g)
    ctx = torch.randn(batch, 512, 4096, device=DEV, generator=g)
    sigma = torch.rand(batch, device=DEV, generator=g) * 0.8 + 0.1
    return x, sigma, ctx


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fwd, params, x, sigma, ctx, iters=2, warmup=1, opt=None):
    opt = opt or torch.optim.AdamW(params, lr=1e-4)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            loss = fwd(x, sigma, ctx).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    return (time.perf_counter() - t0) / iters / x.shape[0], peak


def rel_err(student, teacher, held):
    num = den = 0.0
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
        for x, s, c in held:
            t, v = teacher(x, s, c), student(x, s, c)
            num += float((v - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return (num / den) ** 0.5


def distill_run(rank, linear_branch, steps, lr, shape, held_n=4):
    from salad_core.train.losses import distillation_loss, noise_batch

    m, params = salad_model(rank, linear_branch)
    teacher = lambda x, s, c: m(x, s, c, dense=True)  # noqa: E731
    opt = torch.optim.AdamW(params, lr=lr)
    lat = (16, (shape[0] - 1) // 4 + 1, shape[1] // 8, shape[2] // 8)
    g = torch.Generator(device=DEV).manual_seed(123)
    held = []
    for i in range(held_n):
        noise, sigma = noise_batch(lat, [10_000 + i], seed=1, shift=5.0, device=DEV)
        ctx = torch.randn(1, 512, 4096, device=DEV, generator=g)
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            from salad_core.train.losses import teacher_input

            held.append((teacher_input(teacher, None, ctx, noise, sigma), sigma, ctx))
    start = rel_err(m, teacher, held)
    t0 = time.perf_counter()
    for step in range(steps):
        noise, sigma = noise_batch(lat, [step], seed=0, shift=5.0, device=DEV)
        ctx = torch.randn(1, 512, 4096, device=DEV, generator=torch.Generator(device=DEV).manual_seed(step))
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            loss = distillation_loss(m, teacher, None, ctx, noise, sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync()
    end = rel_err(m, teacher, held)
    n = sum(p.numel() for p in params)
    del m, opt
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return start, end, (time.perf_counter() - t0) / steps, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--frames", type=int, nargs="+", default=[77, 21])
    ap.add_argument("--distill-steps", type=int, default=60, help="0 skips the distillation runs")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--deadline-s", type=float, default=200)
    ap.add_argument("--cases", default="salad_full_topk_90,lora_only_topk_90", help="speed cases besides dense_lora")
    ap.add_argument("--tag", default=None, help="results file tag (default: h100 / h200 / device)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one SALAD fwd+bwd at the first --frames: <out>/train-profile-<tag>.txt")
    a = ap.parse_args()
    setup_comfy()
    t_start = time.time()
    from salad_core.train.model import DEFAULT_LORA_RANK, trainable_param_count

    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    tag = a.tag or ("h100" if "H100" in dev else "h200" if "H200" in dev else dev.split()[-1].lower())
    from kernels.autograd import backward_backend

    # the sparse-branch backward these runs use (kernels/autograd.py): bf16 on CUDA, head dim 128
    head_dim = 128  # Wan2.1 and the tiny test model both use heads of 128
    backward = backward_backend(torch.device(DEV), dtype=torch.bfloat16 if DEV == "cuda" else torch.float32,
                                head_dim=head_dim, value_dim=head_dim, block_size=16 if TINY else 64)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        sha = os.environ.get("GIT_SHA", "")
    sha = sha or os.environ.get("GIT_SHA", "")
    records = []
    if a.profile:
        profile_salad(a.frames[0], DEFAULT_LORA_RANK, out / f"train-profile-{tag}.txt", backward)
        return

    def rec(case, shape, metric, value, baseline_case=None, speedup=None, **extra):
        r = {"bench": "train", "case": case, "shape": shape, "device": dev, "metric": metric, "value": value,
             "baseline_case": baseline_case, "speedup": speedup, "commit": sha,
             "date": datetime.date.today().isoformat(), **extra}
        records.append(r)
        print(json.dumps(r), flush=True)
        (out / f"train-{tag}.json").write_text(json.dumps(records, indent=1))

    r_salad = DEFAULT_LORA_RANK
    branch = trainable_param_count(1536, 30, 0, True)
    r_lora = round((trainable_param_count(1536, 30, r_salad) ) / trainable_param_count(1536, 30, 1, False))
    # -- speed ----------------------------------------------------------------------------------
    for frames in ([5] if TINY else a.frames):
        if time.time() - t_start > a.deadline_s * 0.6:
            print(f"skip {frames} frames: deadline", flush=True)
            break
        shape = f"wan1.3b_480p{frames}"
        x, sigma, ctx = inputs(frames, *((64, 64) if TINY else (480, 832)))
        fwd, params, dm = dense_lora_model(r_salad)
        dense_s, dense_mem = time_fwd_bwd(fwd, params, x, sigma, ctx)
        del fwd, params, dm
        if DEV == "cuda":
            torch.cuda.empty_cache()
        proj = lambda s: s * RECIPE_SAMPLES / 3600  # noqa: E731
        rec("dense_lora", shape, "s_per_sample", dense_s, trainable=trainable_param_count(1536, 30, r_salad, False))
        rec("dense_lora", shape, "peak_gib", dense_mem)
        rec("dense_lora", shape, "recipe_gpu_h", proj(dense_s))
        for case, rank, lb in (("salad_full_topk_90", r_salad, True), ("lora_only_topk_90", r_lora, False)):
            if case not in a.cases.split(",") or case.startswith("lora_only") and time.time() - t_start > a.deadline_s * 0.5:
                continue
            m, params = salad_model(rank, lb)
            s, mem = time_fwd_bwd(m, params, x, sigma, ctx)
            n = sum(p.numel() for p in params)
            del m, params
            if DEV == "cuda":
                torch.cuda.empty_cache()
            rec(case, shape, "s_per_sample", s, "dense_lora", dense_s / s, trainable=n, lora_rank=rank, backward=backward)
            rec(case, shape, "peak_gib", mem)
            rec(case, shape, "recipe_gpu_h", proj(s), "dense_lora", dense_s / s)
    # -- distillation ---------------------------------------------------------------------------
    dshape = (5, 64, 64) if TINY else (17, 240, 416)  # 5 x 15 x 26 = 1950 tokens
    sname = "wan1.3b_240p17"
    for case, rank, lb in (("salad_full_topk_90", r_salad, True), ("lora_only_topk_90", r_lora, False)):
        if a.distill_steps == 0:
            break
        if time.time() - t_start > a.deadline_s:
            print(f"skip distill {case}: deadline", flush=True)
            continue
        start, end, step_s, n = distill_run(rank, lb, a.distill_steps, a.distill_lr, dshape)
        if case.startswith("salad"):
            rec("salad_sparse_topk_90", sname, "distill_rel_l2_start", start, note="sparse-only = step 0")
        rec(case, sname, "distill_rel_l2", end, trainable=n, lora_rank=rank, steps=a.distill_steps,
            lr=a.distill_lr, step_s=step_s, start=start)
    write_md(records, out / f"train-{tag}.md", dev)


def profile_salad(frames, rank, path, backward):
    """torch.profiler over one SALAD fwd+bwd+AdamW step after a warm-up: the kernels by CUDA
    time (self), and the top-level ops grouped with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    x, sigma, ctx = inputs(frames, *((64, 64) if TINY else (480, 832)))
    m, params = salad_model(rank, True)
    opt = torch.optim.AdamW(params, lr=1e-4)  # one optimizer: its state exists before profiling
    time_fwd_bwd(m, params, x, sigma, ctx, iters=1, warmup=1, opt=opt)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        time_fwd_bwd(m, params, x, sigma, ctx, iters=1, warmup=0, opt=opt)
    key = "self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total"
    text = (f"SALAD fwd+bwd+AdamW, {frames} frames, LoRA r={rank}, backward={backward}\n"
            + prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90))
    path.write_text(text)
    print(text, flush=True)


def metric_table(records) -> list[str]:
    """The records as markdown rows (case, shape, metric, value, speed-up vs baseline); also
    used by bench/train_scale.py."""
    lines = ["| case | shape | metric | value | vs baseline |", "|---|---|---|---|---|"]
    for r in records:
        sp = f"{r['speedup']:.2f}x {r['baseline_case']}" if r.get("speedup") else ""
        lines.append(f"| {r['case']} | {r['shape']} | {r['metric']} | {r['value']:.4g} | {sp} |")
    return lines


def write_md(records, path, dev):
    lines = [f"# Training benchmark ({dev})", "",
             "Random Wan2.1-1.3B-shaped weights; bf16 autocast; per-block checkpointing; one sample per step.",
             "`recipe_gpu_h` = s/sample x 1600 x 8 / 3600 (paper Table 6 recipe on one GPU).", ""]
    path.write_text("\n".join(lines + metric_table(records)) + "\n")


if __name__ == "__main__":
    main()
