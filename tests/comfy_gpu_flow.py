"""Run by tests/test_comfy_gpu_loading.py in a fresh process, so that ComfyUI runs in GPU mode
(the pytest harness forces CPU mode): one way a user's graph loads a SALAD model, on a tiny
Wan2.1 with a live linear branch. Writes the final latent (safetensors) and the devices of
SALAD's branch weights after sampling (JSON).

    python tests/comfy_gpu_flow.py FLOW OUT_DIR      # FLOW: salad_first | dense_then_salad | lowvram
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(flow: str, out: Path) -> None:
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    import torch

    args.cpu = not torch.cuda.is_available()  # a smoke run on a CPU machine
    args.novram = flow == "lowvram"  # every ComfyUI-cast weight stays on the CPU, cast per call
    import comfy.sample
    import comfy.sd
    from safetensors.torch import save_file

    from salad_core import SaladConfig, fresh_salad_weights, wan_info
    from salad_core.patch import apply_salad
    from salad_core.tiny_wan import WanShape, wan_state_dict

    sd = wan_state_dict(WanShape.tiny(), seed=0, dtype=torch.bfloat16, device="cpu")  # a loaded file: on the CPU
    base = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    w = fresh_salad_weights(wan_info(base.model.diffusion_model))
    g = torch.Generator().manual_seed(0)
    w = type(w)(w.meta, {k: (torch.randn(v.shape, generator=g) * 0.05 if ".salad." in k else v) for k, v in w.tensors.items()},
                "<random>")
    salad = apply_salad(base, SaladConfig(block_size=16, sparsity=0.5), w)  # the model is still on the CPU
    latent = torch.zeros(1, 16, 3, 8, 8)
    cond = [[torch.randn(1, 8, 4096, generator=g), {}]]

    def sample(model):
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 1.0, "euler", "simple", cond, cond,
                                   latent, disable_pbar=True, seed=0)

    if flow == "dense_then_salad":  # one graph comparing both: the dense sampler loads the model first
        sample(base)
    final = sample(salad)
    devices = sorted({str(p.device) for m in salad.object_patches.values() for p in m.salad.parameters()})
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latent": final.float().contiguous()}, str(out / f"{flow}.safetensors"))
    (out / f"{flow}.json").write_text(json.dumps({"branch_devices": devices}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
