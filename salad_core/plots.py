"""Calibration plots drawn with PIL (no matplotlib): gate quintiles across steps (the paper's
Fig. 9 analogue), ST-SWA window / head-type heat-map, measured sparsity per layer. Every plot has
the same size so they batch into one ComfyUI IMAGE."""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw, ImageFont

SIZE = (960, 540)
MARGIN = (70, 50, 30, 60)  # left, top, right, bottom
BG, FG, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
LINE_COLORS = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (214, 39, 40), (148, 103, 189)]
SPATIAL_RGB, TEMPORAL_RGB = (31, 119, 180), (230, 120, 20)


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _canvas(title: str):
    img = Image.new("RGB", SIZE, BG)
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN[0], 14), title, fill=FG, font=_font(18))
    return img, draw


def _plot_box():
    return MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]


def _axes(draw, x_label: str, y_label: str, y_min: float, y_max: float, y_ticks: int = 5):
    x0, y0, x1, y1 = _plot_box()
    font = _font(12)
    for i in range(y_ticks + 1):
        val = y_min + (y_max - y_min) * i / y_ticks
        y = y1 - (y1 - y0) * i / y_ticks
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((6, y - 7), f"{val:.3g}", fill=FG, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=FG)
    draw.text(((x0 + x1) // 2 - 40, SIZE[1] - 24), x_label, fill=FG, font=_font(14))
    draw.text((6, y0 - 22), y_label, fill=FG, font=_font(12))


def gate_quantile_plot(quantiles: list[dict[str, float]], thresholds: dict[str, float] | None = None) -> Image.Image:
    """Percentiles of the gate over layers (and prompts) per sampling step; dashed: their
    average over steps (the stored thresholds)."""
    img, draw = _canvas("SALAD gate percentiles across sampling steps")
    keys = sorted(quantiles[0], key=float) if quantiles else []
    values = [q[k] for q in quantiles for k in keys] + list((thresholds or {}).values())
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(1e-3, 0.1 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1.0 else hi + pad
    _axes(draw, "sampling step", "gate", lo, hi)
    x0, y0, x1, y1 = _plot_box()
    n = len(quantiles)

    def xy(step, val):
        x = x0 + (x1 - x0) * (step / max(1, n - 1) if n > 1 else 0.5)
        return x, y1 - (y1 - y0) * (val - lo) / max(1e-12, hi - lo)

    font = _font(12)
    for s in range(n):
        if n <= 25 or s % max(1, n // 10) == 0:
            draw.text((xy(s, lo)[0] - 4, y1 + 6), str(s), fill=FG, font=font)
    for i, key in enumerate(keys):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        pts = [xy(s, q[key]) for s, q in enumerate(quantiles)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=3)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if thresholds and key in thresholds:
            _, y = xy(0, thresholds[key])
            for xs in range(int(x0), int(x1), 14):
                draw.line([(xs, y), (min(xs + 7, x1), y)], fill=color, width=1)
        draw.text((x1 - 150, y0 + 8 + 18 * i), f"p{key}  avg {thresholds.get(key, float('nan')) if thresholds else float('nan'):.4f}",
                  fill=color, font=_font(13))
    return img


def window_heatmap(windows, n_blocks: int, block_size: int) -> Image.Image:
    """Layers (rows) x heads (columns); blue = spatial, orange = temporal; darker = wider window
    (label: radius in blocks)."""
    img, draw = _canvas(f"ST-SWA windows per layer/head (radius in blocks of {block_size}; max {n_blocks - 1} = dense)")
    x0, y0, x1, y1 = _plot_box()
    x1 -= 140
    layers, heads = len(windows), max(len(w) for w in windows)
    cw, ch = (x1 - x0) / heads, (y1 - y0) / layers
    font = _font(max(8, min(13, int(min(cw, ch) * 0.45))))
    full = max(1, n_blocks - 1)
    for li, row in enumerate(windows):
        for hi, w in enumerate(row):
            r = -(-w.window // block_size)
            t = min(1.0, r / full) ** 0.5
            base = TEMPORAL_RGB if w.kind == "temporal" else SPATIAL_RGB
            color = tuple(int(255 - (255 - c) * (0.15 + 0.85 * t)) for c in base)
            box = [x0 + hi * cw, y0 + li * ch, x0 + (hi + 1) * cw - 1, y0 + (li + 1) * ch - 1]
            draw.rectangle(box, fill=color)
            if cw >= 18 and ch >= 12:
                draw.text((box[0] + 2, box[1] + 1), str(r), fill=FG if t < 0.6 else BG, font=font)
        if layers <= 40 and (layers <= 20 or li % 2 == 0):
            draw.text((x0 - 28, y0 + li * ch + ch / 2 - 7), str(li), fill=FG, font=_font(11))
    for hi in range(heads):
        if heads <= 24 or hi % 2 == 0:
            draw.text((x0 + hi * cw + cw / 2 - 4, y1 + 6), str(hi), fill=FG, font=_font(11))
    draw.text(((x0 + x1) // 2 - 20, SIZE[1] - 24), "head", fill=FG, font=_font(14))
    draw.text((6, y0 - 22), "layer", fill=FG, font=_font(12))
    lx = x1 + 20
    for i, (name, base) in enumerate((("spatial", SPATIAL_RGB), ("temporal", TEMPORAL_RGB))):
        draw.rectangle([lx, y0 + 30 * i, lx + 20, y0 + 30 * i + 20], fill=base)
        draw.text((lx + 28, y0 + 30 * i + 3), name, fill=FG, font=_font(13))
    kinds = [w.kind for row in windows for w in row]
    draw.text((lx, y0 + 70), f"{kinds.count('temporal')}/{len(kinds)} temporal", fill=FG, font=_font(12))
    return img


def sparsity_bars(sparsity: list[float], target: float | None = None, title: str | None = None) -> Image.Image:
    """Measured sparsity (fraction of token pairs skipped) per layer."""
    mean = sum(sparsity) / len(sparsity) if sparsity else 0.0
    img, draw = _canvas(title or f"Measured ST-SWA sparsity per layer (mean {mean:.3f})")
    _axes(draw, "layer", "sparsity", 0.0, 1.0)
    x0, y0, x1, y1 = _plot_box()
    n = len(sparsity)
    bw = (x1 - x0) / max(1, n)
    for i, s in enumerate(sparsity):
        top = y1 - (y1 - y0) * max(0.0, min(1.0, s))
        draw.rectangle([x0 + i * bw + 1, top, x0 + (i + 1) * bw - 2, y1], fill=SPATIAL_RGB)
        if n <= 40 and (n <= 20 or i % 2 == 0):
            draw.text((x0 + i * bw + bw / 2 - 4, y1 + 6), str(i), fill=FG, font=_font(11))
    for val, color, label in ((mean, (40, 40, 40), "mean"), (target, (214, 39, 40), "target")):
        if val is None:
            continue
        y = y1 - (y1 - y0) * val
        draw.line([(x0, y), (x1, y)], fill=color, width=2)
        draw.text((x1 - 110, y - 16), f"{label} {val:.3f}", fill=color, font=_font(12))
    return img


def to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> ComfyUI IMAGE [B, H, W, 3] float in [0, 1]."""
    if not images:
        return torch.zeros(1, 64, 64, 3)
    arrays = [torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(im.height, im.width, 3) for im in images]
    return torch.stack(arrays).float() / 255.0


def save_pngs(images: dict[str, Image.Image], folder: str, prefix: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, im in images.items():
        path = os.path.join(folder, f"{prefix}_{name}.png")
        im.save(path)
        paths.append(path)
    return paths
