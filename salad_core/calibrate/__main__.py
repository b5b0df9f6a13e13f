"""Command line: calibrate a Wan2.1 checkpoint into a SALAD weights file.

    COMFYUI_PATH=/path/to/ComfyUI python -m salad_core.calibrate --model wan2.1_t2v_1.3B_fp16.safetensors \
        --out models/salad/wan13b_stswa.safetensors --conditioning prompts.safetensors

--conditioning: a safetensors file of text embeddings (umt5 output, [L, 4096] or [B, L, 4096]
tensors; every tensor / batch row is one prompt), e.g. saved from ComfyUI's CLIP Text Encode.
--random-conditioning uses random embeddings: FOR TESTING ONLY, the windows are not meaningful.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _setup_comfy(cpu: bool) -> None:
    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isfile(os.path.join(root, "comfy", "sd.py")):
        sys.exit(
            f"Expected COMFYUI_PATH to point at a ComfyUI checkout (with comfy/sd.py), got {root!r}. "
            "Try: export COMFYUI_PATH=/path/to/ComfyUI (or run .ci/setup_comfyui.sh and use .comfy/ComfyUI)."
        )
    sys.path.insert(0, os.path.abspath(root))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if repo not in sys.path:
        sys.path.insert(1, repo)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = bool(cpu)


def _conditioning(path: str | None, random_: bool, count: int, text_dim: int):
    import torch

    if random_:
        logging.warning("=" * 78)
        logging.warning("RANDOM CONDITIONING: for testing only. Calibrated windows will NOT fit real prompts.")
        logging.warning("=" * 78)
        g = torch.Generator().manual_seed(1234)
        return [[torch.randn(1, 512, text_dim, generator=g), {}] for _ in range(count)]
    from safetensors.torch import load_file

    tensors = load_file(path)
    if not tensors:
        sys.exit(f"Expected text embeddings in {path}, got an empty file. Try saving umt5 outputs [L, {text_dim}].")
    out = []
    for name in sorted(tensors):
        t = tensors[name].float()
        t = t[None] if t.dim() == 2 else t
        if t.dim() != 3 or t.shape[-1] != text_dim:
            sys.exit(f"Expected {name} in {path} of shape [L, {text_dim}] or [B, L, {text_dim}], got {list(t.shape)}. "
                     "Try the umt5-xxl text encoder output.")
        out.append([t, {}])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m salad_core.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Wan2.1 diffusion-model .safetensors (as for UNETLoader)")
    p.add_argument("--out", required=True, help="SALAD weights file to write")
    p.add_argument("--weights", help="existing SALAD weights to update (needed for gate thresholds)")
    p.add_argument("--what", default="windows", choices=("windows", "gate_thresholds", "both"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--delta", type=float, default=2.0, help="max RSE per head in percent (default 2.0)")
    p.add_argument("--headroom", type=float, default=0.1, help="choose windows within delta*(1-headroom) (default 0.1)")
    p.add_argument("--target-sparsity", type=float, default=0.0, help="> 0: windows for this sparsity, least error")
    p.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    p.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    p.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--plots", help="folder for the PNG plots (default: next to --out)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cpu", action="store_true")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--conditioning", help="safetensors file of text embeddings, one prompt per tensor/row")
    src.add_argument("--random-conditioning", type=int, nargs="?", const=2, metavar="N",
                     help="N random prompts (default 2): FOR TESTING ONLY")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _setup_comfy(a.cpu)

    import torch

    import comfy.sd

    from salad_core import plots
    from salad_core.calibrate import calibrate
    from salad_core.weights import load_salad_weights

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    t0 = time.perf_counter()
    model = comfy.sd.load_diffusion_model(a.model, model_options={"dtype": dtype})
    dm = model.model.diffusion_model
    cond = _conditioning(a.conditioning, a.random_conditioning is not None, a.random_conditioning or 0,
                         getattr(dm, "text_dim", 4096))
    latent = {"samples": torch.zeros(1, 16, a.frames, a.height, a.width)}
    weights = load_salad_weights(a.weights) if a.weights else None
    t1 = time.perf_counter()
    out = calibrate(model, cond, latent, a.steps, a.delta, a.target_sparsity, a.what, weights, a.out,
                    a.overwrite, a.seed, a.block_size, headroom=a.headroom)
    t2 = time.perf_counter()
    folder = a.plots or os.path.dirname(os.path.abspath(a.out))
    stem = os.path.splitext(os.path.basename(a.out))[0]
    paths = plots.save_pngs(out.plots, folder, stem)
    logging.info("%s", out.summary)
    logging.info("plots: %s", ", ".join(paths))
    logging.info("load %.1f s, calibration %.1f s", t1 - t0, t2 - t1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
