"""Flow-matching pretraining of the toy Wan from scratch (issue 10, item 1).

Time-budgeted and resumable: ``pretrain(cfg, run_dir, budget_s)`` trains until the budget (or
``cfg.max_steps``) is spent and leaves in ``run_dir``:

    model.safetensors   fp32 weights (Wan key names)
    optim.safetensors   AdamW moments (exp_avg.<name>, exp_avg_sq.<name>)
    state.json          step, config, Adam step, loss log tail
    loss.jsonl          one line per logged step

No pickle anywhere. Step s trains on sample positions [s*B, (s+1)*B): clip = position, noise and
sigma seeded by position (``salad_core.train.losses.sample_noise``), so a resumed run sees the
same data and noise as an uninterrupted one, and resuming from run_dir is exact.

Across device machines only a compact bf16 copy travels (``export_carry`` / ``import_carry``,
shards of <= 14 MiB, since one file from $OUT is at most 16 MiB): resuming from it restarts the
AdamW moments (with a short warm-up), the only inexactness, and the log says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import ClipSpec, ToyVideos
from .toy_model import SHAPES, init_state_dict, load_toy, model_state, velocity

log = logging.getLogger("salad.fidelity")
FLOW_SHIFT = 3.0  # sigma shift for training and sampling (small latents need less than Wan's 8)
CARRY_SHARD_BYTES = 14 * 2**20


@dataclass
class PretrainConfig:
    shape: str = "toy"
    frames: int = 13
    height: int = 32
    width: int = 32
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    max_steps: int = 100_000
    train_clips: int = 100_000
    log_every: int = 10
    save_every_s: float = 120.0

    @property
    def spec(self) -> ClipSpec:
        return ClipSpec(self.frames, self.height, self.width)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def flow_batch(ds: ToyVideos, positions, seed: int, device):
    """(x0, context, noise, sigma) for the given global sample positions."""
    from salad_core.train.losses import noise_batch

    x0, ctx = ds.batch(positions)
    noise, sigma = noise_batch(tuple(x0.shape[1:]), list(positions), seed, FLOW_SHIFT)
    return x0.to(device), ctx.to(device), noise.to(device), sigma.to(device)


def flow_loss(predict, x0, ctx, noise, sigma) -> torch.Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    v = predict(s * noise + (1 - s) * x0, sigma, ctx)
    return torch.mean((v.float() - (noise - x0)) ** 2)


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, run_dir, device=None):
        self.cfg, self.dir = cfg, Path(run_dir)
        self.device = torch.device(device) if device else _device()
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / "state.json"
        self.state = json.loads(state_path.read_text()) if state_path.is_file() else {"step": 0, "adam_start": 0}
        if self.state.get("config") and self.state["config"]["seed"] != cfg.seed:
            raise ValueError(f"{self.dir}: Expected a run with seed {cfg.seed}, got {self.state['config']['seed']}. Try a new run folder.")
        model_path = self.dir / "model.safetensors"
        sd = load_file(str(model_path)) if model_path.is_file() else init_state_dict(SHAPES[cfg.shape], cfg.seed)
        self.dm, self.model_sampling = load_toy(sd, self.device, torch.float32)
        self.dm.requires_grad_(True)
        self.dm.train()
        self.params = dict(self.dm.named_parameters())
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        optim_path = self.dir / "optim.safetensors"
        if optim_path.is_file() and model_path.is_file():
            moments = load_file(str(optim_path), device=str(self.device))
            adam_step = float(self.state["adam_step"])
            for n, p in self.params.items():
                self.opt.state[p] = {"step": torch.tensor(adam_step), "exp_avg": moments[f"exp_avg.{n}"],
                                     "exp_avg_sq": moments[f"exp_avg_sq.{n}"]}
        elif model_path.is_file():
            log.warning("fidelity pretrain: %s has weights but no optimizer state (carried copy): AdamW "
                        "moments restart with a %d-step warm-up; not an exact resume.", self.dir, cfg.warmup // 4)
            self.state["adam_start"] = self.state["step"]
        self.ds = ToyVideos(cfg.spec, "train", cfg.train_clips)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def lr_at(self, step: int) -> float:
        start = int(self.state.get("adam_start", 0))
        warm = self.cfg.warmup if start == 0 else max(1, self.cfg.warmup // 4)
        return self.cfg.lr * min(1.0, (step - start + 1) / warm)

    def predict(self, x, sigma, ctx):
        return velocity(self.dm, x, sigma, ctx)

    def train_step(self) -> float:
        c, step = self.cfg, self.step
        positions = range(step * c.batch, (step + 1) * c.batch)
        x0, ctx, noise, sigma = flow_batch(self.ds, positions, c.seed, self.device)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        with _autocast(self.device):
            loss = flow_loss(self.predict, x0, ctx, noise, sigma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), c.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state["step"] = step + 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"Expected a finite loss, got {value} at step {step}. Try a lower lr.")
        return value

    def save(self) -> None:
        _atomic_save(model_state(self.dm), self.dir / "model.safetensors")
        moments, adam_step = {}, 0.0
        for n, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                moments[f"exp_avg.{n}"], moments[f"exp_avg_sq.{n}"] = st["exp_avg"], st["exp_avg_sq"]
                adam_step = float(st["step"])
        if moments:
            _atomic_save(moments, self.dir / "optim.safetensors")
        self.state.update(adam_step=adam_step, config=dataclasses.asdict(self.cfg))
        _write_json(self.state, self.dir / "state.json")

    def run(self, budget_s: float | None = None, steps: int | None = None) -> list[float]:
        """Train until ``steps`` more steps, the budget or cfg.max_steps; saves at the end."""
        t0 = last_save = time.time()
        end = min(self.cfg.max_steps, self.step + steps) if steps is not None else self.cfg.max_steps
        losses, step_s = [], 0.0
        while self.step < end:
            if budget_s is not None and time.time() - t0 + 2 * step_s + 5 > budget_s:
                break
            ts = time.time()
            losses.append(self.train_step())
            step_s = time.time() - ts if step_s == 0 else 0.9 * step_s + 0.1 * (time.time() - ts)
            if self.step % self.cfg.log_every == 0:
                rec = {"step": self.step, "loss": sum(losses[-self.cfg.log_every:]) / len(losses[-self.cfg.log_every:]),
                       "lr": self.lr_at(self.step - 1), "step_s": round(step_s, 4)}
                with open(self.dir / "loss.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                self.state["last_loss"] = rec["loss"]
                log.info("pretrain step %d loss %.4f (%.3f s/step)", self.step, rec["loss"], step_s)
            if time.time() - last_save > self.cfg.save_every_s:
                self.save()
                last_save = time.time()
        if losses:
            self.state["last_loss"] = sum(losses[-10:]) / len(losses[-10:])
        self.state["seconds"] = float(self.state.get("seconds", 0.0)) + time.time() - t0
        self.save()
        return losses


def pretrain(cfg: PretrainConfig, run_dir, budget_s: float | None = None, steps: int | None = None, device=None):
    trainer = Pretrainer(cfg, run_dir, device)
    start = trainer.step
    losses = trainer.run(budget_s, steps)
    log.info("pretrain: steps %d -> %d in this call", start, trainer.step)
    return trainer, losses


def load_pretrained(run_dir, device=None, dtype=torch.float32):
    """(dm, state dict, state) of a pretraining run."""
    run_dir = Path(run_dir)
    sd = load_file(str(run_dir / "model.safetensors"))
    dm, _ = load_toy(sd, device or _device(), dtype)
    return dm, sd, json.loads((run_dir / "state.json").read_text())


def export_carry(run_dir, dest, dtype=torch.bfloat16, shard_bytes: int = CARRY_SHARD_BYTES) -> list[Path]:
    """Weights of ``run_dir`` as ``toy-NN.safetensors`` shards in ``dtype`` + ``toy-state.json``."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(run_dir / "model.safetensors"))
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        t = sd[k].to(dtype)
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + nbytes
    shards.append(cur)
    paths = []
    for i, shard in enumerate(shards):
        p = dest / f"toy-{i:02d}.safetensors"
        _atomic_save(shard, p)
        paths.append(p)
    state = json.loads((run_dir / "state.json").read_text())
    state["carried_dtype"] = str(dtype).replace("torch.", "")
    _write_json(state, dest / "toy-state.json")
    return paths + [dest / "toy-state.json"]


def import_carry(src, run_dir) -> int:
    """Rebuild a run folder (fp32 weights, state; no optimizer state) from ``export_carry``
    output. Returns the step. A no-op when run_dir already holds a run at the same or a later step."""
    src, run_dir = Path(src), Path(run_dir)
    state = json.loads((src / "toy-state.json").read_text())
    if (run_dir / "state.json").is_file():
        have = json.loads((run_dir / "state.json").read_text())
        if have["step"] >= state["step"]:
            return int(have["step"])
    run_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    for p in sorted(src.glob("toy-*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(str(p)).items()})
    _atomic_save(sd, run_dir / "model.safetensors")
    (run_dir / "optim.safetensors").unlink(missing_ok=True)
    _write_json(state, run_dir / "state.json")
    return int(state["step"])
