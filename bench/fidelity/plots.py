"""Comparison chart of issue 10 (PIL, like salad_core.plots): per case, held-out flow-matching
loss and the final latent's relative L2 vs the dense model, as horizontal bars."""

from __future__ import annotations

from PIL import Image, ImageDraw

from salad_core.plots import _font

ROW_H, LABEL_W, PANEL_W, TOP, PAD = 22, 190, 330, 56, 16
FAMILY_RGB = {  # bar colour by variant family
    "dense": (90, 90, 90), "sparse_only": (214, 39, 40), "lora": (31, 119, 180),
    "salad": (44, 160, 44), "dense_lora": (148, 103, 189),
}


def _family(case: str) -> str:
    for name in ("dense_lora", "sparse_only", "lora", "salad", "dense"):
        if case.startswith(name):
            return name
    return "dense"


def compare_chart(rows: list[tuple[str, float | None, float | None]], title: str) -> Image.Image:
    """rows: (case, fm_loss, rel_l2) in display order; a None value draws no bar."""
    width = LABEL_W + 2 * (PANEL_W + PAD) + PAD
    height = TOP + ROW_H * len(rows) + 40
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((PAD, 10), title, fill=(30, 30, 30), font=_font(15))
    font = _font(12)
    for col, (name, idx) in enumerate((("held-out flow-matching loss (lower is better)", 1),
                                       ("rel. L2 of final latent vs dense (lower is better)", 2))):
        x0 = LABEL_W + PAD + col * (PANEL_W + PAD)
        values = [r[idx] for r in rows if r[idx] is not None]
        top = max(values) * 1.25 if values and max(values) > 0 else 1.0  # the dense row alone is all zeros
        draw.text((x0, TOP - 22), name, fill=(30, 30, 30), font=font)
        draw.line([(x0, TOP - 4), (x0, TOP + ROW_H * len(rows))], fill=(30, 30, 30))
        for i, row in enumerate(rows):
            y = TOP + i * ROW_H
            if col == 0:
                draw.text((PAD, y + 4), row[0], fill=(30, 30, 30), font=font)
            v = row[idx]
            if v is None:
                continue
            length = int((PANEL_W - 60) * v / top)
            draw.rectangle([x0 + 1, y + 3, x0 + 1 + length, y + ROW_H - 4], fill=FAMILY_RGB[_family(row[0])])
            draw.text((x0 + length + 5, y + 4), f"{v:.4f}", fill=(30, 30, 30), font=font)
    legend_y = TOP + ROW_H * len(rows) + 12
    x = PAD
    for fam, rgb in FAMILY_RGB.items():
        draw.rectangle([x, legend_y + 2, x + 12, legend_y + 14], fill=rgb)
        draw.text((x + 16, legend_y), fam, fill=(30, 30, 30), font=font)
        x += 30 + 8 * len(fam)
    return img
