"""The comparisons of issue 10, item 2 (paper Tables 1, 3, 5 and A.3 in miniature).

Per sparse mode (topk, st_swa) at the same sparsity, from the same pretrained toy, with the same
finetuning budget (steps, batch, lr, data, noise) and the flow-matching objective:

    sparse_only     sparse attention, no training
    lora            LoRA on q/k/v/o (rank r)
    lora_matched    LoRA with the rank that matches SALAD's trainable parameter count
    salad           LoRA + proj + input-dependent gate (the paper's method)
    salad_nogate    LoRA + proj, no gate (coefficient 1; Tab. 3 "Shared + Proj")
    salad_const05   LoRA + proj, constant lambda = 0.5 instead of the gate (Tab. 5)
    salad_drop20    salad with the linear branch dropped in the 20% of layers with the
                    largest mean gates (paper A.3, Tab. 8), no retraining
    dense_lora      control, once (first mode): LoRA rank r on DENSE attention, same budget. The
                    toy is not trained to convergence, so finetuning itself moves the model; this
                    row shows how far the same budget moves the dense model (loss and drift)

Metrics on held-out clips (test split): flow-matching loss at fixed sigmas and noise; and from
the same noise and caption, an Euler sampling run whose final latent is compared with the dense
model's: relative L2 and PSNR (peak = the dense latent's range).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from salad_core.config import SaladConfig
from salad_core.train.losses import distillation_loss
from salad_core.train.model import SaladTrainModel, trainable_param_count

from .data import ClipSpec, ToyVideos
from .pretrain import FLOW_SHIFT, flow_batch, flow_loss
from .toy_model import load_toy, velocity

log = logging.getLogger("salad.fidelity")
VARIANTS = ("sparse_only", "lora", "lora_matched", "salad", "salad_nogate", "salad_const05", "salad_drop20", "dense_lora")
MODES = ("topk", "st_swa")


@dataclass
class CompareConfig:
    sparsity: float = 0.9
    block_size: int = 64
    query_group: int = 2  # Top-K query blocks per key list (the pack's default; the README's table used 1)
    modes: tuple = MODES
    variants: tuple = VARIANTS
    steps: int = 300
    batch: int = 4
    lr: float = 1e-4
    lora_rank: int = 64
    seed: int = 1
    eval_clips: int = 8
    eval_sigmas: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    sample_clips: int = 4
    sample_steps: int = 20
    drop_fraction: float = 0.2
    backend: str = "auto"
    data_offset: int = 5_000_000  # finetuning clips: past anything pretraining reached
    frames: int = 13
    height: int = 32
    width: int = 32
    gate_clips: int = 4
    # "flow": flow matching on the toy videos (the paper's objective); "distill": data-free
    # distillation (salad_core.train.losses.distillation_loss, no x0: the teacher makes the input)
    objective: str = "flow"
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> ClipSpec:
        return ClipSpec(self.frames, self.height, self.width)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over all elements (fp64 accumulation)."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float | None = None) -> float:
    """10 log10(peak^2 / MSE); peak defaults to ref.max() - ref.min(). inf when equal."""
    x, ref = x.double(), ref.double()
    peak = float(ref.max() - ref.min()) if peak is None else float(peak)
    mse = float(((x - ref) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def sigma_schedule(steps: int, shift: float = FLOW_SHIFT) -> torch.Tensor:
    from salad_core.train.losses import shifted_sigma

    return shifted_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(predict, noise, context, steps: int) -> torch.Tensor:
    """Flow-matching Euler: x <- x + (s_next - s) v(x, s), from pure noise at s = 1 to 0."""
    sig = sigma_schedule(steps).to(noise.device)
    x = noise.clone()
    for i in range(steps):
        s = sig[i].expand(x.shape[0])
        x = x + (sig[i + 1] - sig[i]) * predict(x, s, context).float()
    return x


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Evaluator:
    """Held-out inputs (fixed) and the dense model's references on them."""

    def __init__(self, cfg: CompareConfig, dense_predict, device):
        from salad_core.train.losses import sample_noise

        self.cfg, self.device = cfg, device
        ds = ToyVideos(cfg.spec, "test", 10_000)
        self.fm = []
        for c in range(cfg.eval_clips):
            x0, ctx = ds.batch([c])
            for j, sg in enumerate(cfg.eval_sigmas):
                noise, _ = sample_noise(tuple(x0.shape[1:]), 1_000 * c + j, 777)
                self.fm.append((x0.to(device), ctx.to(device), noise[None].to(device), torch.tensor([sg], device=device)))
        self.samples = []
        for c in range(cfg.sample_clips):
            _, ctx = ds.batch([c])
            g = torch.Generator().manual_seed(4242 + c)
            self.samples.append((torch.randn((1, 16, *_latent_thw(cfg.spec)), generator=g).to(device), ctx.to(device)))
        self.dense = self.evaluate(dense_predict)
        self.ref_latents = self._last_latents

    def evaluate(self, predict) -> dict:
        with torch.no_grad(), _autocast(self.device):
            fm = sum(float(flow_loss(predict, *item)) for item in self.fm) / len(self.fm)
            outs = [euler_sample(predict, n, c, self.cfg.sample_steps).float().cpu() for n, c in self.samples]
        self._last_latents = outs
        res = {"fm_loss": fm}
        if hasattr(self, "ref_latents"):
            res["rel_l2"] = sum(rel_l2(o, r) for o, r in zip(outs, self.ref_latents)) / len(outs)
            res["psnr"] = sum(psnr(o, r) for o, r in zip(outs, self.ref_latents)) / len(outs)
        return res


def _latent_thw(spec: ClipSpec):
    return (spec.frames, spec.height, spec.width)


def variant_model(dm, cfg: CompareConfig, mode: str, variant: str) -> SaladTrainModel:
    # dense_lora: Top-K with every key block kept is exact dense attention (tested in the foundation)
    mode, sparsity = ("topk", 0.0) if variant == "dense_lora" else (mode, cfg.sparsity)
    sc = SaladConfig(sparse_mode=mode, sparsity=sparsity, block_size=cfg.block_size, query_group=cfg.query_group,
                     backend=cfg.backend)
    lb = variant.startswith("salad")
    rank = {"sparse_only": 0, "lora_matched": matched_rank(dm, cfg.lora_rank)}.get(variant, cfg.lora_rank)
    fixed = {"salad_nogate": 1.0, "salad_const05": 0.5}.get(variant)
    return SaladTrainModel(dm, sc, rank, linear_branch=lb, checkpointing=False, fixed_gate=fixed)


def matched_rank(dm, rank: int) -> int:
    dim, layers = dm.dim, len(dm.blocks)
    salad = trainable_param_count(dim, layers, rank, True)
    return max(1, round(salad / trainable_param_count(dim, layers, 1, False)))


def finetune(model: SaladTrainModel, cfg: CompareConfig, device) -> tuple[list[float], float]:
    params = model.trainable_parameters()
    if not params or cfg.steps == 0:
        return [], 0.0
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ds = ToyVideos(cfg.spec, "train", 10**8)
    predict = lambda x, s, c: model(x, s, c)  # noqa: E731
    teacher = lambda x, s, c: model(x, s, c, dense=True)  # noqa: E731  (frozen base, stock attention)
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        pos = range(cfg.data_offset + step * cfg.batch, cfg.data_offset + (step + 1) * cfg.batch)
        x0, ctx, noise, sigma = flow_batch(ds, pos, cfg.seed, device)
        with _autocast(device):
            if cfg.objective == "distill":
                loss = distillation_loss(predict, teacher, None, ctx, noise, sigma)
            else:
                loss = flow_loss(predict, x0, ctx, noise, sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, (time.time() - t0) / cfg.steps


@torch.no_grad()
def layer_gate_means(model: SaladTrainModel, cfg: CompareConfig, device) -> list[float]:
    """Mean gate per layer over a few training clips and the eval sigmas (paper A.3's statistic)."""
    sums = [0.0] * len(model.attn)
    counts = [0] * len(model.attn)
    originals = []
    for i, m in enumerate(model.attn):
        orig = m.salad.gate_value

        def rec(x, i=i, orig=orig):
            g = orig(x)
            sums[i] += float(g.float().mean())
            counts[i] += 1
            return g

        m.salad.gate_value = rec
        originals.append(m)
    try:
        ds = ToyVideos(cfg.spec, "train", 10**8)
        for c in range(cfg.gate_clips):
            x0, ctx, noise, _ = flow_batch(ds, [cfg.data_offset - 1 - c], cfg.seed, device)
            for sg in cfg.eval_sigmas:
                s = torch.tensor([sg], device=device)
                with _autocast(device):
                    model(sg * noise + (1 - sg) * x0, s, ctx)
    finally:
        for m in originals:
            del m.salad.gate_value
    return [s / max(1, n) for s, n in zip(sums, counts)]


def run_compare(state_dict: dict, cfg: CompareConfig, device=None, record=None) -> list[dict]:
    """All rows: {"mode", "variant", "fm_loss", "rel_l2", "psnr", "trainable", "lora_rank",
    "final_train_loss", "step_s", ...}; the dense reference row first. ``record(row)`` is called
    as each row is done (so partial results survive a time limit)."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = record or (lambda row: None)
    dense_dm, _ = load_toy(state_dict, device)
    dense_dm.requires_grad_(False)
    ev = Evaluator(cfg, lambda x, s, c: velocity(dense_dm, x, s, c), device)
    rows = [{"mode": "dense", "variant": "dense", **ev.dense, "rel_l2": 0.0, "psnr": math.inf, "trainable": 0}]
    record(rows[0])
    del dense_dm
    for mode in cfg.modes:
        trained_salad = None
        for variant in cfg.variants:
            t0 = time.time()
            if variant == "dense_lora" and mode != cfg.modes[0]:
                continue
            if variant == "salad_drop20":
                if trained_salad is None:
                    continue
                model, losses, step_s = trained_salad
                means = layer_gate_means(model, cfg, device)
                n_drop = max(1, round(cfg.drop_fraction * len(means)))
                drop = sorted(sorted(range(len(means)), key=lambda i: means[i])[-n_drop:])
                model.runtime.linear_layers = frozenset(set(range(len(means))) - set(drop))
                extra = {"dropped_layers": drop, "gate_means": [round(g, 4) for g in means]}
            else:
                dm, _ = load_toy(state_dict, device)
                model = variant_model(dm, cfg, mode, variant)
                losses, step_s = finetune(model, cfg, device)
                extra = {}
            model.eval()
            res = ev.evaluate(lambda x, s, c, m=model: m(x, s, c))
            row = {"mode": mode, "variant": variant, **res, "trainable": sum(p.numel() for p in model.trainable_parameters()),
                   "lora_rank": model.lora_rank, "steps": cfg.steps if losses else 0, "batch": cfg.batch, "lr": cfg.lr,
                   "objective": cfg.objective,
                   "final_train_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
                   "step_s": step_s, "wall_s": round(time.time() - t0, 2), **extra}
            rows.append(row)
            record(row)
            log.info("compare %s %s: fm %.4f relL2 %.4f psnr %.2f", mode, variant, row["fm_loss"], row["rel_l2"], row["psnr"])
            if variant == "salad":
                trained_salad = (model, losses, step_s)
            else:
                del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
