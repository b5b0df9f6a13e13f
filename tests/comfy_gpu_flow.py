"""Run by tests/test_comfy_gpu_loading.py in a fresh process, so that ComfyUI runs in GPU mode
(the pytest harness forces CPU mode): one way a user's graph loads and samples a SALAD model,
on a tiny Wan2.1 with a live linear branch. Writes, as safetensors, the SALAD model's and the
dense model's final latents less the start noise (the models' part of them), and as JSON the
devices of SALAD's branch weights after sampling.

    python tests/comfy_gpu_flow.py FLOW OUT_DIR

FLOW: salad_first | dense_then_salad (the dense sampler loads the model first, as in a graph
that compares both) | lowvram (ComfyUI's --novram: weights stay on the CPU, cast per call) |
lowvram_then_dense (then the dense model samples and every model is unloaded) |
torch, fp32_torch (backend torch, bf16 or fp32 model: the references) | cfg, cfg_torch,
cfg_fp32_torch (cfg 5: cond and uncond batched) | fp8, fp8_torch (weights stored in fp8, as
UNETLoader's weight_dtype) | compiled (ComfyUI's torch.compile node, on SALAD and on dense).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOWS = ("salad_first", "dense_then_salad", "lowvram", "lowvram_then_dense", "torch", "fp32_torch", "cfg", "cfg_torch", "cfg_fp32_torch",
         "fp8", "fp8_torch", "compiled")


def main(flow: str, out: Path) -> None:
    if flow not in FLOWS:
        raise SystemExit(f"Expected a flow in {FLOWS}, got {flow!r}.")
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(REPO)]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    import torch

    args.cpu = not torch.cuda.is_available()  # a smoke run on a CPU machine
    args.novram = flow.startswith("lowvram")
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    from safetensors.torch import save_file

    from salad_core import SaladConfig, fresh_salad_weights, wan_info
    from salad_core.patch import apply_salad
    from salad_core.tiny_wan import WanShape, wan_state_dict

    if "fp32" in flow:  # a true fp32 reference: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float8_e4m3fn if flow.startswith("fp8") else torch.float32 if "fp32" in flow else torch.bfloat16
    # On the CPU, as a loaded file; std 0.2 (not 0.02): attention then moves the result, so SALAD does.
    # Every flow gets the same values (bf16-rounded), whatever dtype it computes in.
    sd = wan_state_dict(WanShape.tiny(), seed=0, dtype=torch.bfloat16, std=0.2, device="cpu")
    base = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    w = fresh_salad_weights(wan_info(base.model.diffusion_model))
    g = torch.Generator().manual_seed(0)
    w = type(w)(w.meta, {k: ((torch.randn(v.shape, generator=g) * 0.5).bfloat16().float() if ".salad." in k else v)
                         for k, v in w.tensors.items()}, "<random>").with_meta(block_size=16)
    backend = "torch" if flow.endswith("torch") else "auto"
    salad = apply_salad(base, SaladConfig(block_size=16, sparsity=0.75, backend=backend), w)  # model still on the CPU
    dense = base
    if flow == "compiled":
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        dense = base.clone()
        for model in (salad, dense):
            set_torch_compile_wrapper(model=model, backend="inductor")
    latent = torch.zeros(1, 16, 3, 16, 16)  # 192 tokens, 12 blocks
    pos, neg = [[torch.randn(1, 8, 4096, generator=g), {}]], [[torch.randn(1, 8, 4096, generator=g), {}]]
    cfg = 5.0 if flow.startswith("cfg") else 1.0
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(model):  # the model's part of the result: the final latent minus the start noise
        return comfy.sample.sample(model, noise, 2, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                   seed=0).float() - noise.float()

    if flow == "dense_then_salad":
        sample(base)
    result = {"salad": sample(salad).contiguous()}
    layers = [m for k, m in salad.object_patches.items() if k.endswith(".self_attn")]
    devices = sorted({str(p.device) for m in layers for p in m.salad.parameters()})
    pinned = {"salad_keys_pinned": sum(".salad." in k for k in salad.pinned), "keys_pinned": len(salad.pinned)}
    result["dense"] = sample(dense).contiguous()
    if flow == "lowvram_then_dense":
        comfy.model_management.unload_all_models()  # unpins every pinned weight by its key path
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / f"{flow}.safetensors"))
    (out / f"{flow}.json").write_text(json.dumps({"branch_devices": devices, **pinned}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
