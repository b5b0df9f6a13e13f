"""SALAD trainer (issue 8): AdamW with the paper's defaults (Table 6: lr 1e-4, 1600 steps,
global batch 8, 480x832x77), exact resume, loss log, periodic SALAD-weights export, and
torchrun multi-GPU with DDP (or FSDP2 sharding for the 14B model); gloo on CPU for tests.

Sample positions are global: step s uses positions [s*B, (s+1)*B), rank r takes its contiguous
slice, and noise/sigma are seeded by position. So a resumed run, or one split over ranks, sees
exactly the same samples and noise as one uninterrupted single-process run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SaladConfig
from ..weights import save_salad_weights
from .data import CachedDataset, collate, sample_ids
from .losses import LOSSES, noise_batch
from .model import DEFAULT_LORA_RANK, SaladTrainModel, load_wan_for_training

log = logging.getLogger("salad.train")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    model: str = ""                 # Wan2.1 diffusion-model file (as UNETLoader loads it)
    data: str = ""                  # folder made by `prepare` (videos) or `prepare-prompts`
    out: str = "salad-train"        # run folder: checkpoint, loss log, exported weights
    name: str = "salad"             # exported file stem
    objective: str = "flow"         # "flow" (paper, needs latents) | "distill" (match dense)
    steps: int = 1600
    global_batch: int = 8
    micro_batch: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora_rank: int = DEFAULT_LORA_RANK
    linear_branch: bool = True      # False: LoRA-only ablation (sparse attention + LoRA)
    sparse_mode: str = "topk"
    sparsity: float = 0.9
    topk: int = 0
    block_size: int = 64
    query_group: int = 2            # Top-K query blocks per key list (SaladConfig.query_group)
    backend: str = "auto"
    frames: int = 77                # prompts-only runs: the video size to distil at
    height: int = 480
    width: int = 832
    shift: float | None = None      # sigma shift; None: the model's (ComfyUI Wan: 8.0)
    seed: int = 0
    checkpointing: bool = True
    autocast: str = "auto"          # "auto" (bf16 on CUDA), "bf16", "none"
    model_dtype: str = "auto"       # frozen base weights: "auto" (bf16 on CUDA, fp32 on CPU)
    fsdp: bool = False              # FSDP2 sharding (14B); default DDP when world > 1
    save_every: int = 200
    export_every: int = 400
    export_dtype: str = "fp32"
    log_every: int = 1

    def salad_config(self) -> SaladConfig:
        return SaladConfig(sparse_mode=self.sparse_mode, sparsity=self.sparsity, topk=self.topk,
                           block_size=self.block_size, query_group=self.query_group, backend=self.backend)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dist_info() -> tuple[int, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed() -> None:
    """Join the torchrun process group if launched by torchrun (nccl on CUDA, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def close_distributed() -> None:
    """Leave the process group together, after the caller has dropped its DDP/FSDP modules.

    A gloo rank once aborted in CI ("terminate called without an active exception") after
    its results were written, while its peer was still writing a file: ranks that destroy the
    group at different times race in gloo's teardown. Call only on success: a rank that
    failed mid-collective would leave the others waiting in the barrier.
    """
    gc.collect()  # module state a reference cycle may still hold would keep work on the group
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Trainer:
    def __init__(self, cfg: TrainConfig, model: SaladTrainModel | None = None, dataset=None,
                 model_sampling=None, device=None, progress=None):
        self.cfg = cfg
        self.rank, self.world, local = dist_info()
        self.device = torch.device(device) if device else (
            torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"))
        if cfg.global_batch % (self.world * cfg.micro_batch):
            raise ValueError(f"Expected global_batch divisible by world size x micro_batch, got "
                             f"{cfg.global_batch} vs {self.world} x {cfg.micro_batch}. Try global_batch "
                             f"{self.world * cfg.micro_batch * max(1, cfg.global_batch // (self.world * cfg.micro_batch))}.")
        if cfg.objective not in LOSSES:
            raise ValueError(f"Expected objective in {tuple(LOSSES)}, got {cfg.objective!r}. Try 'flow' or 'distill'.")
        self.out = Path(cfg.out)
        self.progress = progress
        self._pin_ok = True  # pinned host copies of the inputs (see _to_device)
        torch.manual_seed(cfg.seed)  # LoRA A init: identical on every rank
        if model is None:
            dtype = cfg.model_dtype
            dtype = ("bf16" if self.device.type == "cuda" else "fp32") if dtype == "auto" else dtype
            dm, model_sampling = load_wan_for_training(cfg.model, DTYPES[dtype], self.device)
            model = SaladTrainModel(dm, cfg.salad_config(), cfg.lora_rank, cfg.linear_branch, cfg.checkpointing)
        self.model = model.to(self.device)
        self.shift = cfg.shift if cfg.shift is not None else float(getattr(model_sampling, "shift", 5.0))
        self.dataset = dataset if dataset is not None else CachedDataset(cfg.data)
        self.student = self._wrap(self.model)
        params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step = 0
        self.log_path = self.out / "loss.jsonl"

    # -- setup ----------------------------------------------------------------------------------
    def _wrap(self, model):
        if self.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
            for block in model.dm.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def _autocast(self):
        mode = self.cfg.autocast
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "none"
        if mode == "none":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=DTYPES[mode])

    def teacher(self, x, sigma, context):
        return self.model(x, sigma, context, dense=True)

    # -- data -----------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        c = self.cfg
        return (16, (c.frames - 1) // 4 + 1, c.height // 8, c.width // 8)

    def micro_batches(self, step: int):
        c = self.cfg
        per_rank = c.global_batch // self.world
        base = step * c.global_batch + self.rank * per_rank
        for m in range(0, per_rank, c.micro_batch):
            positions = list(range(base + m, base + m + c.micro_batch))
            ids = sample_ids(len(self.dataset), positions, c.seed)
            batch = collate([self.dataset[i] for i in ids])
            shape = batch["latent"].shape[1:] if batch["latent"] is not None else self.latent_shape()
            noise, sigma = noise_batch(shape, positions, c.seed, self.shift)
            yield {k: self._to_device(v) for k, v in batch.items()}, self._to_device(noise), self._to_device(sigma)

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Host tensor to the training device without waiting for the GPU: a copy from pageable
        memory blocks until the queued kernels finish, so the next micro-batch's Python set-up
        could not overlap them. Pinned + non_blocking lets it run ahead."""
        if t is None:
            return None
        if self.device.type == "cuda" and t.device.type == "cpu" and self._pin_ok:
            try:
                return t.pin_memory().to(self.device, non_blocking=True)
            except RuntimeError as exc:  # e.g. page-locked memory exhausted: slower, still right
                self._pin_ok = False
                log.warning("SALAD train: pinned host memory unavailable (%s); copying inputs unpinned "
                            "(slower: each copy waits for the GPU).", exc)
        return t.to(self.device)

    # -- one step -------------------------------------------------------------------------------
    def backward_step(self, step: int) -> float:
        """Forward + backward of the step's samples (grads accumulated into .grad); returns the
        mean loss over this rank's samples."""
        c = self.cfg
        loss_fn = LOSSES[c.objective]
        per_rank = c.global_batch // self.world
        n_micro = per_rank // c.micro_batch
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per micro-batch
        for m, (batch, noise, sigma) in enumerate(self.micro_batches(step)):
            sync = m == n_micro - 1 or self.world == 1 or c.fsdp
            ctx = self.student.no_sync() if not sync and hasattr(self.student, "no_sync") else _null()
            with ctx:
                with self._autocast():
                    loss = loss_fn(self.student, self.teacher, batch["latent"], batch["context"], noise, sigma)
                (loss / n_micro).backward()
            total += loss.detach().float() / n_micro
        return float(total)

    def lr_at(self, step: int) -> float:
        w = self.cfg.warmup_steps
        return self.cfg.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.backward_step(self.step)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.world > 1:
            t = torch.tensor([loss], device=self.device)
            torch.distributed.all_reduce(t)
            loss = float(t) / self.world
        return loss

    # -- loop -----------------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> list[float]:
        """Train until ``steps`` (default cfg.steps) total steps; returns this call's losses."""
        from tqdm import tqdm

        c = self.cfg
        end = c.steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=end, initial=self.step, desc="SALAD train", disable=self.rank != 0 or self.progress is not None)
        losses, t0 = [], time.time()
        while self.step < end:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"Expected a finite loss, got {loss} at step {self.step}. Try a lower lr.")
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            if self.progress is not None:
                self.progress(self.step, end, loss)
            if self.rank == 0 and self.step % c.log_every == 0:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"step": self.step, "loss": loss, "lr": self.lr_at(self.step - 1),
                                        "samples": self.step * c.global_batch, "elapsed_s": round(time.time() - t0, 3)}) + "\n")
            if c.save_every and self.step % c.save_every == 0:
                self.save_checkpoint()
            if c.export_every and self.step % c.export_every == 0 and self.step < end:
                self.export(self.out / f"{c.name}-step{self.step:05d}.safetensors")
        bar.close()
        return losses

    # -- checkpoint / export --------------------------------------------------------------------
    def _optimizer_state(self):
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_checkpoint(self, path=None) -> Path:
        path = Path(path or self.out / CHECKPOINT)
        state = {
            "step": self.step,
            "data_position": self.step * self.cfg.global_batch,
            "trainable": {k: _full(v).cpu() for k, v in self.model.trainable_state().items()},
            "optimizer": self._optimizer_state(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": dataclasses.asdict(self.cfg),
        }
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        if self.world > 1:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path=None) -> bool:
        path = Path(path or self.out / CHECKPOINT)
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain containers, no pickle code
        if state["config"]["global_batch"] != self.cfg.global_batch or state["config"]["seed"] != self.cfg.seed:
            raise ValueError(f"{path}: Expected a checkpoint with global_batch {self.cfg.global_batch} and seed "
                             f"{self.cfg.seed}, got {state['config']['global_batch']} / {state['config']['seed']}. "
                             "Try the run's original settings or a new --out folder.")
        params = dict(self.model.named_trainable())
        with torch.no_grad():
            for k, v in state["trainable"].items():
                p = params[k]
                if hasattr(p, "distribute_tensor") or type(p).__name__ == "DTensor":
                    from torch.distributed.tensor import distribute_tensor

                    p.copy_(distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements))
                else:
                    p.copy_(v)
        if self.cfg.fsdp and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        return True

    def export(self, path=None) -> Path:
        path = Path(path or self.out / f"{self.cfg.name}.safetensors")
        weights = self.model.export_weights(self.step, DTYPES[self.cfg.export_dtype], full=_full)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_salad_weights(weights, str(path), overwrite=True)
            log.info("SALAD train: exported %s (step %d)", path, self.step)
        return path


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective: call on every rank), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig, resume: bool = True, progress=None) -> Path:
    """Full run: resume from ``cfg.out`` if a checkpoint is there, train, export the final file."""
    init_distributed()
    trainer = Trainer(cfg, progress=progress)
    if resume and trainer.load_checkpoint():
        log.info("SALAD train: resumed at step %d", trainer.step)
    trainer.run()
    trainer.save_checkpoint()
    path = trainer.export()
    del trainer
    close_distributed()
    return path
