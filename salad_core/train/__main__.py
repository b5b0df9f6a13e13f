"""SALAD training CLI.

  # 1. videos (+ same-stem .txt captions) -> cached latents and text embeddings
  python -m salad_core.train prepare --videos my_videos/ --out data/ \\
      --vae models/vae/wan_2.1_vae.safetensors \\
      --text-encoder models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
  #    or prompts only (data-free distillation)
  python -m salad_core.train prepare-prompts --prompts prompts.txt --out data/ --text-encoder ...
  # 2. train (single GPU, or torchrun --nproc-per-node N -m salad_core.train train ...)
  python -m salad_core.train train --model models/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors \\
      --data data/ --out runs/mine [--objective flow|distill] [--fsdp]
  # -> runs/mine/salad.safetensors, for models/salad/ and the SALAD Apply node

Needs ComfyUI importable: run from this pack's folder with COMFYUI_PATH set to your ComfyUI folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys


def _setup_comfy() -> None:
    root = os.environ.get("COMFYUI_PATH")
    if root and root not in sys.path:
        sys.path.insert(0, root)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        import torch

        if not torch.cuda.is_available():
            args.cpu = True
    except ImportError as exc:
        raise SystemExit(f"Expected ComfyUI importable, got {exc}. Try COMFYUI_PATH=/path/to/ComfyUI.") from exc


def _train_parser(sub) -> None:
    from .trainer import TrainConfig

    p = sub.add_parser("train", help="train SALAD weights")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):  # a plain flag: --fsdp / --no-fsdp
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=len(default), default=default)
        elif f.name == "shift":
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m salad_core.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="videos + captions -> cached latents/text embeddings")
    p.add_argument("--videos", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", required=True, help="Wan2.1 VAE file (as VAELoader loads it)")
    p.add_argument("--text-encoder", required=True, help="umt5-xxl file (as CLIPLoader type 'wan' loads it)")
    p.add_argument("--frames", type=int, default=77)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--shard-size", type=int, default=64)
    q = sub.add_parser("prepare-prompts", help="prompts -> cached text embeddings (distillation)")
    q.add_argument("--prompts", required=True, help="text file, one prompt per line")
    q.add_argument("--out", required=True)
    q.add_argument("--text-encoder", required=True)
    _train_parser(sub)
    a = parser.parse_args(argv)
    _setup_comfy()
    from . import data

    if a.cmd == "prepare":
        index = data.prepare_videos(a.videos, a.out, data.comfy_vae(a.vae), data.comfy_text_encoder(a.text_encoder),
                                    a.frames, a.height, a.width, a.fps, a.shard_size)
        n = sum(s["count"] for s in index["shards"])
        logging.info("prepared %d videos into %s; skipped %d", n, a.out, len(index["bad"]))
        for k, why in index["bad"].items():
            logging.warning("  skipped %s: %s", k, why)
        return 0
    if a.cmd == "prepare-prompts":
        index = data.prepare_prompts(a.prompts, a.out, data.comfy_text_encoder(a.text_encoder))
        logging.info("prepared %d prompts into %s", sum(s["count"] for s in index["shards"]), a.out)
        return 0
    from .trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items() if k in fields})
    path = train(cfg, resume=not a.no_resume)
    logging.info("SALAD weights: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
