"""End-to-end benchmark (design.md §7): ComfyUI's own Wan2.1 model, dense vs SALAD, one GPU.

    python bench/e2e.py --model 1.3b [--steps 10] [--warmup 2] [--out DIR] [--compile] [--profile]
    python bench/e2e.py --model tiny --device cpu          # CPU dry run of the whole path
    python bench/e2e.py --plot bench/results/e2e-h100.json # table + PNG from saved records

Full-size Wan2.1 with RANDOM weights and the real key names (salad_core.tiny_wan), built on the
device and loaded through ComfyUI's loader (comfy.sd.load_diffusion_model_state_dict, dtype
bf16), sampled through comfy.sample.sample (KSampler's path; euler/simple, cfg 1 = one forward
per step) at 832x480x81 (1.3B) or 1280x720x81 (14B). Per configuration, in one run: a warm-up
sample, then a timed sample with the same seed, noise and conditioning as the dense run:
mean step time (CUDA events around every diffusion-model call: first start to last end / steps),
peak GPU memory, attention time per step (SALAD: its runtime stats; dense: CUDA events around
ComfyUI's self-attention call in one extra short run), and the final latent's relative L2 error
vs dense. Prints one JSON line per measurement; writes e2e-<device>.json/.md/.png under --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.provenance import git_sha  # noqa: E402

SHAPES = {  # model -> (WanShape preset, shape tag, (frames, height, width) in pixels)
    "1.3b": ("wan_1_3b", "wan1.3b_480p81", (81, 480, 832)),
    "14b": ("wan_14b", "wan14b_720p81", (81, 720, 1280)),
    "tiny": ("tiny", "tiny_64p9", (9, 64, 64)),
}
RECORDS: list[dict] = []


def setup_comfy(cpu: bool):
    root = os.environ.get("COMFYUI_PATH") or next(
        str(p) for p in (REPO / ".comfy-carry" / "ComfyUI", REPO / ".comfy" / "ComfyUI") if (p / "comfy").is_dir()
    )
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    args.highvram = not cpu  # keep the model on the GPU between configurations (--highvram)
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401


def record(ctx, case, metric, value, **extra):
    rec = {"bench": "e2e", "case": case, "shape": ctx["shape"], "device": ctx["device"], "metric": metric,
           "value": round(float(value), 5), "commit": ctx["commit"], "date": ctx["date"]}
    base = ctx.get("dense_step_s", {}).get(ctx.get("compiled", False))
    if metric == "step_s" and base and not case.startswith("dense_comfy"):
        rec["baseline_case"] = "dense_comfy" + ("_compiled" if ctx.get("compiled") else "")
        rec["speedup"] = round(base / value, 3)
    rec.update(extra)
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)


def build_model(model: str, device: str):
    import comfy.sd

    from salad_core.tiny_wan import WanShape, wan_state_dict

    shape = getattr(WanShape, SHAPES[model][0])()
    t0 = time.perf_counter()
    sd = wan_state_dict(shape, seed=0, dtype=torch.bfloat16, device=device)  # on the device, no file
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    del sd
    print(f"# built {model} ({shape.num_params() / 1e9:.2f}B params) in {time.perf_counter() - t0:.1f}s", flush=True)
    return patcher, shape


def random_weights(info, seed=0):
    """SALAD weights with a live linear branch (random Proj and gate) and random gate_means,
    so every part of the module runs; outputs are meaningless, costs are real."""
    from salad_core import fresh_salad_weights

    w = fresh_salad_weights(info)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.02 if (".proj" in k or ".gate" in k) else v)
               for k, v in w.tensors.items()}
    means = tuple(random.Random(seed).uniform(0.3, 0.7) for _ in range(info.num_layers))
    return type(w)(w.meta, tensors, "<random e2e weights>").with_meta(gate_means=means)


class StepTimer:
    """CUDA events around every diffusion-model call (model_function_wrapper), no syncs."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def __call__(self, apply_model, args):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            end.record()
        else:
            start = time.perf_counter()
            out = apply_model(args["input"], args["timestep"], **args["c"])
            end = time.perf_counter()
        self.marks.append((start, end))
        return out

    def mean_step_s(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.marks[0][0].elapsed_time(self.marks[-1][1]) / 1000.0 / len(self.marks)
        return (self.marks[-1][1] - self.marks[0][0]) / len(self.marks)


class DenseAttentionTimer:
    """ComfyUI's optimized_attention_override: CUDA events around self-attention calls."""

    def __init__(self, inner=None):
        self.inner, self.events = inner, []

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options: stay shared
        return self

    def __call__(self, func, q, k, v, *args, **kwargs):
        fn = self.inner or func
        if q.shape[1] != k.shape[1]:  # cross-attention (text keys)
            return fn(q, k, v, *args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v, *args, **kwargs)
        end.record()
        self.events.append((start, end))
        return out

    def ms(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events)


def sage_override():
    """ComfyUI's own attention_sage as a per-model override, or None (with the reason)."""
    try:
        import comfy.ldm.modules.attention as attn
        from sageattention import sageattn

        q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
        sageattn(q, q, q, tensor_layout="HND", is_causal=False)
        attn.sageattn = sageattn
        return lambda func, *a, **kw: attn.attention_sage(*a, **kw), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300]


def sample(patcher, inputs, steps, timer=None):
    import comfy.sample

    m = patcher.clone()
    if timer is not None:
        m.set_model_unet_function_wrapper(timer)
    return comfy.sample.sample(m, inputs["noise"], steps, 1.0, "euler", "simple", inputs["pos"], inputs["neg"],
                               inputs["latent"], denoise=1.0, disable_pbar=True, seed=inputs["seed"])


def profile_step(patcher, inputs, path: Path):
    """One sampling step under torch.profiler: the GPU kernels by total time, to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sample(patcher, inputs, 1)
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30) + "\n")


def configs(args, info):
    """(case, make(base) -> patched ModelPatcher or None to skip, note)."""
    from salad_core import SaladConfig
    from salad_core.patch import apply_salad

    w = random_weights(info)
    block = 64 if args.model != "tiny" else 16
    dense_n = max(1, round(args.steps * 3 / 30))

    def salad(**kw):
        return lambda base: apply_salad(base, SaladConfig(block_size=block, sparsity=0.9, **kw), w)

    out = [
        ("salad_full_topk_90", salad(sparse_mode="topk"), ""),
        ("salad_full_stswa_90", salad(sparse_mode="st_swa"), "uncalibrated windows, heads alternate spatial/temporal"),
        ("salad_full_topk_90_drop20", salad(sparse_mode="topk", gate_drop_percentile=20), "random gate_means"),
        (f"salad_full_topk_90_dense{dense_n}of{args.steps}", salad(sparse_mode="topk", dense_steps=dense_n),
         f"dense_steps {dense_n} of {args.steps} (= 3 of 30)"),
    ]
    if args.device == "cuda" and not args.no_sage and (not args.cases or "dense_sage" in args.cases):
        override, why = sage_override()

        def sage(base):
            m = base.clone()
            m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
            return m

        out.append(("dense_sage", sage if override else None, why or "sageattention 1.0.6 (Triton) via ComfyUI's attention_sage"))
    return out


def compiled(patcher):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = patcher.clone()
    set_torch_compile_wrapper(model=m, backend="inductor")  # what the TorchCompileModel node does
    return m


def run(args, ctx):
    import comfy.model_management as mm
    import comfy.sample

    from salad_core import wan_info
    from salad_core.patch import salad_runtime

    cuda = args.device == "cuda"
    base, shape = build_model(args.model, args.device)
    info = wan_info(base.model.diffusion_model)
    frames, height, width = SHAPES[args.model][2]
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latent = comfy.sample.fix_empty_latent_channels(base, latent)
    cond = torch.randn(1, 512, 4096, generator=g)
    inputs = {"latent": latent, "noise": comfy.sample.prepare_noise(latent, 0), "seed": 0,
              "pos": [[cond, {}]], "neg": [[torch.zeros_like(cond), {}]]}
    tokens = latent.shape[2] * (latent.shape[3] // 2) * (latent.shape[4] // 2)
    print(f"# {ctx['shape']}: latent {tuple(latent.shape)}, {tokens} tokens, {args.steps} steps", flush=True)

    def released() -> int | None:
        """Collected garbage, then (GPU) the bytes allocated with only the base model loaded:
        ComfyUI keeps the last sampled clone patched (a SALAD case's modules and weights) until
        another model loads, so unload it first (--highvram: the base weights stay on the GPU,
        only patches are undone)."""
        if cuda:
            mm.unload_all_models()
        gc.collect()
        if not cuda:
            return None
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()

    def measure(case, patcher, note="", is_dense=False, before=None):
        """before: ``released()``, taken before the case's model was made."""
        t0 = time.perf_counter()
        # Warm-up: model load, Triton / Inductor compile. Compiled runs warm up with the timed
        # schedule's length: ComfyUI passes sample_sigmas into the model, and a new length is a
        # Dynamo guard failure (a recompile inside the timed run).
        sample(patcher, inputs, args.steps if ctx.get("compiled") else args.warmup)
        warm_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(cuda)
        final = sample(patcher, inputs, args.steps, timer)
        step_s = timer.mean_step_s()
        extra = {"note": note} if note else {}
        if is_dense:
            ctx.setdefault("dense_step_s", {})[ctx.get("compiled", False)] = step_s
        record(ctx, case, "step_s", step_s, warmup_s=round(warm_s, 2), steps=args.steps, **extra)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            # resident: what making the case and its warm-up left allocated over the released base
            # model (SALAD: its weights and caches); transient: the timed run's peak above its
            # start. resident + transient - dense's transient is the case's extra memory, with
            # nothing earlier cases left behind (e2e_report).
            record(ctx, case, "peak_gib", peak / 2**30, model_gib=round(ctx["model_gib"], 3),
                   resident_gib=round((start - before) / 2**30, 6), transient_gib=round((peak - start) / 2**30, 6))
        ref = ctx.get("dense_final", {}).get(ctx.get("compiled", False))
        if is_dense and ref is None:
            ctx.setdefault("dense_final", {})[ctx.get("compiled", False)] = final
        elif ref is not None:
            record(ctx, case, "rel_l2", float((final.float() - ref.float()).norm() / ref.float().norm()))
        rt = salad_runtime(patcher)
        if rt is not None:
            s = rt.stats.summary()
            known = [t for t in s.attention_ms if t is not None]
            if known:
                attn_ms = sum(known) / len(known)
                record(ctx, case, "attn_ms_per_step", attn_ms, share=round(attn_ms / 1000 / step_s, 4),
                       sparsity=round(s.sparsity or 0.0, 4), salad_steps=len(s.steps), dense_steps=s.dense_steps)
        if args.profile and cuda and not ctx.get("compiled"):  # after the stats: its step is not in them
            profile_step(patcher, inputs, Path(args.out) / f"e2e-profile-{ctx['shape']}-{case}.txt")
        return step_s

    if cuda:
        mm.load_models_gpu([base])
        ctx["model_gib"] = torch.cuda.memory_allocated() / 2**30
    else:
        ctx["model_gib"] = 0.0
    for flag in ([False, True] if args.compile else [False]):
        ctx["compiled"] = flag
        sfx = "_compiled" if flag else ""
        wrap = compiled if flag else (lambda m: m)
        measure("dense_comfy" + sfx, wrap(base), is_dense=True, before=released())
        if cuda and not flag and args.attn_steps:  # attention share of the dense step: one short extra run with events
            timer = DenseAttentionTimer()
            m = base.clone()
            m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = timer
            st = StepTimer(cuda)
            sample(m, inputs, args.attn_steps, st)
            attn_ms = timer.ms() / args.attn_steps
            record(ctx, "dense_comfy", "attn_ms_per_step", attn_ms, share=round(attn_ms / 1000 / st.mean_step_s(), 4))
        for case, make, note in configs(args, info):
            if flag and case != "salad_full_topk_90" or args.cases and case not in args.cases.split(","):
                continue  # compiled: dense vs the main SALAD configuration only
            if make is None:
                print(f"# {case}: not run ({note})", flush=True)
                record(ctx, case, "not_run", 0, note=note)
                continue
            try:
                before = released()
                patcher = wrap(make(base))
                measure(case + sfx, patcher, note, before=before)
                del patcher
            except Exception as exc:  # one broken case must not lose the rest
                import traceback

                traceback.print_exc()
                record(ctx, case + sfx, "failed", 0, note=f"{type(exc).__name__}: {exc}"[:300])
    ctx.pop("dense_final", None)


def write_outputs(out: Path, tag: str):
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e-{tag}.json"
    path.write_text(json.dumps(RECORDS, indent=1) + "\n")
    from bench.e2e_report import write_report

    write_report(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="1.3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also dense vs SALAD through ComfyUI's torch.compile path")
    ap.add_argument("--no-sage", action="store_true")
    ap.add_argument("--cases", default="", help="comma-separated cases to run besides dense (default: all)")
    ap.add_argument("--attn-steps", type=int, default=2, help="steps of the extra dense run that times attention (0: skip)")
    ap.add_argument("--profile", action="store_true", help="also profile one step per uncompiled case (GPU kernel table)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default=None, help="file tag (default: h100/h200/cpu)")
    ap.add_argument("--plot", default=None, help="only redraw .md/.png from this JSON")
    args = ap.parse_args()
    if args.plot:
        from bench.e2e_report import write_report

        write_report(Path(args.plot))
        return
    setup_comfy(cpu=args.device == "cpu")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tag = args.tag or ("h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower())
    out = Path(args.out)
    prev = out / f"e2e-{tag}.json"
    if prev.exists():  # several models accumulate in one file; this run replaces its own shape
        RECORDS.extend(r for r in json.loads(prev.read_text()) if r["shape"] != SHAPES[args.model][1])
    ctx = {"device": name, "commit": git_sha(), "date": datetime.date.today().isoformat(), "shape": SHAPES[args.model][1]}
    torch.backends.cuda.matmul.allow_tf32 = False
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("# stopped by SIGTERM (timeout): writing what was measured"))
    with torch.inference_mode():
        try:
            run(args, ctx)
        finally:
            write_outputs(out, tag)
    print(f"# wrote {out}/e2e-{tag}.json/.md/.png", flush=True)


if __name__ == "__main__":
    main()
