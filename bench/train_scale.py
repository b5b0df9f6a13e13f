"""Multi-GPU training scaling benchmark (issues 8 item 6 and 9): steps/s, peak memory per GPU,
scaling efficiency and the projected cost of the paper's recipe (1600 steps x global batch 8)
for SALAD training of a Wan2.1-shaped model (random weights, real key names) under torchrun.

One process per GPU; each rank builds the model on its own GPU from ``wan_state_dict`` (the same
ComfyUI WanModel + load_state_dict path as bench/train.py), wraps it in SaladTrainModel and runs
the real ``Trainer.train_step`` (DDP when world > 1, FSDP2 with ``--fsdp``; the default for 14B)
on synthetic cached latents/contexts: micro-batch 1 per rank, gradient accumulation up to the
global batch. Warm-up, then CUDA-synchronised timed steps. Rank 0 merges its records into
``<out>/train-scale-<device>.json`` (+ ``.md``), design.md section 7; scaling efficiency is
computed against the smallest-world record of the same model/shape/mode already in that file
(normally the 1-GPU run of the same script invocation, bench/train_scale_gpu.sh).

    torchrun --nproc-per-node 4 bench/train_scale.py --model 1.3b --frames 77 --out $OUT
    torchrun --nproc-per-node 2 bench/train_scale.py --cpu --out /tmp/x      # gloo, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE_STEPS = 1600
PAPER_GPU_H = 20.6  # SALAD paper: Wan2.1-1.3B, 1600 steps x batch 8 at 480x832x77
BENCH = "train_scale"


def setup_comfy(cpu: bool) -> None:
    root = os.environ.get("COMFYUI_PATH") or next(
        (str(p) for p in (ROOT / ".comfy-carry" / "ComfyUI", ROOT / ".comfy" / "ComfyUI") if (p / "comfy").is_dir()),
        None)
    if root is None:
        raise SystemExit("Expected ComfyUI at $COMFYUI_PATH, .comfy-carry/ComfyUI or .comfy/ComfyUI, got none.")
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    args.highvram = not cpu


def init_dist(cpu: bool) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if cpu:
            torch.distributed.init_process_group("gloo")
        else:
            from salad_core.train.trainer import init_distributed

            init_distributed()  # nccl, torch.cuda.set_device(LOCAL_RANK)
    elif not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from salad_core.train.trainer import dist_info

    return dist_info()


def shape_for(model: str):
    from salad_core.tiny_wan import WanShape

    return {"tiny": WanShape.tiny, "1.3b": WanShape.wan_1_3b, "14b": WanShape.wan_14b}[model]()


def build_model(a, device, dtype):
    """ComfyUI WanModel with random weights under the real Wan2.1 key names, wrapped for SALAD."""
    import comfy.ldm.wan.model
    import comfy.ops

    from salad_core.config import SaladConfig
    from salad_core.tiny_wan import wan_state_dict
    from salad_core.train.model import SaladTrainModel

    s = shape_for(a.model)
    dm = comfy.ldm.wan.model.WanModel(
        model_type="t2v", dim=s.dim, ffn_dim=s.ffn_dim, num_heads=s.num_heads, num_layers=s.num_layers,
        in_dim=16, out_dim=16, device=device, dtype=dtype, operations=comfy.ops.disable_weight_init)
    sd = wan_state_dict(s, seed=0, dtype=dtype, device=device)
    dm.load_state_dict(sd)
    del sd
    torch.manual_seed(a.seed)  # LoRA A init: identical on every rank (FSDP2 does not broadcast)
    cfg = SaladConfig(sparse_mode=a.mode, sparsity=a.sparsity, block_size=a.block_size, backend=a.backend)
    return SaladTrainModel(dm, cfg, a.lora_rank, True, True)


class SyntheticCached:
    """Stands in for CachedDataset: dict(latent [16, T', H/8, W/8], context [L, 4096]) fp32 on CPU."""

    def __init__(self, n, latent_shape, text_len=512, seed=0):
        self.n, self.latent_shape, self.text_len, self.seed = n, latent_shape, text_len, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        return {"latent": torch.randn(self.latent_shape, generator=g),
                "context": torch.randn(self.text_len, 4096, generator=g) * 0.1}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def reduce_max(values, dev):
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def gather_floats(value, world, dev):
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    if world == 1:
        return [float(value)]
    out = [torch.zeros_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t)
    return [float(x) for x in out]


def peak_gib(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        sha = ""
    return sha or os.environ.get("GIT_SHA", "")


def device_tag(name: str) -> str:
    return "h100" if "H100" in name else "h200" if "H200" in name else "cpu" if name == "cpu" else name.split()[-1].lower()


def shape_name(a) -> str:
    return f"wan{a.model}_{a.height}p{a.frames}" if a.model != "tiny" else f"tiny_{a.height}p{a.frames}"


def case_name(a, mode: str, world: int) -> str:
    return f"salad_full_{a.mode}_{round(a.sparsity * 100)}_{mode}{world}"


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Replace records of the same (case, shape, device, metric), keep the rest."""
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {(r["case"], r["shape"], r["device"], r["metric"]) for r in new}
    return [r for r in old if (r["case"], r["shape"], r["device"], r["metric"]) not in keys] + new


def find_baseline(records, a, mode, device, world):
    """The s_per_step record of the smallest world size < ``world`` for the same shape/mode/device."""
    prefix = case_name(a, mode, 0)[:-1]
    best = None
    for r in records:
        if (r.get("bench") == BENCH and r["metric"] == "s_per_step" and r["shape"] == shape_name(a)
                and r["device"] == device and r["case"].startswith(prefix) and r["case"][len(prefix):].isdigit()):
            n = int(r["case"][len(prefix):])
            if n < world and (best is None or n < best[0]):
                best = (n, r)
    return best


def write_md(records, path: Path, device: str) -> None:
    lines = [f"# Training scaling benchmark ({device})", "",
             "Random Wan2.1-shaped weights (real key names, ComfyUI WanModel), SALAD full (sparse + linear branch + "
             "LoRA r=256), bf16 autocast, per-block checkpointing, flow-matching loss on synthetic cached latents; "
             "micro-batch 1 per rank, gradient accumulation to the global batch; `ddpN` = torchrun DDP on N GPUs, "
             "`fsdpN` = FSDP2. `peak_gib` = max over ranks of torch.cuda.max_memory_allocated. "
             f"`recipe_gpu_h` = s/step x {RECIPE_STEPS} x N / 3600; `recipe_wall_h` = s/step x {RECIPE_STEPS} / 3600 "
             f"(paper: {PAPER_GPU_H} GPU-h for Wan2.1-1.3B). `scaling_eff` = (baseline s/step / this s/step) / "
             "(N / baseline N).", ""]
    from bench.train import metric_table

    path.write_text("\n".join(lines + metric_table(records)) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, choices=["1.3b", "14b", "tiny"], help="default 1.3b (tiny with --cpu)")
    ap.add_argument("--frames", type=int, default=None, help="video frames (default 77; 5 with --cpu)")
    ap.add_argument("--height", type=int, default=None, help="default 480 (64 with --cpu)")
    ap.add_argument("--width", type=int, default=None, help="default 832 (64 with --cpu)")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps, >= 1 (see --warmup-full)")
    ap.add_argument("--warmup-full", action="store_true",
                    help="warm up with full global-batch steps; default: one micro-batch per rank (compiles, "
                         "allocates, creates Adam state and DDP buckets at 1/accum of the cost)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (at most; see --budget-s)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="time budget for this launch: fewer timed steps (>= 1) if the warm-up says they won't fit")
    ap.add_argument("--fsdp", action="store_true", default=None, help="FSDP2 (default for 14B)")
    ap.add_argument("--mode", default="topk", choices=["topk", "stswa"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--lora-rank", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=None, help="default 64 (16 with --cpu)")
    ap.add_argument("--backend", default=None, help="default auto (torch with --cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="frozen weights + autocast: auto = bf16 on CUDA, fp32 with --cpu")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU, tiny model (tests)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--run-dir", default=None, help="Trainer out folder (nothing is written there; default a temp dir)")
    a = ap.parse_args(argv)
    cpu = a.cpu
    a.model = a.model or ("tiny" if cpu else "1.3b")
    a.frames = a.frames or (5 if cpu else 77)
    a.height = a.height or (64 if cpu else 480)
    a.width = a.width or (64 if cpu else 832)
    a.block_size = a.block_size or (16 if cpu else 64)
    a.backend = a.backend or ("torch" if cpu else "auto")
    a.fsdp = (a.model == "14b") if a.fsdp is None else a.fsdp
    if cpu:
        torch.set_num_threads(max(1, int(os.environ.get("SALAD_SCALE_THREADS", "1"))))
    t_launch = time.time()
    setup_comfy(cpu)
    rank, world, local = init_dist(cpu)
    dev = torch.device("cpu") if cpu else torch.device("cuda", local)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype if a.dtype != "auto" else ("fp32" if cpu else "bf16")]
    mode = "fsdp" if a.fsdp else "ddp"
    device_name = "cpu" if cpu else torch.cuda.get_device_name(dev)
    tag = device_tag(device_name)

    from salad_core.train.trainer import Trainer, TrainConfig, close_distributed

    model = build_model(a, dev, dtype)
    latent = (16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)
    cfg = TrainConfig(out=a.run_dir or os.path.join(tempfile.gettempdir(), "salad-train-scale-run"), objective="flow", steps=10**9,
                      global_batch=a.global_batch, micro_batch=a.micro_batch, lora_rank=a.lora_rank,
                      sparse_mode=a.mode, sparsity=a.sparsity, block_size=a.block_size, backend=a.backend,
                      frames=a.frames, height=a.height, width=a.width, shift=5.0, seed=a.seed,
                      autocast="bf16" if dtype == torch.bfloat16 else "none", fsdp=a.fsdp, save_every=0, export_every=0)
    trainer = Trainer(cfg, model=model, dataset=SyntheticCached(max(a.global_batch, 8), latent, seed=a.seed),
                      device=dev)
    t_built = time.time()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    # -- warm-up --------------------------------------------------------------------------------
    full_batch = cfg.global_batch
    if not a.warmup_full:
        cfg.global_batch = world * cfg.micro_batch  # one micro-batch per rank
    warm = []
    loss = 0.0
    for _ in range(max(1, a.warmup)):
        sync(dev)
        t0 = time.perf_counter()
        loss = trainer.train_step()
        sync(dev)
        warm.append(time.perf_counter() - t0)
    warm_s = min(warm)  # the first includes compilation
    cfg.global_batch = full_batch
    accum = full_batch // (world * cfg.micro_batch)
    est = warm_s * (1 if a.warmup_full else accum)
    steps = a.steps
    if a.budget_s > 0:
        left = a.budget_s - (time.time() - t_launch) - 10
        steps = max(1, min(a.steps, int(left // max(est, 1e-9))))
    steps = int(reduce_max([steps], dev)[0]) if world > 1 else steps  # same count on every rank
    if rank == 0:
        print(f"[train_scale] world {world} {mode} {shape_name(a)}: build {t_built - t_launch:.1f}s, warm-up "
              f"{'/'.join(f'{w:.1f}' for w in warm)}s/step ({'full' if a.warmup_full else 'one micro-batch per rank'}), accum {accum}, "
              f"timing {steps} step(s)", flush=True)

    # -- timed ----------------------------------------------------------------------------------
    sync(dev)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step())
    sync(dev)
    s_per_step = (time.perf_counter() - t0) / steps
    s_per_step = reduce_max([s_per_step], dev)[0]
    peaks = gather_floats(peak_gib(dev), world, dev)
    if not all(math.isfinite(x) for x in losses + [loss]):
        raise FloatingPointError(f"Expected finite losses, got {losses}")

    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"train-scale-{tag}.json"
        existing = json.loads(path.read_text()) if path.is_file() else []
        case = case_name(a, mode, world)
        common = {"bench": BENCH, "case": case, "shape": shape_name(a), "device": device_name,
                  "commit": git_sha(), "date": datetime.date.today().isoformat()}
        extra = {"world": world, "mode": mode, "global_batch": full_batch, "micro_batch": cfg.micro_batch,
                 "grad_accum": accum, "timed_steps": steps, "warmup_steps": len(warm),
                 "warmup_kind": "full" if a.warmup_full else "micro", "warmup_s": [round(w, 3) for w in warm],
                 "lora_rank": a.lora_rank, "tokens": latent[1] * (latent[2] // 2) * (latent[3] // 2),
                 "trainable": sum(p.numel() for p in model.trainable_parameters()),  # DTensor: global numel
                 "loss": losses[-1]}
        if cpu:
            extra["note"] = "CPU gloo dry run (tiny model); peak_gib is max RSS"
        records = []

        def rec(metric, value, baseline=None, speedup=None, **more):
            records.append({**common, "metric": metric, "value": value,
                            "baseline_case": baseline, "speedup": speedup, **extra, **more})

        base = find_baseline(existing, a, mode, device_name, world)
        b_case = base[1]["case"] if base else None
        speedup = base[1]["value"] / s_per_step if base else None
        rec("s_per_step", s_per_step, b_case, speedup)
        rec("steps_s", 1.0 / s_per_step, b_case, speedup)
        rec("s_per_sample", s_per_step / full_batch)
        rec("peak_gib", max(peaks), per_rank=[round(p, 3) for p in peaks])
        rec("recipe_wall_h", s_per_step * RECIPE_STEPS / 3600, b_case, speedup)
        rec("recipe_gpu_h", s_per_step * RECIPE_STEPS * world / 3600, paper_gpu_h=PAPER_GPU_H)
        if base:
            rec("scaling_eff", speedup * base[0] / world, b_case, speedup, baseline_world=base[0])
        merged = merge_records(path, records)
        path.write_text(json.dumps(merged, indent=1))
        write_md(merged, out / f"train-scale-{tag}.md", device_name)
        for r in records:
            sp = f"  ({r['speedup']:.3f}x {r['baseline_case']})" if r.get("speedup") else ""
            print(f"[train_scale] {r['case']} {r['shape']} {r['metric']} = {r['value']:.4g}{sp}", flush=True)
        print(f"[train_scale] wrote {path}", flush=True)
    del trainer, model
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
