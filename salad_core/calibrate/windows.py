"""ST-SWA window calibration math (paper A.1.1): pure torch, no ComfyUI.

For one attention call (q, k, v of a layer, [B, H, N, D]) ``band_errors`` measures, per sample,
head, token order (spatial / temporal) and candidate window radius r (in blocks), the squared
error of ST-SWA attention against dense attention, for every candidate at once and without an
[N, N] tensor: query tokens are processed in chunks; for each chunk the softmax numerators are
reduced per key block (``o_b[t, j] = sum_{key in block j} p[t, key] v[key]``, ``l_b[t, j]``), then
per "ring" of key blocks (the blocks a radius adds over the previous candidate), and a cumulative
sum over rings gives the banded (windowed) output for each radius. One shift (the row max) is
used for every block, so no subtraction ever happens (no cancellation); a band whose whole
softmax mass underflows is scored as an infinite error (the calibration then picks a wider
window, the safe side).

``WindowErrors`` accumulates those errors over calls (steps x prompts); ``select_by_delta`` and
``select_by_sparsity`` turn them into per-head ``HeadWindow``s. See the package docstring for the
RSE definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import HEAD_KINDS, HeadWindow

KIND_SPATIAL, KIND_TEMPORAL = 0, 1
DEFAULT_MAX_CANDIDATES = 64
# Windows are chosen to stay within delta * (1 - headroom) on the calibration prompts, so that
# held-out prompts (whose worst head error varies by a few percent) stay within delta.
DEFAULT_HEADROOM = 0.1
# Score-buffer budget per chunk (fp32 elements): [T, N] scores and [T, n_blocks, D] block sums.
CHUNK_ELEMENTS = 1 << 25


def candidate_radii(n_blocks: int, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> list[int]:
    """Window radii (in blocks, each side) to try: every radius 1 .. n_blocks - 1 (the last is
    dense) when there are at most ``max_candidates``; otherwise every radius up to 16, then a
    geometric grid, always ending at the dense radius."""
    full = n_blocks - 1
    if full < 1:
        return [1]
    if full <= max_candidates:
        return list(range(1, full + 1))
    head = list(range(1, 17))
    rest = max_candidates - len(head)
    ratio = (full / 16) ** (1.0 / rest)
    out = set(head)
    for i in range(1, rest + 1):
        out.add(min(full, max(17, round(16 * ratio**i))))
    out.add(full)
    return sorted(out)


def band_density(n_blocks: int, radius: int) -> float:
    """Fraction of (query block, key block) pairs a band |i - j| <= radius keeps."""
    r = min(radius, n_blocks - 1)
    return (n_blocks * (2 * r + 1) - r * (r + 1)) / n_blocks**2


def position_major_order(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """int64 [N]: working position p of a temporal head holds original token order[p]."""
    frames, height, width = grid
    return torch.arange(frames * height * width, device=device).view(frames, height * width).t().reshape(-1)


@torch.no_grad()
def band_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    block_size: int,
    radii: list[int],
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors of ST-SWA vs dense attention for every candidate radius.

    q, k, v: [B, H, N, D] (RoPE'd q, k), N == frames * height * width of ``grid``.
    Returns (err fp64 [B, H, 2, K]: sum over tokens of ||O_r - O_dense||^2 per order
    (0 spatial, 1 temporal) and radius ``radii[k]``; ref fp64 [B, H]: sum of ||O_dense||^2).
    """
    b, h, n, d = q.shape
    if grid[0] * grid[1] * grid[2] != n:
        raise ValueError(
            f"Expected the latent grid {grid} to cover the {n} tokens of the attention call, got "
            f"{grid[0] * grid[1] * grid[2]}. Try a plain Wan2.1 t2v/i2v model without extra tokens."
        )
    device = q.device
    nb = (n + block_size - 1) // block_size
    radii_t = torch.tensor(radii, device=device)
    ring_of_dist = torch.searchsorted(radii_t, torch.arange(nb, device=device))  # dist -> ring
    ring_of_dist = ring_of_dist.clamp(max=len(radii) - 1)
    n_rings = len(radii)
    scale = d**-0.5
    pad = nb * block_size - n
    natural = torch.arange(n, device=device)
    orders = [natural, position_major_order(grid, device)]
    # working position of each original token, per order
    positions = [torch.empty_like(o).scatter_(0, o, natural) for o in orders]
    chunk = max(1, min(n, chunk_elements // max(n + nb * d * 2, 1)))

    err = torch.zeros(b, h, 2, n_rings, dtype=torch.float64, device=device)
    ref = torch.zeros(b, h, dtype=torch.float64, device=device)
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh = q[bi, hi].float(), k[bi, hi].float(), v[bi, hi].float()
            v_blocks = []
            for order in orders:
                vw = vh[order]
                vw = torch.nn.functional.pad(vw, (0, 0, 0, pad)) if pad else vw
                v_blocks.append(vw.view(nb, block_size, d))
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                s = (qh[start:stop] @ kh.t()) * scale  # [T, N]
                p = torch.exp(s - s.amax(-1, keepdim=True))
                del s
                dense = None
                for kind, order in enumerate(orders):
                    pw = p[:, order]
                    pw = torch.nn.functional.pad(pw, (0, pad)) if pad else pw
                    pw = pw.view(stop - start, nb, block_size)
                    l_b = pw.sum(-1)  # [T, nb]
                    o_b = torch.einsum("tjs,jsd->tjd", pw, v_blocks[kind])  # [T, nb, D]
                    del pw
                    q_block = positions[kind][start:stop] // block_size  # [T]
                    dist = (q_block[:, None] - torch.arange(nb, device=device)[None]).abs()
                    ring = ring_of_dist[dist]  # [T, nb]
                    onehot = torch.nn.functional.one_hot(ring, n_rings).to(o_b.dtype).transpose(1, 2)  # [T, K, nb]
                    band_o = torch.bmm(onehot, o_b).cumsum(1)  # [T, K, D]
                    band_l = torch.bmm(onehot, l_b[..., None]).squeeze(-1).cumsum(1)  # [T, K]
                    del o_b, onehot
                    out = band_o / band_l[..., None]
                    if dense is None:
                        dense = out[:, -1]  # the last radius is dense
                        ref[bi, hi] += dense.double().pow(2).sum()
                    e = (out - dense[:, None]).double().pow(2).sum(-1)  # [T, K]
                    e = torch.where(band_l > 0, e, torch.full_like(e, math.inf))
                    err[bi, hi, kind] += e.sum(0)
                del p
    return err, ref


class WindowErrors:
    """RSE (percent, see package docstring) per layer, head, order and radius, accumulated over
    calibration calls: the worst call (``rse_max``) and the mean (``rse_mean``)."""

    def __init__(self, num_layers: int, num_heads: int, n_blocks: int, block_size: int, grid, radii: list[int]):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.n_blocks, self.block_size, self.grid = n_blocks, block_size, tuple(grid)
        self.radii = list(radii)
        shape = (num_layers, num_heads, 2, len(radii))
        self.rse_max = torch.zeros(shape, dtype=torch.float64)
        self.rse_sum = torch.zeros(shape, dtype=torch.float64)
        self.calls = [0] * num_layers

    def add(self, layer: int, err: torch.Tensor, ref: torch.Tensor) -> None:
        """err [B, H, 2, K], ref [B, H] from ``band_errors``: one call of ``layer``."""
        rse = 100.0 * err.cpu() / ref.cpu().clamp_min(1e-30)[..., None, None]
        self.rse_max[layer] = torch.maximum(self.rse_max[layer], rse.amax(0))
        self.rse_sum[layer] += rse.sum(0)
        self.calls[layer] += rse.shape[0]

    @property
    def rse_mean(self) -> torch.Tensor:
        calls = torch.tensor(self.calls, dtype=torch.float64).clamp_min(1)
        return self.rse_sum / calls[:, None, None, None]

    def check_complete(self) -> None:
        missing = [layer for layer, c in enumerate(self.calls) if c == 0]
        if missing:
            raise RuntimeError(
                f"Expected attention calls from every layer during calibration, got none from layers "
                f"{missing[:8]}. Try a stock Wan2.1 model without other attention patches."
            )


@dataclass(frozen=True)
class WindowCalibration:
    windows: tuple[tuple[HeadWindow, ...], ...]
    radii: tuple[tuple[int, ...], ...]  # chosen radius (blocks) per layer, head
    rse: tuple[tuple[float, ...], ...]  # worst-call RSE (%) of the chosen setting per layer, head
    density: tuple[float, ...]  # kept fraction of block pairs per layer (block count)
    grid: tuple[int, int, int]
    block_size: int
    n_blocks: int
    delta: float | None
    target_sparsity: float | None
    calls: int

    @property
    def sparsity(self) -> float:
        return 1.0 - sum(self.density) / len(self.density)

    def layer_line(self, layer: int) -> str:
        ws = self.windows[layer]
        kinds = sum(w.kind == "temporal" for w in ws)
        rs = self.radii[layer]
        return (
            f"layer {layer:2d}: {len(ws) - kinds} spatial / {kinds} temporal heads, window radius "
            f"{min(rs)}..{max(rs)} blocks (mean {sum(rs) / len(rs):.1f} of {self.n_blocks - 1}), sparsity "
            f"{1.0 - self.density[layer]:.3f}, max RSE {max(self.rse[layer]):.3g}%"
        )

    def summary(self) -> str:
        mode = f"RSE bound delta {self.delta:g}%" if self.delta is not None else f"target sparsity {self.target_sparsity:g}"
        head = (
            f"ST-SWA windows calibrated on {self.calls} attention calls per layer at grid "
            f"{self.grid} (frames x h x w tokens, {self.n_blocks} blocks of {self.block_size}); {mode}; "
            f"mean sparsity {self.sparsity:.3f}"
        )
        return "\n".join([head] + [self.layer_line(layer) for layer in range(len(self.windows))])


def _finish(errors: WindowErrors, kind: torch.Tensor, ridx: torch.Tensor, delta, target) -> WindowCalibration:
    windows, radii, rse, density = [], [], [], []
    for layer in range(errors.num_layers):
        row_w, row_r, row_e = [], [], []
        for head in range(errors.num_heads):
            kk, ri = int(kind[layer, head]), int(ridx[layer, head])
            r = errors.radii[ri]
            row_w.append(HeadWindow(HEAD_KINDS[kk], r * errors.block_size))
            row_r.append(r)
            row_e.append(float(errors.rse_max[layer, head, kk, ri]))
        windows.append(tuple(row_w))
        radii.append(tuple(row_r))
        rse.append(tuple(row_e))
        density.append(sum(band_density(errors.n_blocks, r) for r in row_r) / len(row_r))
    return WindowCalibration(
        tuple(windows), tuple(radii), tuple(rse), tuple(density), errors.grid, errors.block_size,
        errors.n_blocks, delta, target, min(errors.calls),
    )


def select_by_delta(errors: WindowErrors, delta: float, headroom: float = DEFAULT_HEADROOM) -> WindowCalibration:
    """Per head and order, the smallest radius whose worst-call RSE is <= delta * (1 - headroom)
    (greedy, as DiTFastAttnV2); the order with the smaller radius wins (ties: smaller RSE, then
    spatial). The headroom keeps unseen prompts within delta too."""
    errors.check_complete()
    ok = errors.rse_max <= delta * (1.0 - headroom)  # [L, H, 2, K]
    k_count = len(errors.radii)
    idx = torch.arange(k_count).expand_as(ok)
    first = torch.where(ok, idx, torch.full_like(idx, k_count)).amin(-1)  # [L, H, 2]
    first = first.clamp(max=k_count - 1)  # the dense radius always meets it (error 0)
    err_at = errors.rse_max.gather(-1, first[..., None]).squeeze(-1)  # [L, H, 2]
    temporal = (first[..., 1] < first[..., 0]) | ((first[..., 1] == first[..., 0]) & (err_at[..., 1] < err_at[..., 0]))
    kind = temporal.long()
    ridx = first.gather(-1, kind[..., None]).squeeze(-1)
    return _finish(errors, kind, ridx, delta, None)


def select_by_sparsity(errors: WindowErrors, target_sparsity: float) -> WindowCalibration:
    """The per-head (order, radius) choice whose mean kept fraction over all heads of all layers
    is <= 1 - target_sparsity with the least total mean RSE (greedy on error saved per density
    added, from the smallest window up)."""
    errors.check_complete()
    mean = errors.rse_mean.clone()
    mean[~torch.isfinite(mean)] = 1e30
    best, kind_at = mean.min(2)  # [L, H, K] min over orders
    L, H, K = best.shape
    flat, kinds = best.reshape(L * H, K), kind_at.reshape(L * H, K)
    dens = torch.tensor([band_density(errors.n_blocks, r) for r in errors.radii], dtype=torch.float64)
    budget = (1.0 - target_sparsity) * L * H
    cur = torch.zeros(L * H, dtype=torch.long)
    used = float(dens[0]) * L * H
    if used > budget + 1e-9:
        raise ValueError(
            f"Expected a target sparsity reachable at this latent size (at most "
            f"{1.0 - float(dens[0]):.3f} with 1-block windows over {errors.n_blocks} blocks), got "
            f"{target_sparsity}. Try a lower target_sparsity, a larger latent, or delta mode (target_sparsity 0)."
        )
    rows = torch.arange(L * H)
    while True:
        e_cur = flat[rows, cur][:, None]
        d_cur = dens[cur][:, None]
        extra = dens[None, :] - d_cur  # [LH, K]
        gain = (e_cur - flat) / extra.clamp_min(1e-12)
        allowed = (torch.arange(K)[None] > cur[:, None]) & (extra <= budget - used + 1e-12) & (flat < e_cur)
        gain = torch.where(allowed, gain, torch.full_like(gain, -1.0))
        top = int(gain.argmax())
        row, k_new = divmod(top, K)
        if gain[row, k_new] <= 0:
            break
        used += float(extra[row, k_new])
        cur[row] = k_new
    kind = kinds[rows, cur].view(L, H)
    return _finish(errors, kind, cur.view(L, H), None, target_sparsity)
