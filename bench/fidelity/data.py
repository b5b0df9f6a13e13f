"""Procedural latent videos with captions (issue 10): the toy model's training data.

Each clip is drawn directly in Wan's 16-channel latent space, [16, T, H, W]: a background
(a fixed 16-d colour vector plus a soft gradient) and 1-3 objects (circle, square or ring) that
move with constant velocity, bounce off the borders and fade from one colour to another over the
clip. Colours and shape kinds are fixed random 16-d vectors (seeded), so the "pixels" are
latents and no VAE is needed. Everything is a function of (split seed, clip index): the same
index always gives the same clip, on any machine.

The caption lists the clip's attributes in words ("a small red circle turning blue moving left
..."). Its embedding is deterministic and needs no text encoder: every word maps to a fixed
random 4096-vector seeded by its crc32 (plus a small position code), padded with zeros to
[512, 4096] like umt5 output.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import torch

LATENT_CHANNELS = 16
TEXT_LEN = 512
TEXT_DIM = 4096
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
BACKGROUNDS = ("dark", "grey", "sand", "teal")
KINDS = ("circle", "square", "ring")
SIZES = {"small": 0.12, "large": 0.22}  # radius as a fraction of the shorter side
SPLIT_SEEDS = {"train": 0, "test": 1_000_003}
TABLE_SEED = 1234  # the fixed colour / kind / word tables


def _vec(name: str, dim: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed((TABLE_SEED * 7919 + zlib.crc32(name.encode())) % (2**63 - 1))
    v = torch.randn(dim, generator=g)
    return v * (scale / v.norm() * math.sqrt(dim))


@dataclass(frozen=True)
class ClipSpec:
    """Latent frames x height x width (latent pixels; tokens = T * H/2 * W/2)."""

    frames: int = 13
    height: int = 32
    width: int = 32

    @property
    def tokens(self) -> int:
        return self.frames * (self.height // 2) * (self.width // 2)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height // 2, self.width // 2)


def clip_attributes(index: int, split: str = "train") -> dict:
    """The random attributes of clip ``index`` (deterministic)."""
    rng = random.Random(SPLIT_SEEDS[split] + int(index) * 1_000_033)
    objects = []
    for _ in range(rng.randint(1, 3)):
        angle = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.03, 0.08)  # fraction of the side per frame
        objects.append({
            "kind": rng.choice(KINDS), "size": rng.choice(tuple(SIZES)),
            "colour0": rng.choice(COLOURS), "colour1": rng.choice(COLOURS),
            "pos": (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)),
            "vel": (speed * math.cos(angle), speed * math.sin(angle)),
        })
    return {"background": rng.choice(BACKGROUNDS), "objects": objects, "tilt": rng.uniform(0, 2 * math.pi)}


def _direction(vel) -> str:
    vx, vy = vel
    return ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")


def caption(attrs: dict) -> str:
    parts = []
    for o in attrs["objects"]:
        turn = "" if o["colour1"] == o["colour0"] else f" turning {o['colour1']}"
        parts.append(f"a {o['size']} {o['colour0']} {o['kind']}{turn} moving {_direction(o['vel'])}")
    return " and ".join(parts) + f" on a {attrs['background']} background"


def embed_caption(text: str, length: int = TEXT_LEN, dim: int = TEXT_DIM) -> torch.Tensor:
    """[length, dim] fp32: word vectors (fixed by crc32 of the word) + 0.3 x position code."""
    out = torch.zeros(length, dim)
    for i, word in enumerate(text.lower().split()[:length]):
        out[i] = _vec("word:" + word, dim, 0.5) + _vec(f"pos:{i}", dim, 0.15)
    return out


def _trajectory(p0: float, v: float, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Position bouncing between lo and hi (a triangle wave)."""
    span = hi - lo
    x = (p0 - lo + v * t) % (2 * span)
    return lo + torch.where(x > span, 2 * span - x, x)


def render(attrs: dict, spec: ClipSpec) -> torch.Tensor:
    """[16, T, H, W] fp32 latent clip."""
    t_n, h, w = spec.frames, spec.height, spec.width
    t = torch.arange(t_n, dtype=torch.float32)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / min(h, w)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / min(h, w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    bg = _vec("bg:" + attrs["background"], LATENT_CHANNELS, 0.6)
    ramp = math.cos(attrs["tilt"]) * xx + math.sin(attrs["tilt"]) * yy
    grad = _vec("bg-gradient", LATENT_CHANNELS, 0.3)
    video = (bg[:, None, None] + grad[:, None, None] * (ramp - ramp.mean())).unsqueeze(1).expand(-1, t_n, -1, -1).clone()
    soft = 1.5 / min(h, w)
    for o in attrs["objects"]:
        r = SIZES[o["size"]]
        cx = _trajectory(o["pos"][0] * w / min(h, w), o["vel"][0], t, r, w / min(h, w) - r)
        cy = _trajectory(o["pos"][1] * h / min(h, w), o["vel"][1], t, r, h / min(h, w) - r)
        dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
        if o["kind"] == "square":
            dist = torch.maximum(dx.abs(), dy.abs())
            mask = torch.sigmoid((r * 0.85 - dist) / soft)
        else:
            dist = torch.sqrt(dx**2 + dy**2)
            mask = torch.sigmoid((r - dist) / soft)
            if o["kind"] == "ring":
                mask = mask * torch.sigmoid((dist - 0.55 * r) / soft)
        frac = (t / max(1, t_n - 1))[:, None, None]
        c0 = _vec("colour:" + o["colour0"], LATENT_CHANNELS, 1.0)
        c1 = _vec("colour:" + o["colour1"], LATENT_CHANNELS, 1.0)
        texture = _vec("kind:" + o["kind"], LATENT_CHANNELS, 0.3)
        colour = c0[:, None, None, None] * (1 - frac) + c1[:, None, None, None] * frac + texture[:, None, None, None]
        video = video * (1 - mask) + colour * mask
    return video


class ToyVideos:
    """Indexable, endless dataset: ``ds[i]`` -> {"latent" [16,T,H,W], "context" [512,4096],
    "caption" str}. The training split has ``size`` clips (cycled by the sampler); the test
    split is disjoint (other attribute seed)."""

    def __init__(self, spec: ClipSpec = ClipSpec(), split: str = "train", size: int = 100_000, text_len: int = TEXT_LEN):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"Expected split in {tuple(SPLIT_SEEDS)}, got {split!r}.")
        self.spec, self.split, self.size, self.text_len = spec, split, size, text_len

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        attrs = clip_attributes(i, self.split)
        text = caption(attrs)
        return {"latent": render(attrs, self.spec), "context": embed_caption(text, self.text_len), "caption": text}

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i) % self.size] for i in indices]
        return torch.stack([it["latent"] for it in items]), torch.stack([it["context"] for it in items])
