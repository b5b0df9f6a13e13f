"""Training data: videos + captions -> cached latents and text embeddings (issue 8).

``prepare_videos`` walks a folder of videos (each with a same-stem ``.txt`` caption), decodes
``frames`` frames at ``fps`` with PyAV, resizes + centre-crops to height x width, encodes with
ComfyUI's own VAE (``comfy.sd.VAE``) and text encoder (any ``encode_text(str) -> [1, L, C]``,
normally ``comfy_text_encoder``), and writes sharded safetensors:

    out/index.json                      what is done, shard list, skipped files and why
    out/shard-00000.safetensors         latent.{j} [16, T', H/8, W/8], context.{j} [L, C] (bf16)

It is resumable (finished shards are never redone; a re-run picks up where it stopped), shows a
progress bar, and every unreadable / too-short / caption-less video is reported (log + index)
and skipped, never silently. ``prepare_prompts`` does the same for a prompt list (text only),
for data-free distillation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("salad.train")

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif", ".m4v")
INDEX = "index.json"
STORE_DTYPE = torch.bfloat16


class BadVideo(Exception):
    pass


def read_video(path: str, frames: int, height: int, width: int, fps: float | None = 16.0) -> torch.Tensor:
    """[frames, height, width, 3] float in [0, 1]; raises BadVideo with the reason."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            src_fps = float(stream.average_rate or 0) or None
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as exc:
        raise BadVideo(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not decoded:
        raise BadVideo("no video frames")
    step = (src_fps / fps) if (fps and src_fps) else 1.0
    idx = [round(k * step) for k in range(frames)]
    if idx[-1] >= len(decoded):
        raise BadVideo(f"too short: {len(decoded)} frames at {src_fps or '?'} fps, need {frames} at {fps} fps")
    x = torch.from_numpy(__import__("numpy").stack([decoded[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0, 1)
    return x.permute(0, 2, 3, 1).contiguous()


def comfy_vae(path: str):
    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    return comfy.sd.VAE(sd=sd, metadata=metadata)


def comfy_text_encoder(path: str) -> Callable[[str], torch.Tensor]:
    """umt5-xxl (Wan) through ComfyUI's CLIPLoader path, as ``encode_text(str) -> [1, 512, 4096]``."""
    import comfy.sd

    clip = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.WAN)

    def encode(text: str) -> torch.Tensor:
        return clip.encode_from_tokens(clip.tokenize(text))

    return encode


@dataclass
class _Writer:
    out: Path
    index: dict
    shard_size: int

    def __post_init__(self):
        self.pending: list[tuple[str, str, dict[str, torch.Tensor]]] = []

    def add(self, source: str, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.append((source, caption, tensors))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        tensors, sources = {}, []
        for j, (source, caption, ts) in enumerate(self.pending):
            for k, v in ts.items():
                tensors[f"{k}.{j}"] = v.detach().to("cpu", STORE_DTYPE).contiguous()
            sources.append({"source": source, "caption": caption})
        save_file(tensors, str(self.out / (name + ".tmp")), metadata={"salad.samples": json.dumps(sources)})
        os.replace(self.out / (name + ".tmp"), self.out / name)
        self.index["shards"].append({"file": name, "count": len(self.pending)})
        for j, (source, _, _) in enumerate(self.pending):
            self.index["done"][source] = [name, j]
        self.pending = []
        save_index(self.out, self.index)


def load_index(out: Path, settings: dict) -> dict:
    path = out / INDEX
    if path.is_file():
        index = json.loads(path.read_text())
        if index.get("settings") != settings:
            raise ValueError(
                f"{path}: Expected a cache made with {settings}, got {index.get('settings')}. "
                "Try another output folder, or the settings it was made with."
            )
        return index
    return {"version": 1, "settings": settings, "shards": [], "done": {}, "bad": {}}


def save_index(out: Path, index: dict) -> None:
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)


def _progress(total: int, desc: str, callback):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="item", disable=callback is not None)
    done = [0]

    def tick(n=1):
        done[0] += n
        bar.update(n)
        if callback is not None:
            callback(done[0], total)

    return bar, tick


def prepare_videos(
    video_dir, out_dir, vae, encode_text: Callable[[str], torch.Tensor],
    frames: int = 77, height: int = 480, width: int = 832, fps: float | None = 16.0,
    shard_size: int = 64, progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode every video under ``video_dir``; returns the index (``index['bad']``: skipped files
    and why). ``vae``: a comfy.sd.VAE; ``encode_text``: str -> [1, L, C]."""
    if (frames - 1) % 4:
        raise ValueError(f"Expected frames = 4k + 1 (Wan's VAE), got {frames}. Try {((frames - 1) // 4) * 4 + 1}.")
    video_dir, out = Path(video_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"kind": "video", "frames": frames, "height": height, "width": width, "fps": fps}
    index = load_index(out, settings)
    files = sorted(p for p in video_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    todo = [p for p in files if str(p.relative_to(video_dir)) not in index["done"]]
    writer = _Writer(out, index, shard_size)
    bar, tick = _progress(len(files), "SALAD prepare", progress)
    tick(len(files) - len(todo))
    for p in todo:
        rel = str(p.relative_to(video_dir))
        caption_file = p.with_suffix(".txt")
        try:
            if not caption_file.is_file():
                raise BadVideo(f"no caption file {caption_file.name}")
            caption = caption_file.read_text(encoding="utf-8").strip()
            pixels = read_video(p, frames, height, width, fps)
            latent = vae.encode(pixels)[0]
            context = encode_text(caption)[0]
            writer.add(rel, caption, {"latent": latent, "context": context})
            index["bad"].pop(rel, None)
        except BadVideo as exc:
            index["bad"][rel] = str(exc)
            log.warning("SALAD prepare: skipping %s: %s", p, exc)
        tick()
    writer.flush()
    save_index(out, index)
    bar.close()
    if index["bad"]:
        log.warning("SALAD prepare: %d of %d files skipped (see %s 'bad')", len(index["bad"]), len(files), out / INDEX)
    return index


def prepare_prompts(prompts, out_dir, encode_text, shard_size: int = 256, progress=None) -> dict:
    """Prompts only (data-free distillation): context.{j} per prompt. ``prompts``: list or a
    text file with one prompt per line."""
    if isinstance(prompts, (str, Path)):
        prompts = [line.strip() for line in Path(prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = load_index(out, {"kind": "prompts"})
    writer = _Writer(out, index, shard_size)
    bar, tick = _progress(len(prompts), "SALAD prompts", progress)
    for i, text in enumerate(prompts):
        key = f"prompt:{i}:{text}"
        if key not in index["done"]:
            writer.add(key, text, {"context": encode_text(text)[0]})
        tick()
    writer.flush()
    bar.close()
    return index


class CachedDataset:
    """Samples of a prepared folder: dict(latent [16, T, h, w] or None, context [L, C])."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise FileNotFoundError(
                f"{self.root}: Expected a prepared data folder with {INDEX}, got none. "
                "Try `python -m salad_core.train prepare ...` first."
            )
        self.index = json.loads((self.root / INDEX).read_text())
        self.items = [(s["file"], j) for s in self.index["shards"] for j in range(s["count"])]
        if not self.items:
            raise ValueError(f"{self.root}: Expected prepared samples, got none (all skipped? see {INDEX} 'bad').")
        self.has_latents = self.index["settings"]["kind"] == "video"
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        name, j = self.items[i]
        f = self._open.get(name)
        if f is None:
            f = self._open[name] = safe_open(str(self.root / name), framework="pt", device="cpu")
        latent = f.get_tensor(f"latent.{j}").float() if self.has_latents else None
        return {"latent": latent, "context": f.get_tensor(f"context.{j}").float()}


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9973 + epoch))


def sample_ids(n: int, positions, seed: int) -> list[int]:
    """Dataset item for each global sample position (shuffled per epoch, deterministic)."""
    out, cache = [], {}
    for g in positions:
        epoch = g // n
        if epoch not in cache:
            cache[epoch] = epoch_order(n, epoch, seed)
        out.append(int(cache[epoch][g % n]))
    return out


def collate(samples: list[dict], text_len: int = 512) -> dict:
    ctx = []
    for s in samples:
        c = s["context"]
        if c.shape[0] < text_len:  # ComfyUI's umt5 tokenizer pads to 512 already; be safe
            c = torch.nn.functional.pad(c, (0, 0, 0, text_len - c.shape[0]))
        ctx.append(c[:text_len])
    latents = [s["latent"] for s in samples]
    return {
        "latent": None if latents[0] is None else torch.stack(latents),
        "context": torch.stack(ctx),
    }
