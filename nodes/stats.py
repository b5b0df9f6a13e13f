"""SALAD Stats: what SALAD did in the last sampling run of a patched model (gates, sparsity,
dropped branches, attention time), as a PIL-drawn plot and a text summary."""

from __future__ import annotations

import os

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from salad_core.patch import salad_runtime
from salad_core.stats import RunSummary

from .apply import NODE_INFO_KEY, SaladNodeInfo

WIDTH, HEIGHT = 640, 420
BG, FG, GRID, MISSING, RED = (24, 24, 28), (225, 225, 225), (70, 70, 78), (60, 60, 66), (235, 70, 60)
# A small viridis-like ramp (dark blue -> green -> yellow).
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def ramp(t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(RAMP[i], RAMP[i + 1]))


def _fmt_layers(layers) -> str:
    return ", ".join(str(x) for x in layers) if layers else "none"


def summarize(runtime, info: SaladNodeInfo | None, s: RunSummary) -> str:
    cfg = runtime.config
    n = runtime.info.num_layers
    lines = [f"SALAD stats ({os.path.basename(runtime.source)}; {runtime.info.base_model})"]
    if cfg.windows is not None:
        mode = f"{cfg.sparse_mode}, calibrated windows ({cfg.block_size}-token blocks; the sparsity setting is unused)"
    else:
        mode = f"{cfg.sparse_mode}, target sparsity {cfg.sparsity:.2f}" + (f", topk {cfg.topk}" if cfg.topk else "")
        if cfg.sparse_mode == "topk":
            mode += f", {cfg.query_block}-token query blocks"
    measured = "n/a (no SALAD step ran)" if s.sparsity is None else f"{s.sparsity:.3f}"
    lines.append(f"mode: {mode}; measured sparsity: {measured}")
    lines.append(f"steps: {len(s.steps)} SALAD + {s.dense_steps} dense (dense_steps {cfg.dense_steps})")
    active = sorted(runtime.linear_layers)
    lines.append(f"linear branch active in {len(active)}/{n} layers: {_fmt_layers(active)}")
    if info is not None:
        drop = f"dropped by gate_drop_percentile {info.gate_drop_percentile:g}: {_fmt_layers(info.dropped)}"
        if info.drop_threshold is not None:
            drop += f" (calibrated gate >= {info.drop_threshold:.4f})"
        lines.append(drop)
        lines.append(f"inactive (zero projection, training-free/untrained): {_fmt_layers(info.zero_projection)}")
    else:
        lines.append(f"without linear branch: {_fmt_layers(sorted(set(range(n)) - set(active)))}")
    ms = [t for t in s.attention_ms if t is not None]
    if ms:
        per = ", ".join("-" if t is None else f"{t:.1f}" for t in s.attention_ms[:12])
        per += ", ..." if len(s.attention_ms) > 12 else ""
        lines.append(f"attention: {sum(ms) / len(ms):.2f} ms/step mean over SALAD steps (per step: {per})")
    else:
        lines.append("attention: not measured")
    means = s.gate_means()
    if any(m is not None for m in means):
        lines.append("gate per layer (mean over steps): " + ", ".join(
            f"L{i} {m:.4f}" for i, m in enumerate(means) if m is not None))
    if not s.steps and not s.dense_steps:
        lines.append("No sampling run recorded yet: connect the LATENT output of the KSampler that used this MODEL.")
    return "\n".join(lines)


def draw_plot(runtime, info: SaladNodeInfo | None, s: RunSummary) -> Image.Image:
    """Heat-map of the gate (layers x steps) above a per-layer bar chart with the drop threshold."""
    img = Image.new("RGB", (WIDTH, HEIGHT), BG)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    n = runtime.info.num_layers
    measured = "n/a" if s.sparsity is None else f"{s.sparsity:.3f}"
    d.text((10, 6), f"SALAD gate per layer and step  |  sparsity {measured}  |  "
                    f"{len(s.steps)} SALAD + {s.dense_steps} dense steps", fill=FG, font=font)

    values = [v for step in s.gates for v in step if v is not None]
    calibrated = list(info.gate_means) if info is not None and info.gate_means is not None else []
    scale_vals = values + calibrated + ([info.drop_threshold] if info and info.drop_threshold is not None else [])
    lo, hi = (min(scale_vals), max(scale_vals)) if scale_vals else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5e-3, hi + 0.5e-3

    def norm(v: float) -> float:
        return (v - lo) / (hi - lo)

    dropped = set(info.dropped) if info is not None else set()
    # --- heat-map: rows = layers, columns = SALAD steps ---------------------------------------
    x0, y0, x1, y1 = 60, 26, WIDTH - 80, 210
    d.text((8, y1 - 10), "layer", fill=FG, font=font)
    steps = max(1, len(s.gates))
    cw, rh = (x1 - x0) / steps, (y1 - y0) / max(1, n)
    for layer in range(n):
        for j in range(steps):
            v = s.gates[j][layer] if j < len(s.gates) else None
            color = MISSING if v is None else ramp(norm(v))
            d.rectangle([x0 + j * cw, y0 + layer * rh, x0 + (j + 1) * cw - 1, y0 + (layer + 1) * rh - 1], fill=color)
        if layer in dropped:
            d.line([x0, y0 + (layer + 0.5) * rh, x1, y0 + (layer + 0.5) * rh], fill=RED, width=1)
        if rh >= 10 or layer % max(1, round(10 / rh)) == 0:
            d.text((x0 - 22, y0 + layer * rh), str(layer), fill=FG, font=font)
    label_every = max(1, round(24 / cw))
    for j, step in enumerate(s.steps):
        if j % label_every == 0:
            d.text((x0 + j * cw + 2, y1 + 2), "?" if step is None else str(step), fill=FG, font=font)
    d.text((x0, y1 + 14), "sampling step (gray = branch not run; red line = dropped)", fill=FG, font=font)
    # colour bar
    for i in range(int(y1 - y0)):
        d.line([x1 + 12, y1 - i, x1 + 24, y1 - i], fill=ramp(i / max(1, y1 - y0 - 1)))
    d.text((x1 + 28, y0), f"{hi:.3f}", fill=FG, font=font)
    d.text((x1 + 28, y1 - 10), f"{lo:.3f}", fill=FG, font=font)

    # --- bars: gate per layer (this run's mean; calibrated as a tick) + drop threshold --------
    bx0, by0, bx1, by1 = 60, 250, WIDTH - 80, HEIGHT - 30
    d.rectangle([bx0, by0, bx1, by1], outline=GRID)
    means = s.gate_means()
    bw = (bx1 - bx0) / max(1, n)

    def y_of(v: float) -> float:
        return by1 - norm(v) * (by1 - by0)

    for layer in range(n):
        m = means[layer] if layer < len(means) else None
        if m is not None:
            d.rectangle([bx0 + layer * bw + 1, y_of(m), bx0 + (layer + 1) * bw - 2, by1],
                        fill=RED if layer in dropped else ramp(norm(m)))
        if layer < len(calibrated):
            yc = y_of(calibrated[layer])
            d.line([bx0 + layer * bw + 1, yc, bx0 + (layer + 1) * bw - 2, yc],
                   fill=RED if layer in dropped else FG, width=2)
    if info is not None and info.gate_drop_percentile > 0 and info.drop_threshold is not None:
        yt = y_of(info.drop_threshold)
        for xs in range(bx0, bx1, 8):  # dashed
            d.line([xs, yt, min(xs + 4, bx1), yt], fill=RED, width=1)
        d.text((bx1 + 4, yt - 5), f"drop {info.gate_drop_percentile:g}%", fill=RED, font=font)
    d.text((bx0, by0 - 14), "mean gate per layer (bar: this run, tick: calibrated)", fill=FG, font=font)
    d.text((bx0, by1 + 4), f"layers 0..{n - 1}", fill=FG, font=font)
    if not values:
        d.text((bx0 + 10, by0 + 10), "no linear branch ran (training-free / zero projection / all dropped)",
               fill=FG, font=font)
    return img


def image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]  # [1, H, W, 3]


class SaladStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaladStats",
            display_name="SALAD Stats",
            category="SALAD",
            description=(
                "Shows what SALAD did in the sampling run that produced `latent`: gate value per layer and "
                "step, measured sparsity, dropped linear branches, dense steps and attention time."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of SALAD Apply (the one going into KSampler)."),
                io.Latent.Input("latent", tooltip="The KSampler output; makes this node run after sampling."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="Gate per layer across steps, with the drop threshold."),
                io.String.Output(display_name="summary", tooltip="Sparsity, dropped layers, dense steps, timings."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        runtime = salad_runtime(model) if hasattr(model, "get_attachment") else None
        if runtime is None:
            raise ValueError(
                "Expected a MODEL from SALAD Apply on the model input, got a MODEL without a SALAD patch. "
                "Try connecting the MODEL output of SALAD Apply (the same one that goes into KSampler)."
            )
        if not isinstance(latent, dict) or "samples" not in latent:
            raise ValueError(
                f"Expected a LATENT (the KSampler output) on the latent input, got {type(latent).__name__}. "
                "Try connecting the KSampler's LATENT output."
            )
        info = model.get_attachment(NODE_INFO_KEY)
        summary = runtime.stats.summary()
        text = summarize(runtime, info, summary)
        image = image_tensor(draw_plot(runtime, info, summary))
        ui_out = {**ui.PreviewImage(image, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(image, text, ui=ui_out)
