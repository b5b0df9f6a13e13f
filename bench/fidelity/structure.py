"""Attention structure of the toy (issue 10, item 1): per layer and head, the share of dense
attention mass that the top 10% of key blocks capture.

Definition. For head h, query token i and key block b, P[i, b] = sum over keys j in b of
softmax_j(q_i . k_j / sqrt(d)). The block map A[a, b] is the mean of P[i, b] over the queries i
in query block a (rows sum to 1). share(h) = mean over a of the sum of the ceil(10% x n_blocks)
largest A[a, :] -- the attention mass an oracle Top-K at 90% sparsity keeps. Uniform attention
gives 0.10, perfectly block-local attention 1.0. Computed in query chunks from q and k: no
[N, N] tensor (at most [chunk, N] per head). Also reported: ``frame_share``, the mass on keys
of the query's own latent frame (spatial locality; uniform = 1/T).
"""

from __future__ import annotations

import math

import torch

from salad_core.calibrate.run import CaptureSelfAttention
from salad_core.config import SaladConfig
from salad_core.runtime import CALL_KEY, CallInfo, SaladRuntime
from salad_core.wan import wan_info

TOP_FRACTION = 0.1


def block_attention_map(q: torch.Tensor, k: torch.Tensor, block_size: int, chunk: int = 1024,
                        frame_tokens: int | None = None):
    """q, k: [H, N, D]. Returns (A [H, nb, nb] fp32, frame_share [H] or None). The last block
    may be partial (N need not be a multiple of block_size)."""
    h, n, d = q.shape
    nb = math.ceil(n / block_size)
    key_block = torch.arange(n, device=q.device) // block_size
    out = torch.zeros(h, nb, nb, device=q.device, dtype=torch.float32)
    frame_mass = torch.zeros(h, device=q.device, dtype=torch.float32)
    kf = k.float()
    for s in range(0, n, chunk):
        qc = q[:, s:s + chunk].float()
        p = torch.softmax(qc @ kf.transpose(1, 2) / math.sqrt(d), dim=-1)  # [H, c, N]
        per_block = torch.zeros(h, p.shape[1], nb, device=q.device, dtype=torch.float32)
        per_block.index_add_(2, key_block, p)
        qb = key_block[s:s + chunk]
        out.index_add_(1, qb, per_block)
        if frame_tokens:
            qf = torch.arange(s, s + p.shape[1], device=q.device) // frame_tokens
            kf_id = torch.arange(n, device=q.device) // frame_tokens
            same = (qf[:, None] == kf_id[None, :]).float()
            frame_mass += (p * same).sum(dim=(1, 2))
    counts = torch.bincount(key_block, minlength=nb).float()
    out /= counts[None, :, None]
    return out, (frame_mass / n if frame_tokens else None)


def top_share(block_map: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """[..., nb, nb] -> [...]: mean over rows of the mass in the ceil(fraction x nb) largest blocks."""
    kk = max(1, math.ceil(fraction * block_map.shape[-1]))
    return block_map.topk(kk, dim=-1).values.sum(-1).mean(-1)


def capture_qk(dm, x, sigma, context, multiplier: float = 1000.0):
    """Run the (dense) model once; returns per layer (q, k) [B, H, N, D] as SALAD sees them
    (``SaladSelfAttention.qkv``: q/k norm + RoPE). The output is the stock dense model's."""
    import comfy.ldm.flux.math

    info = wan_info(dm, "the toy model")
    runtime = SaladRuntime(SaladConfig(backend="torch"), info, frozenset(), "structure")
    runtime.stats.active = False
    captured = {}

    def sink(layer, q, k, v, call):
        captured[layer] = (q.detach(), k.detach())

    stock = [b.self_attn for b in dm.blocks]
    try:
        for i, b in enumerate(dm.blocks):
            b.self_attn = CaptureSelfAttention(stock[i], i, runtime, comfy.ldm.flux.math.apply_rope1, sink)
        dtype = next(dm.parameters()).dtype
        with torch.no_grad():
            dm(x.to(dtype), (sigma * multiplier).float(), context.to(dtype),
               transformer_options={CALL_KEY: CallInfo()})
    finally:
        for b, s in zip(dm.blocks, stock):
            b.self_attn = s
    return [captured[i] for i in range(len(dm.blocks))]


def measure(dm, ds, clips=(0, 1), sigmas=(0.3, 0.7), block_size: int = 64, seed: int = 0, chunk: int = 1024):
    """Per layer: {"layer", "top10_share" (mean over heads, clips, sigmas), "head_top10",
    "frame_share", "head_frame"}; plus the mean block maps [L, H, nb, nb] for the heat map."""
    from salad_core.train.losses import sample_noise

    device = next(dm.parameters()).device
    frames, gh, gw = ds.spec.grid
    sums, maps, n = None, None, 0
    for c in clips:
        item = ds[c]
        x0 = item["latent"][None].to(device)
        ctx = item["context"][None].to(device)
        for j, sg in enumerate(sigmas):
            noise, _ = sample_noise(tuple(x0.shape[1:]), 10_000 + 97 * c + j, seed)
            sigma = torch.tensor([sg], device=device)
            x = sg * noise[None].to(device) + (1 - sg) * x0
            qk = capture_qk(dm, x, sigma, ctx)
            layer_maps, shares, frames_s = [], [], []
            for q, k in qk:
                a, fs = block_attention_map(q[0], k[0], block_size, chunk, frame_tokens=gh * gw)
                layer_maps.append(a)
                shares.append(top_share(a))
                frames_s.append(fs)
            stacked = torch.stack(layer_maps)  # [L, H, nb, nb]
            vals = torch.stack([torch.stack(shares), torch.stack(frames_s)])  # [2, L, H]
            maps = stacked if maps is None else maps + stacked
            sums = vals if sums is None else sums + vals
            n += 1
    sums, maps = (sums / n).cpu(), (maps / n).cpu()
    rows = [{"layer": i, "top10_share": float(sums[0, i].mean()), "head_top10": [round(float(v), 4) for v in sums[0, i]],
             "frame_share": float(sums[1, i].mean()), "head_frame": [round(float(v), 4) for v in sums[1, i]]}
            for i in range(sums.shape[1])]
    return rows, maps


def heatmap_png(maps: torch.Tensor, path, rows=None, cell: int = 3, title: str = "") -> str:
    """Grid of block maps (layers down, heads across), log colour scale, with labels."""
    from PIL import Image, ImageDraw

    L, H, nb, _ = maps.shape
    side = nb * cell
    pad, top, left = 6, 18, 120
    img = Image.new("RGB", (left + H * (side + pad) + pad, top + L * (side + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title or "block attention maps (rows: layers, cols: heads; log scale)", fill="black")
    logm = torch.log10(maps.clamp_min(1e-4))
    lo, hi = -4.0, 0.0
    for li in range(L):
        y = top + li * (side + pad)
        label = f"L{li}"
        if rows:
            label += f" top10 {rows[li]['top10_share']:.2f}"
        draw.text((4, y + side // 2 - 5), label, fill="black")
        for hi_ in range(H):
            v = ((logm[li, hi_] - lo) / (hi - lo)).clamp(0, 1)
            r = (255 * v.clamp(0, 1)).to(torch.uint8)
            g = (255 * (v * 1.5 - 0.5).clamp(0, 1)).to(torch.uint8)
            b = (255 * (0.6 - v).clamp(0, 1)).to(torch.uint8)
            rgb = torch.stack([r, g, b], -1).numpy()
            tile = Image.fromarray(rgb, "RGB").resize((side, side), Image.NEAREST)
            img.paste(tile, (left + hi_ * (side + pad), y))
    draw.text((4, img.height - 14), "colour: log10 mass per block, 1e-4 (dark) .. 1 (yellow)", fill="black")
    img.save(str(path))
    return str(path)
