"""The toy Wan2.1 (issue 10): ComfyUI's own WanModel at small size, built through ComfyUI's
loader from a state dict (``comfy.sd.load_diffusion_model_state_dict``, what UNETLoader calls),
so model detection, the block code, RoPE and the timestep path are exactly Wan's.

Sizes: ``toy`` = dim 512 (4 heads of 128), ffn 768, 8 layers (~27.6M parameters, ~53 MiB bf16);
``micro`` = dim 256 (2 heads), ffn 512, 2 layers, for CPU tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from salad_core.tiny_wan import WanShape, wan_state_dict  # noqa: E402

SHAPES = {
    "toy": WanShape(dim=512, ffn_dim=768, num_layers=8),
    "micro": WanShape(dim=256, ffn_dim=512, num_layers=2),
}
INIT_STD = 0.02


def setup_comfy(cpu: bool | None = None) -> None:
    """Make ComfyUI importable (COMFYUI_PATH, else .comfy-carry/ComfyUI, else .comfy/ComfyUI)
    without parsing argv; CPU mode when there is no CUDA. A no-op when comfy is imported."""
    if "comfy.model_management" in sys.modules:
        return
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        for cand in (ROOT / ".comfy-carry" / "ComfyUI", ROOT / ".comfy" / "ComfyUI"):
            if (cand / "comfy").is_dir():
                root = str(cand)
                break
    if root and root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    if cpu if cpu is not None else not torch.cuda.is_available():
        from comfy.cli_args import args

        args.cpu = True


def init_state_dict(shape: WanShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh weights for pretraining from scratch: ``wan_state_dict`` (N(0, 0.02), norms ~1),
    but the output head zero-initialised so the first prediction is 0 (stable start)."""
    sd = wan_state_dict(shape, seed=seed, std=INIT_STD)
    sd["head.head.weight"].zero_()
    sd["head.head.bias"].zero_()
    return sd


def load_toy(state_dict: dict[str, torch.Tensor], device=None, dtype: torch.dtype = torch.float32):
    """(WanModel on ``device`` in ``dtype``, model_sampling), through ComfyUI's loader."""
    setup_comfy()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options={"dtype": dtype})
    if patcher is None:
        raise ValueError("ComfyUI did not detect the toy state dict as a Wan model.")
    dm = patcher.model.diffusion_model
    # ComfyUI may keep weights on its offload device and skip init; load the exact values.
    dm.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)
    if device is not None:
        dm.to(device)
    return dm, patcher.model.model_sampling


def model_state(dm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusion model's parameters as a plain state dict (keys as in a Wan file)."""
    return {k: v.detach() for k, v in dm.state_dict().items()}


def velocity(dm, x, sigma, context, multiplier: float = 1000.0, transformer_options=None):
    """Wan's prediction v = noise - x0 for x_sigma (as ComfyUI's BaseModel calls the model)."""
    dtype = next(dm.parameters()).dtype
    t = (sigma * multiplier).float()
    return dm(x.to(dtype), t, context.to(dtype), transformer_options=transformer_options or {}).float()
