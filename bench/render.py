"""Main job: render the shipped Wan2.1 1.3B SALAD workflow headless through a real ComfyUI, dense
vs SALAD, and print one summary line.  Entry point: ``bash .ci/main_job`` (sets ComfyUI up first).

    python bench/render.py [--comfy PATH] [--workflow workflows/api/....json] [--steps N] ...

Model files
  SALAD_WAN_MODEL, SALAD_TEXT_ENCODER, SALAD_VAE = paths (or names already in ComfyUI's model
  folders) of a real Wan2.1 diffusion model, umT5 text encoder and Wan2.1 VAE: the shipped workflow
  runs unchanged but for those file names (full size and steps unless overridden).
  Otherwise (tiny mode): random tiny Wan2.1 checkpoint (salad_core.tiny_wan, dim 256, 2 layers), a
  random Wan2.1-VAE-layout VAE with dim 4, SaladTestConditioning instead of the text encoder, a
  256x256x9 latent and 4 steps. Outputs are noise; the graph, the nodes and the timings are real.
  Tiny files live in .cache/salad_main_job/ and reach ComfyUI through --extra-model-paths-config,
  so nothing is written into the ComfyUI tree except its output/ folder.

The graph runs twice in one server: dense (SALAD Apply bypassed, KSampler fed straight from
ModelSamplingSD3; SALAD Stats dropped) then SALAD. Sampling time = mean wall time per step over
steps 2..N (from the websocket progress messages, so model loading and first-step warm-up are
excluded for both) times N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import workflow_tools as wt  # noqa: E402
from bench.comfy_server import ComfyServer  # noqa: E402

CACHE = REPO / ".cache" / "salad_main_job"
DEFAULT_WORKFLOW = wt.API_DIR / "salad_wan2.1_t2v_1.3B_480p.json"


def log(msg: str) -> None:
    print(f"[main_job] {msg}", file=sys.stderr, flush=True)


def comfy_root(arg) -> Path:
    return Path(arg or os.environ.get("COMFYUI_PATH") or REPO / ".comfy" / "ComfyUI").expanduser().resolve()


def prepare_tiny(root: Path) -> Path:
    """Tiny model files + test node link in CACHE; returns an extra_model_paths.yaml for them."""
    dm, vae_dir, cn = CACHE / "models" / "diffusion_models", CACHE / "models" / "vae", CACHE / "custom_nodes"
    for d in (dm, vae_dir, cn):
        d.mkdir(parents=True, exist_ok=True)
    if not (dm / wt.TINY_MODEL_NAME).is_file():
        from salad_core.tiny_wan import WanShape, write_wan_checkpoint

        write_wan_checkpoint(dm / wt.TINY_MODEL_NAME, WanShape.tiny(), seed=0)
        log(f"wrote random tiny Wan2.1 checkpoint {dm / wt.TINY_MODEL_NAME}")
    if not (vae_dir / wt.TINY_VAE_NAME).is_file():
        # Separate process: importing comfy here would initialise its device management in ours.
        code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
                "import comfy.options; comfy.options.enable_args_parsing(False)\n"
                "from comfy.cli_args import args; args.cpu = True\n"
                "from bench.workflow_tools import write_tiny_vae; write_tiny_vae(sys.argv[3])\n")
        subprocess.run([sys.executable, "-c", code, str(root), str(REPO), str(vae_dir / wt.TINY_VAE_NAME)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log(f"wrote random Wan2.1-layout VAE (dim 4) {vae_dir / wt.TINY_VAE_NAME}")
    link = cn / "salad_test_nodes"
    if not link.is_symlink():
        link.symlink_to(wt.TEST_NODES_DIR, target_is_directory=True)
    yaml = CACHE / "extra_model_paths.yaml"
    yaml.write_text(f"salad_main_job:\n    base_path: {CACHE}\n    diffusion_models: models/diffusion_models\n"
                    f"    vae: models/vae\n    custom_nodes: custom_nodes\n")
    return yaml


def prepare_real(env) -> tuple:
    """File names for the workflow + an extra_model_paths.yaml for files given as paths."""
    names, dirs = {}, {}
    for key, folder in (("SALAD_WAN_MODEL", "diffusion_models"), ("SALAD_TEXT_ENCODER", "text_encoders"),
                        ("SALAD_VAE", "vae")):
        v = env.get(key)
        if not v:
            raise SystemExit(f"SALAD_WAN_MODEL is set, so {key} must be set too (path or file name)")
        p = Path(v).expanduser()
        if p.is_file():
            dirs.setdefault(folder, []).append(str(p.resolve().parent))
            names[folder] = p.name
        else:
            names[folder] = v  # a name ComfyUI already knows; ComfyUI validates it
    yaml = None
    if dirs:
        CACHE.mkdir(parents=True, exist_ok=True)
        yaml = CACHE / "extra_model_paths_real.yaml"
        body = "salad_main_job_real:\n" + "".join(
            f"    {folder}: |\n" + "".join(f"        {d}\n" for d in sorted(set(ds))) for folder, ds in dirs.items())
        yaml.write_text(body)
    return names, yaml


def sampling_seconds(steps_t, n_steps) -> float:
    if len(steps_t) >= 2:
        return (steps_t[-1] - steps_t[0]) / (len(steps_t) - 1) * n_steps
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", help="ComfyUI root (default: $COMFYUI_PATH or .comfy/ComfyUI)")
    ap.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="API-format workflow to render")
    ap.add_argument("--steps", type=int, help="sampling steps (tiny default 4, real: the workflow's)")
    ap.add_argument("--size", help="WxHxF, e.g. 256x256x9 (tiny default; real: the workflow's)")
    ap.add_argument("--sparsity", type=float, help="override SALAD Apply's sparsity widget")
    ap.add_argument("--cpu", action="store_true", help="force --cpu even with CUDA")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args(argv)

    root = comfy_root(a.comfy)
    if not (root / "main.py").is_file():
        raise SystemExit(f"no ComfyUI at {root}: run `bash .ci/setup_comfyui.sh` or set COMFYUI_PATH")
    api = wt.load_json(a.workflow)
    real = bool(os.environ.get("SALAD_WAN_MODEL"))
    if real:
        names, yaml = prepare_real(os.environ)
        prompt = wt.with_files(api, names["diffusion_models"], names["text_encoders"], names["vae"])
        model_label = names["diffusion_models"]
        if a.steps or a.size:
            w, h, f = (int(x) for x in a.size.split("x")) if a.size else (None, None, None)
            for v in prompt.values():
                if v["class_type"] == "KSampler" and a.steps:
                    v["inputs"]["steps"] = a.steps
                if v["class_type"] in ("EmptyHunyuanLatentVideo", "WanImageToVideo") and a.size:
                    v["inputs"].update(width=w, height=h, length=f)
    else:
        yaml = prepare_tiny(root)
        w, h, f = (int(x) for x in (a.size or "256x256x9").split("x"))
        prompt = wt.tiny_api(api, width=w, height=h, length=f, steps=a.steps or 4)
        model_label = "tiny-random"

    salad_id = wt.find(prompt, "SaladApply")[0]
    ks_id = wt.find(prompt, "KSampler")[0]
    stats_ids = wt.find(prompt, "SaladStats")
    save_id = wt.find(prompt, "SaveVideo")[0]
    if a.sparsity is not None:
        prompt[salad_id]["inputs"]["sparsity"] = a.sparsity
    target = prompt[salad_id]["inputs"]["sparsity"]
    n_steps = prompt[ks_id]["inputs"]["steps"]
    prompt[save_id]["inputs"]["filename_prefix"] = "salad"
    dense = wt.bypass(prompt, salad_id, drop=stats_ids + wt.find(prompt, "PreviewImage"))
    dense[save_id]["inputs"]["filename_prefix"] = "salad_dense"

    import torch

    cpu = a.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    server = ComfyServer(root, port=None, cpu=cpu, extra_model_paths=yaml,
                         log_path=CACHE / f"comfyui-{stamp}.log")
    log(f"ComfyUI {root} on {server.url} ({'cpu' if cpu else device}); log {server.log_path}")
    t0 = time.time()
    try:
        server.start()
        log(f"server up in {time.time() - t0:.1f} s; rendering dense then SALAD ({n_steps} steps, {model_label})")
        results = {}
        for name, p in (("dense", dense), ("salad", prompt)):
            t = time.time()
            pid = server.queue(p)
            entry = server.wait(pid, timeout=a.timeout)
            time.sleep(0.2)  # let the last websocket messages arrive
            results[name] = dict(entry=entry, steps=server.step_times(pid, ks_id), nodes=server.node_times(pid),
                                 wall=time.time() - t)
            log(f"{name}: prompt {time.time() - t:.1f} s, KSampler node {results[name]['nodes'].get(ks_id, float('nan')):.2f} s")
    finally:
        server.stop()

    outs = results["salad"]["entry"]["outputs"]
    vids = outs.get(save_id, {}).get("images") or outs.get(save_id, {}).get("videos") or []
    out_dir = root / "output"
    video = (out_dir / vids[0].get("subfolder", "") / vids[0]["filename"]) if vids else None
    text = "\n".join("".join(x) if isinstance(x, list) else str(x)
                     for sid in stats_ids for x in outs.get(sid, {}).get("text", []))
    m = re.search(r"measured sparsity:\s*([0-9.]+)", text)
    measured = m.group(1) if m else "n/a"
    td = sampling_seconds(results["dense"]["steps"], n_steps)
    ts = sampling_seconds(results["salad"]["steps"], n_steps)
    rec = dict(date=datetime.date.today().isoformat(), device=device, model=model_label, steps=n_steps,
               target_sparsity=target, measured_sparsity=measured, sampling_dense_s=td, sampling_salad_s=ts,
               speedup=td / ts if ts else None, ksampler_node_s={k: r["nodes"].get(ks_id) for k, r in results.items()},
               prompt_wall_s={k: r["wall"] for k, r in results.items()}, video=str(video), stats=text)
    (CACHE / "last_run.json").write_text(json.dumps(rec, indent=2))
    log(f"details: {CACHE / 'last_run.json'}")
    shown = video.relative_to(root) if video and video.is_relative_to(root) else video
    ok = video is not None and video.is_file()
    print(f"SALAD main job: {shown if ok else 'NO VIDEO WRITTEN'} | model {model_label} | sparsity {target:.2f} "
          f"(measured {measured}) | sampling dense {td:.2f} s vs SALAD {ts:.2f} s ({td / ts:.2f}x) | "
          f"{'cpu' if cpu else device}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
