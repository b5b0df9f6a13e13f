"""Random Wan2.1-shaped diffusion-model checkpoints for tests and benchmarks.

THESE ARE RANDOM WEIGHTS, NOT A MODEL. They carry the exact parameter names and
shapes of ComfyUI's ``comfy.ldm.wan.model.WanModel`` (v0.3.64 / v0.3.75), laid out
like a diffusion-model-only file such as ``wan2.1_t2v_1.3B_fp16.safetensors``
(keys without any ``model.diffusion_model.`` prefix), so that ComfyUI's loader
(``comfy.model_detection`` keys on ``head.modulation``) detects them as Wan 2.1
and builds the real WanModel around them. Outputs are meaningless; only shapes,
code paths and timings are real.

Pure torch: no ComfyUI import, nothing touches a GPU unless ``device`` asks for it.

    from salad_core.tiny_wan import WanShape, wan_state_dict, write_wan_checkpoint
    write_wan_checkpoint("tiny.safetensors", WanShape.tiny(), seed=0)

Every tensor is drawn from its own generator seeded from ``(seed, key name)``, so
the result is deterministic for a given seed, dtype and device type, independent
of key order, and a subset of keys can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Dict, Iterator, Literal, Optional, Tuple

import torch

__all__ = ["WanShape", "wan_param_shapes", "wan_state_dict", "write_wan_checkpoint"]

PATCH_SIZE = (1, 2, 2)
IMG_EMB_DIM = 1280  # CLIP-vision feature width fed to MLPProj in i2v models
HEAD_DIM = 128  # ComfyUI's detector derives num_heads = dim // 128


@dataclasses.dataclass(frozen=True)
class WanShape:
    """Hyper-parameters that ComfyUI's detector reads back from a Wan 2.1 state dict."""

    dim: int
    ffn_dim: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    model_type: Literal["t2v", "i2v"] = "t2v"
    text_dim: int = 4096
    freq_dim: int = 256

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % HEAD_DIM:
            raise ValueError(f"dim must be a multiple of {HEAD_DIM} (ComfyUI sets heads = dim // 128), got {self.dim}")
        if self.num_layers < 1 or self.ffn_dim < 1:
            raise ValueError("num_layers and ffn_dim must be positive")

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    # ---- presets -------------------------------------------------------
    @classmethod
    def tiny(cls) -> "WanShape":
        """CPU test size: dim 256 (2 heads of 128), ffn 512, 2 layers, t2v."""
        return cls(dim=256, ffn_dim=512, num_layers=2)

    @classmethod
    def tiny_i2v(cls) -> "WanShape":
        """Tiny image-to-video: in_dim 36 and an img_emb MLPProj (1280 -> dim)."""
        return cls(dim=256, ffn_dim=512, num_layers=2, in_dim=36, model_type="i2v")

    @classmethod
    def wan_1_3b(cls, model_type: str = "t2v") -> "WanShape":
        return cls(dim=1536, ffn_dim=8960, num_layers=30, in_dim=36 if model_type == "i2v" else 16,
                   model_type=model_type)

    @classmethod
    def wan_14b(cls, model_type: str = "t2v") -> "WanShape":
        return cls(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36 if model_type == "i2v" else 16,
                   model_type=model_type)

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s, _ in _param_specs(self))


# kinds: "w" linear/conv weight, "b" bias, "norm_w" norm scale (~1), "norm_b" norm shift (~0), "mod" modulation
def _param_specs(shape: WanShape) -> Iterator[Tuple[str, Tuple[int, ...], str]]:
    d, f = shape.dim, shape.ffn_dim

    def linear(name, n_in, n_out):
        yield f"{name}.weight", (n_out, n_in), "w"
        yield f"{name}.bias", (n_out,), "b"

    yield "patch_embedding.weight", (d, shape.in_dim, *PATCH_SIZE), "w"
    yield "patch_embedding.bias", (d,), "b"
    yield from linear("text_embedding.0", shape.text_dim, d)
    yield from linear("text_embedding.2", d, d)
    yield from linear("time_embedding.0", shape.freq_dim, d)
    yield from linear("time_embedding.2", d, d)
    yield from linear("time_projection.1", d, 6 * d)

    for i in range(shape.num_layers):
        p = f"blocks.{i}"
        # norm1 / norm2 are LayerNorm(elementwise_affine=False): no parameters.
        for a in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                yield from linear(f"{p}.{a}.{proj}", d, d)
            yield f"{p}.{a}.norm_q.weight", (d,), "norm_w"
            yield f"{p}.{a}.norm_k.weight", (d,), "norm_w"
        if shape.model_type == "i2v":
            yield from linear(f"{p}.cross_attn.k_img", d, d)
            yield from linear(f"{p}.cross_attn.v_img", d, d)
            yield f"{p}.cross_attn.norm_k_img.weight", (d,), "norm_w"
        yield f"{p}.norm3.weight", (d,), "norm_w"
        yield f"{p}.norm3.bias", (d,), "norm_b"
        yield from linear(f"{p}.ffn.0", d, f)
        yield from linear(f"{p}.ffn.2", f, d)
        yield f"{p}.modulation", (1, 6, d), "mod"

    yield from linear("head.head", d, math.prod(PATCH_SIZE) * shape.out_dim)
    yield "head.modulation", (1, 2, d), "mod"

    if shape.model_type == "i2v":
        yield "img_emb.proj.0.weight", (IMG_EMB_DIM,), "norm_w"
        yield "img_emb.proj.0.bias", (IMG_EMB_DIM,), "norm_b"
        yield from linear("img_emb.proj.1", IMG_EMB_DIM, IMG_EMB_DIM)
        yield from linear("img_emb.proj.3", IMG_EMB_DIM, d)
        yield "img_emb.proj.4.weight", (d,), "norm_w"
        yield "img_emb.proj.4.bias", (d,), "norm_b"


def wan_param_shapes(shape: WanShape) -> Dict[str, Tuple[int, ...]]:
    """Key -> tensor shape, without generating anything."""
    return {k: s for k, s, _ in _param_specs(shape)}


def _key_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def wan_state_dict(shape: WanShape, seed: int = 0, dtype: torch.dtype = torch.float32,
                   std: float = 0.02, device: Optional[torch.device | str] = None) -> Dict[str, torch.Tensor]:
    """Random Wan 2.1 state dict (keys without prefix) for ``shape``.

    Norm scales are 1 + N(0, std), norm shifts N(0, std), modulation N(0, std),
    every linear/conv weight and bias N(0, std) -- small enough that activations
    stay finite through all layers. Values are drawn in fp32 and then cast to
    ``dtype``. Deterministic per (seed, device type); CPU is the reference.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    out: Dict[str, torch.Tensor] = {}
    for key, shp, kind in _param_specs(shape):
        g = torch.Generator(device=device)
        g.manual_seed(_key_seed(seed, key))
        t = torch.randn(shp, generator=g, device=device, dtype=torch.float32)
        t.mul_(std)
        if kind == "norm_w":
            t.add_(1.0)
        out[key] = t.to(dtype)
    return out


def write_wan_checkpoint(path, shape: WanShape, seed: int = 0, dtype: torch.dtype = torch.float32,
                         std: float = 0.02, device: Optional[torch.device | str] = None) -> str:
    """Write ``wan_state_dict(shape, seed, dtype, std)`` as a safetensors file; returns the path.

    Header metadata ``salad.tiny_wan`` (JSON) records shape, seed and that the file is random;
    ComfyUI ignores it.
    The bytes are identical for identical arguments.
    """
    from safetensors.torch import save_file

    sd = wan_state_dict(shape, seed=seed, dtype=dtype, std=std, device=device)
    sd = {k: v.contiguous().cpu() for k, v in sd.items()}
    # One metadata key only: safetensors writes the metadata map in hash order, so with two or
    # more keys the header bytes (and the file hash) would vary from run to run.
    info = {**dataclasses.asdict(shape), "seed": int(seed), "std": float(std),
            "dtype": str(dtype).replace("torch.", ""), "note": "random weights for tests/benchmarks, not a model"}
    meta = {"salad.tiny_wan": json.dumps(info, sort_keys=True)}
    path = str(path)
    save_file(sd, path, metadata=meta)
    return path
