"""Calibration benchmark (issue 7): wall time of ST-SWA window calibration at the Wan2.1-1.3B
shape (RANDOM weights, salad_core.tiny_wan, built on the device, loaded through ComfyUI), vs
plain dense sampling of the same steps in the same run. Writes calibrate-<device>.json/.md.

    COMFYUI_PATH=.comfy-carry/ComfyUI python bench/calibrate.py --out bench/results
    python bench/calibrate.py --model tiny --cpu --out /tmp/x     # CPU dry run
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# (latent frames, latent h, latent w, tag); 480p: 60 x 104 latent; 21 video frames -> 6 latent frames
SHAPES = {
    "1.3b": [(6, 60, 104, "wan1.3b_480p21"), (21, 60, 104, "wan1.3b_480p81")],
    "tiny": [(5, 16, 16, "tiny_128p17")],
}


def setup_comfy(cpu: bool):
    root = os.environ.get("COMFYUI_PATH") or next(
        str(p) for p in (REPO / ".comfy-carry" / "ComfyUI", REPO / ".comfy" / "ComfyUI") if (p / "comfy").is_dir())
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    args.highvram = not cpu


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip further shapes past this wall time")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=None, help="only these shape tags (default: all of --model)")
    ap.add_argument("--repeat", action="store_true",
                    help="calibrate a second time with the same inputs and record whether the result is identical")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    setup_comfy(a.cpu)
    import comfy.sample
    import comfy.sd

    from salad_core.calibrate import calibrate_windows, collect_window_errors, measured_sparsity
    from salad_core.tiny_wan import WanShape, wan_state_dict

    t_start = time.perf_counter()
    dev = "cpu" if a.cpu else "cuda"
    shape = WanShape.tiny() if a.model == "tiny" else WanShape.wan_1_3b()
    dtype = torch.float32 if a.cpu else torch.bfloat16
    sd = wan_state_dict(shape, seed=0, dtype=dtype, device=dev)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    device_name = torch.cuda.get_device_name() if not a.cpu else "cpu"
    tag = "cpu" if a.cpu else ("h200" if "H200" in device_name else "h100" if "H100" in device_name else "gpu")
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        commit = os.environ.get("GIT_SHA", "unknown")
    date = datetime.date.today().isoformat()
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 512, 4096, generator=g), {}] for _ in range(a.prompts)]
    records = []

    def rec(case, shape_tag, metric, value, **extra):
        r = {"bench": "calibrate", "case": case, "shape": shape_tag, "device": device_name, "metric": metric,
             "value": round(float(value), 4), "commit": commit, "date": date, **extra}
        records.append(r)
        print(json.dumps(r), flush=True)

    os.makedirs(a.out, exist_ok=True)
    for frames, h, w, shape_tag in SHAPES[a.model]:
        if a.shapes and shape_tag not in a.shapes:
            continue
        if time.perf_counter() - t_start > a.budget_s:
            print(f"skip {shape_tag}: past --budget-s", flush=True)
            continue
        latent = {"samples": torch.zeros(1, 16, frames, h, w)}
        tokens = frames * (h // 2) * (w // 2)
        # dense sampling, same steps (first call also warms up)
        for _ in range(2):
            sync(); t0 = time.perf_counter()
            with torch.inference_mode():
                comfy.sample.sample(model, comfy.sample.prepare_noise(latent["samples"], 0), a.steps, 1.0, "euler",
                                    "simple", cond[:1], cond[:1], latent["samples"], disable_pbar=True)
            sync(); dense_s = time.perf_counter() - t0
        rec("dense_comfy", shape_tag, "wall_s", dense_s, steps=a.steps, prompts=1, tokens=tokens)
        if torch.cuda.is_available() and not a.cpu:
            torch.cuda.reset_peak_memory_stats()
        sync(); t0 = time.perf_counter()
        res = calibrate_windows(model, cond, latent, steps=a.steps, delta=2.0)
        sync(); cal_s = time.perf_counter() - t0
        per_prompt = cal_s / a.prompts
        rec("calibrate_stswa", shape_tag, "wall_s", cal_s, steps=a.steps, prompts=a.prompts, tokens=tokens,
            baseline_case="dense_comfy", overhead_x=round(per_prompt / dense_s, 2))
        if torch.cuda.is_available() and not a.cpu:
            rec("calibrate_stswa", shape_tag, "peak_gib", torch.cuda.max_memory_allocated() / 2**30)
        if a.repeat:
            # Same inputs, same seed: windows, radii and per-head RSE must match exactly (issue 7).
            again = calibrate_windows(model, cond, latent, steps=a.steps, delta=2.0)
            same = again == res
            rec("calibrate_stswa", shape_tag, "repeat_identical", float(same),
                max_rse_diff=max(abs(x - y) for ra, rb in zip(res.rse, again.rse) for x, y in zip(ra, rb)))
        sp = measured_sparsity(res)
        rec("calibrate_stswa", shape_tag, "sparsity", sum(sp) / len(sp), delta=2.0,
            note="random weights: windows not meaningful")
        # Held-out check: other conditioning and noise, same windows; every head must stay <= delta.
        held_cond = [[torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(99)), {}]]
        held = collect_window_errors(model, held_cond, latent, steps=a.steps, seed=7)
        kinds = {"spatial": 0, "temporal": 1}
        worst = max(
            float(held.rse_max[layer, head, kinds[w.kind], held.radii.index(w.window // held.block_size)])
            for layer, row in enumerate(res.windows) for head, w in enumerate(row)
        )
        rec("calibrate_stswa", shape_tag, "heldout_max_rse", worst, delta=2.0, within_bound=worst <= 2.0)
        stem = Path(a.out) / f"calibrate-{tag}"
        stem.with_suffix(".json").write_text(json.dumps(records, indent=1))
        lines = ["| case | shape | metric | value | notes |", "|---|---|---|---|---|"]
        for r in records:
            notes = ", ".join(f"{k}={r[k]}" for k in ("steps", "prompts", "tokens", "overhead_x") if k in r)
            lines.append(f"| {r['case']} | {r['shape']} | {r['metric']} | {r['value']} | {notes} |")
        stem.with_suffix(".md").write_text(
            f"# Calibration benchmark ({device_name}, commit {commit[:9]}, {date})\n\nWan2.1-1.3B shape, RANDOM weights, "
            f"euler/simple, cfg 1. `dense_comfy` = plain sampling of the same steps (one prompt); "
            f"`overhead_x` = calibration time per prompt / dense time.\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
