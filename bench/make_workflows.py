"""Generate the shipped example workflows (UI + API format) from one description each.

    python bench/make_workflows.py          # rewrites workflows/*.json and workflows/api/*.json

UI files (workflows/*.json) are what ComfyUI lists as this pack's example workflows (template
browser) and what users drag onto the canvas; API files (workflows/api/*.json, out of reach of the
template scanner, whose glob is not recursive) are what scripts POST to /prompt. Both are written
from the same Graph, and tests/test_workflows.py checks the UI files against the live node
definitions and that converting each UI file gives its API file. Pure JSON: no ComfyUI needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.workflow_tools import API_DIR, WORKFLOWS_DIR, Graph  # noqa: E402

POSITIVE = ("A red fox trotting through fresh snow in a sunlit pine forest, soft morning light, "
            "tracking shot, cinematic, highly detailed")
# Wan2.1's reference negative prompt (the model was trained with it; stock ComfyUI templates use it too).
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
            "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
            "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
I2V_POSITIVE = "The subject slowly turns towards the camera and smiles, gentle wind, natural motion, cinematic"

SALAD_DEFAULTS = [("sparse_mode", "topk"), ("sparsity", 0.90), ("topk", 0), ("gate_drop_percentile", 0.0),
                  ("linear_scale", 1.0), ("dense_steps", 0), ("backend", "auto"),
                  ("gate_drop_plan", "top"), ("topk_query_block", "128")]

NOTE = """## SALAD for Wan2.1 — {title}

**SALAD Apply** swaps every self-attention layer for sparse attention (≈{sparsity:.0%} of attention blocks
skipped) plus a gated linear-attention branch. Bypass it (Ctrl+B) to sample dense with the same seed.

| widget | meaning |
|---|---|
| sparse_mode | `topk` (block top-k) or `st_swa` (spatial/temporal windows: per head from SALAD Calibrate, uniform otherwise) |
| sparsity | fraction of attention blocks skipped |
| topk | key blocks per query block (0 = from sparsity) |
| gate_drop_percentile | drop the linear branch in layers above this gate percentile (paper: 20) |
| linear_scale | global λ on the linear branch |
| dense_steps | first steps kept dense |
| backend | auto / triton / flex / torch |
| gate_drop_plan | which layers gate_drop_percentile drops: top (paper's best) / bottom / random |
| topk_query_block | topk: tokens per query block choosing key blocks, 128 (faster on Hopper) or 64 |

**SALAD Weights Loader**: `none (training-free)` or a trained file from `models/salad/`.
**SALAD Stats** reports the measured sparsity.

**Model files** (Comfy-Org/Wan_2.1_ComfyUI_repackaged):
- `models/diffusion_models/{model}`
- `models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors`
- `models/vae/wan_2.1_vae.safetensors`{extra}
"""


def build(kind: str, model: str, width: int, height: int, length: int, steps: int, title: str, prefix: str) -> Graph:
    g = Graph()
    i2v = kind == "i2v"
    unet = g.add("UNETLoader", [("unet_name", model), ("weight_dtype", "default")], outputs=[("MODEL", "MODEL")],
                 pos=(20, 80), size=(340, 82), title="Load Wan2.1 diffusion model")
    clip = g.add("CLIPLoader", [("clip_name", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("type", "wan"),
                                ("device", "default")], outputs=[("CLIP", "CLIP")], pos=(20, 200), size=(340, 106))
    vae = g.add("VAELoader", [("vae_name", "wan_2.1_vae.safetensors")], outputs=[("VAE", "VAE")],
                pos=(20, 350), size=(340, 58))
    weights = g.add("SaladWeightsLoader", [("weights_name", "none (training-free)")],
                    outputs=[("salad_weights", "SALAD_WEIGHTS"), ("info", "STRING")],
                    pos=(20, 450), size=(340, 80), title="SALAD Weights Loader")
    pos = g.add("CLIPTextEncode", [("text", I2V_POSITIVE if i2v else POSITIVE)], inputs=[("clip", "CLIP")],
                outputs=[("CONDITIONING", "CONDITIONING")], pos=(400, 80), size=(420, 180), title="Positive prompt")
    neg = g.add("CLIPTextEncode", [("text", NEGATIVE)], inputs=[("clip", "CLIP")],
                outputs=[("CONDITIONING", "CONDITIONING")], pos=(400, 300), size=(420, 180), title="Negative prompt")
    g.link(clip, "CLIP", pos, "clip")
    g.link(clip, "CLIP", neg, "clip")
    msd = g.add("ModelSamplingSD3", [("shift", 8.0)], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")],
                pos=(860, 80), size=(320, 58))
    g.link(unet, "MODEL", msd, "model")
    salad = g.add("SaladApply", SALAD_DEFAULTS, inputs=[("model", "MODEL"), ("salad_weights", "SALAD_WEIGHTS")],
                  outputs=[("MODEL", "MODEL")], pos=(860, 180), size=(320, 250), title="SALAD Apply")
    g.link(msd, "MODEL", salad, "model")
    g.link(weights, "salad_weights", salad, "salad_weights")
    ks = g.add("KSampler", [("seed", 42), ("steps", steps), ("cfg", 6.0), ("sampler_name", "uni_pc"),
                            ("scheduler", "simple"), ("denoise", 1.0)],
               inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                       ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")],
               pos=(1220, 80), size=(320, 262), extra_ui={"seed": "fixed"})
    g.link(salad, "MODEL", ks, "model")
    if i2v:
        img = g.add("LoadImage", [("image", "example.png")], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                    pos=(400, 720), size=(320, 320), title="Start image", extra_ui={"image": "image"})
        cvl = g.add("CLIPVisionLoader", [("clip_name", "clip_vision_h.safetensors")],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], pos=(20, 580), size=(340, 58))
        cve = g.add("CLIPVisionEncode", [("crop", "none")], inputs=[("clip_vision", "CLIP_VISION"), ("image", "IMAGE")],
                    outputs=[("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")], pos=(860, 720), size=(320, 78))
        g.link(cvl, "CLIP_VISION", cve, "clip_vision")
        g.link(img, "IMAGE", cve, "image")
        wan = g.add("WanImageToVideo", [("width", width), ("height", height), ("length", length), ("batch_size", 1)],
                    inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                            ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE")],
                    outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                    pos=(400, 520), size=(420, 170))
        g.link(pos, "CONDITIONING", wan, "positive")
        g.link(neg, "CONDITIONING", wan, "negative")
        g.link(vae, "VAE", wan, "vae")
        g.link(cve, "CLIP_VISION_OUTPUT", wan, "clip_vision_output")
        g.link(img, "IMAGE", wan, "start_image")
        g.link(wan, "positive", ks, "positive")
        g.link(wan, "negative", ks, "negative")
        g.link(wan, "latent", ks, "latent_image")
    else:
        lat = g.add("EmptyHunyuanLatentVideo", [("width", width), ("height", height), ("length", length),
                                                ("batch_size", 1)], outputs=[("LATENT", "LATENT")],
                    pos=(400, 520), size=(320, 130), title="Video size (width x height x frames)")
        g.link(pos, "CONDITIONING", ks, "positive")
        g.link(neg, "CONDITIONING", ks, "negative")
        g.link(lat, "LATENT", ks, "latent_image")
    dec = g.add("VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                pos=(1580, 80), size=(220, 46))
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    cv = g.add("CreateVideo", [("fps", 16.0)], inputs=[("images", "IMAGE"), ("audio", "AUDIO")],
               outputs=[("VIDEO", "VIDEO")], pos=(1580, 170), size=(220, 78))
    g.link(dec, "IMAGE", cv, "images")
    sv = g.add("SaveVideo", [("filename_prefix", prefix), ("format", "auto"), ("codec", "auto")],
               inputs=[("video", "VIDEO")], pos=(1830, 80), size=(520, 420))
    g.link(cv, "VIDEO", sv, "video")
    stats = g.add("SaladStats", inputs=[("model", "MODEL"), ("latent", "LATENT")],
                  outputs=[("plot", "IMAGE"), ("summary", "STRING")], pos=(1220, 400), size=(320, 100),
                  title="SALAD Stats")
    g.link(salad, "MODEL", stats, "model")
    g.link(ks, "LATENT", stats, "latent")
    prev = g.add("PreviewImage", inputs=[("images", "IMAGE")], pos=(1580, 300), size=(220, 260),
                 title="SALAD gates / sparsity")
    g.link(stats, "plot", prev, "images")
    extra = ("\n- `models/clip_vision/clip_vision_h.safetensors`\n- start image: any picture in `input/`"
             if i2v else "")
    g.add("MarkdownNote", [("text", NOTE.format(title=title, sparsity=0.9, model=model, extra=extra))],
          pos=(-420, 80), size=(420, 640), title="Read me")
    g.group("Models", 0, 0, 380, 560 if not i2v else 660)
    g.group("SALAD", 840, 0, 360, 460, color="#8a5a3f")
    return g


WORKFLOWS = {
    "salad_wan2.1_t2v_1.3B_480p": dict(kind="t2v", model="wan2.1_t2v_1.3B_fp16.safetensors", width=832, height=480,
                                       length=81, steps=30, title="Wan2.1 text-to-video 1.3B, 832x480x81"),
    "salad_wan2.1_t2v_14B_720p": dict(kind="t2v", model="wan2.1_t2v_14B_fp16.safetensors", width=1280, height=720,
                                      length=81, steps=30, title="Wan2.1 text-to-video 14B, 1280x720x81"),
    "salad_wan2.1_i2v_14B_480p": dict(kind="i2v", model="wan2.1_i2v_480p_14B_fp16.safetensors", width=832,
                                      height=480, length=81, steps=20, title="Wan2.1 image-to-video 14B, 832x480x81"),
}


def main() -> None:
    API_DIR.mkdir(parents=True, exist_ok=True)
    for name, kw in WORKFLOWS.items():
        g = build(prefix=f"video/{name}", **kw)
        for path, data in ((WORKFLOWS_DIR / f"{name}.json", g.to_ui(name)), (API_DIR / f"{name}.json", g.to_api())):
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"wrote {path.relative_to(WORKFLOWS_DIR.parent)}")


if __name__ == "__main__":
    main()
