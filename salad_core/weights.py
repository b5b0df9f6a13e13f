"""SALAD weights files (design.md §4): safetensors only, validated against the model.

Tensors per self-attention block i: ``blocks.{i}.salad.proj.weight`` [C, C], ``.proj.bias`` [C],
``.gate.weight`` [1, C], ``.gate.bias`` [1], ``.scale`` [1]; optional LoRA on q/k/v/o in
ComfyUI's key form ``diffusion_model.blocks.{i}.self_attn.{q,k,v,o}.lora_A.weight`` [r, C] /
``lora_B.weight`` [C, r], so the stock LoRA loader can read the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import HeadWindow
from .wan import WanModelInfo

FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
BRANCH_PARTS = ("proj.weight", "proj.bias", "gate.weight", "gate.bias", "scale")
LORA_TARGETS = ("q", "k", "v", "o")


class SaladWeightsError(ValueError):
    """A SALAD weights file is unreadable or does not fit the model; the message names the
    file, the mismatch and the fix."""

    def __init__(self, source: str, expected: str, got, fix: str):
        super().__init__(f"{source}: Expected {expected}, got {got}. Try {fix}.")


def branch_key(layer: int, part: str) -> str:
    return f"blocks.{layer}.salad.{part}"


def lora_key(layer: int, target: str, half: str) -> str:
    return f"diffusion_model.blocks.{layer}.self_attn.{target}.lora_{half}.weight"


def branch_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    return {"proj.weight": (dim, dim), "proj.bias": (dim,), "gate.weight": (1, dim), "gate.bias": (1,), "scale": (1,)}


@dataclass(frozen=True)
class SaladMeta:
    base_model: str
    dim: int
    layers: int
    heads: int
    sparse_mode: str = "topk"
    topk: int = 0
    block_size: int = 64
    # Tokens per Top-K query block the file was trained with (query_group * block_size); None when
    # not trained in topk mode, or written before it was recorded (then mostly 64).
    query_block: int | None = None
    windows: tuple[tuple[HeadWindow, ...], ...] | None = None
    gate_thresholds: dict[str, float] = field(default_factory=dict)  # percentile -> gate value
    gate_means: tuple[float, ...] | None = None  # per layer, averaged over steps and prompts
    lora_rank: int = 0
    trained_steps: int = 0
    format_version: str = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        windows = None if self.windows is None else [[w.to_json() for w in layer] for layer in self.windows]
        return {
            "salad.format_version": self.format_version,
            "salad.base_model": self.base_model,
            "salad.dim": str(self.dim),
            "salad.layers": str(self.layers),
            "salad.heads": str(self.heads),
            "salad.sparse_mode": self.sparse_mode,
            "salad.topk": str(self.topk),
            "salad.block_size": str(self.block_size),
            "salad.query_block": json.dumps(self.query_block),
            "salad.windows": json.dumps(windows),
            "salad.gate_thresholds": json.dumps(self.gate_thresholds),
            "salad.gate_means": json.dumps(None if self.gate_means is None else list(self.gate_means)),
            "salad.lora_rank": str(self.lora_rank),
            "salad.trained_steps": str(self.trained_steps),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, source: str) -> "SaladMeta":
        meta = meta or {}
        version = meta.get("salad.format_version")
        if version is None:
            raise SaladWeightsError(
                source, "SALAD weights metadata (salad.format_version)", "a safetensors file without it",
                "a file written by SALAD (SALAD Calibrate / SALAD Train / salad_core.weights); "
                "plain LoRA files go into the stock LoRA loader",
            )
        if version not in SUPPORTED_VERSIONS:
            raise SaladWeightsError(
                source, f"salad.format_version in {SUPPORTED_VERSIONS}", repr(version),
                "updating the SALAD node pack, or re-exporting the file with this version",
            )

        def field_(name, parse):
            if f"salad.{name}" not in meta:
                raise SaladWeightsError(source, f"metadata field salad.{name}", "nothing", "re-exporting the file with SALAD")
            try:
                return parse(meta[f"salad.{name}"])
            except (ValueError, TypeError) as exc:
                raise SaladWeightsError(
                    source, f"a valid salad.{name}", repr(meta[f"salad.{name}"]), "re-exporting the file with SALAD"
                ) from exc

        def windows(text):
            data = json.loads(text)
            return None if data is None else tuple(tuple(HeadWindow.from_json(w) for w in layer) for layer in data)

        def query_block(text):
            value = json.loads(text)
            if value is not None and not (type(value) is int and value > 0):
                raise ValueError(value)
            return value

        def means(text):
            data = json.loads(text)
            return None if data is None else tuple(float(v) for v in data)

        parsed = cls(
            base_model=field_("base_model", str),
            dim=field_("dim", int),
            layers=field_("layers", int),
            heads=field_("heads", int),
            sparse_mode=field_("sparse_mode", str),
            topk=field_("topk", int),
            block_size=field_("block_size", int),
            # Optional: files written before the field existed do not record it.
            query_block=field_("query_block", query_block) if "salad.query_block" in meta else None,
            windows=field_("windows", windows),
            gate_thresholds={str(k): float(v) for k, v in field_("gate_thresholds", json.loads).items()},
            gate_means=field_("gate_means", means),
            lora_rank=field_("lora_rank", int),
            trained_steps=field_("trained_steps", int),
            format_version=version,
        )
        if parsed.gate_means is not None and len(parsed.gate_means) != parsed.layers:
            raise SaladWeightsError(
                source, f"salad.gate_means with one value per layer ({parsed.layers})",
                f"{len(parsed.gate_means)} values", "re-running SALAD Calibrate (gate thresholds) on this file",
            )
        return parsed


@dataclass(frozen=True)
class SaladWeights:
    meta: SaladMeta
    tensors: dict[str, torch.Tensor]  # branch and LoRA tensors, keys as in the file
    source: str = "<in memory>"

    def branch_state(self, layer: int) -> dict[str, torch.Tensor]:
        """State dict for one layer's SaladBranch."""
        return {part: self.tensors[branch_key(layer, part)] for part in BRANCH_PARTS}

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if ".lora_" in k}

    def with_meta(self, **changes) -> "SaladWeights":
        return replace(self, meta=replace(self.meta, **changes))

    def check_compatible(self, info: WanModelInfo) -> None:
        """Raise SaladWeightsError unless these weights fit the model described by ``info``."""
        m = self.meta
        got = (m.dim, m.layers, m.heads)
        want = (info.dim, info.num_layers, info.num_heads)
        if got != want:
            raise SaladWeightsError(
                self.source,
                f"weights for a model with dim {want[0]}, {want[1]} layers, {want[2]} heads ({info.base_model})",
                f"dim {got[0]}, {got[1]} layers, {got[2]} heads ({m.base_model})",
                f"SALAD weights made for {info.base_model}, or 'none (training-free)'",
            )
        if m.windows is not None and (len(m.windows) != m.layers or any(len(layer) != m.heads for layer in m.windows)):
            raise SaladWeightsError(
                self.source, f"salad.windows for {m.layers} layers x {m.heads} heads",
                f"{len(m.windows)} layers", "re-running SALAD Calibrate for this model",
            )


def fresh_salad_weights(info: WanModelInfo, dtype: torch.dtype = torch.float32) -> SaladWeights:
    """Zero projection, neutral gate, unit scale, no LoRA: plain sparse attention, the start
    of training and the training-free mode."""
    tensors = {}
    for layer in range(info.num_layers):
        for part, shape in branch_shapes(info.dim).items():
            fill = 1.0 if part == "scale" else 0.0
            tensors[branch_key(layer, part)] = torch.full(shape, fill, dtype=dtype)
    meta = SaladMeta(base_model=info.base_model, dim=info.dim, layers=info.num_layers, heads=info.num_heads)
    return SaladWeights(meta, tensors)


def save_salad_weights(weights: SaladWeights, path: str, overwrite: bool = False) -> str:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path}: Expected a new file name, got an existing file. Try another name or "
            "pass overwrite=True (the node's 'overwrite' switch)."
        )
    _check_tensors(weights.tensors, weights.meta, path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.tensors.items()}
    save_file(tensors, path, metadata=weights.meta.to_metadata())
    return path


def load_salad_weights(path: str) -> SaladWeights:
    if not os.path.isfile(path):
        raise SaladWeightsError(path, "an existing .safetensors file", "no such file", "putting the file in models/salad/")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaladWeightsError(
            path, "a readable safetensors file", f"unreadable data ({exc})",
            "re-downloading or re-exporting the file (it may be truncated)",
        ) from exc
    meta = SaladMeta.from_metadata(metadata, path)
    _check_tensors(tensors, meta, path)
    return SaladWeights(meta, tensors, source=path)


def _check_tensors(tensors: dict[str, torch.Tensor], meta: SaladMeta, source: str) -> None:
    shapes = branch_shapes(meta.dim)
    for layer in range(meta.layers):
        for part, shape in shapes.items():
            key = branch_key(layer, part)
            if key not in tensors:
                raise SaladWeightsError(source, f"tensor {key}", "nothing", "re-exporting the file with SALAD")
            if tuple(tensors[key].shape) != shape:
                raise SaladWeightsError(
                    source, f"{key} of shape {list(shape)} (salad.dim {meta.dim})",
                    list(tensors[key].shape), "weights made for this model width",
                )
    for key, value in tensors.items():
        if ".lora_" not in key:
            continue
        rank, dim = meta.lora_rank, meta.dim
        want = (rank, dim) if ".lora_A." in key else (dim, rank)
        if tuple(value.shape) != want:
            raise SaladWeightsError(
                source, f"{key} of shape {list(want)} (salad.lora_rank {rank}, salad.dim {dim})",
                list(value.shape), "re-exporting the file with SALAD",
            )
    extra = [k for k in tensors if not (k.startswith("blocks.") and ".salad." in k) and ".lora_" not in k]
    if extra:
        raise SaladWeightsError(source, "only SALAD branch and LoRA tensors", f"unexpected {extra[:3]}", "re-exporting the file with SALAD")
    layers_in_file = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")}
    if layers_in_file and max(layers_in_file) >= meta.layers:
        raise SaladWeightsError(
            source, f"blocks 0..{meta.layers - 1} (salad.layers {meta.layers})",
            f"block {max(layers_in_file)}", "re-exporting the file with SALAD",
        )
