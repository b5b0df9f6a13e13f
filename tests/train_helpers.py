"""Shared pieces of the training tests (tiny model, synthetic cached data)."""

from __future__ import annotations

import torch

# query_group 1: the tiny latent is 3 blocks, where query blocks of two (the default) keep both
# diagonal blocks of a pair and leave sparse attention nearly dense (little for training to fix).
TINY_CFG = dict(sparsity=0.5, block_size=16, query_group=1, backend="torch", lora_rank=4, global_batch=2,
                micro_batch=1, lr=1e-3, frames=9, height=64, width=64, save_every=0, export_every=0)


class ListDataset:
    def __init__(self, n=4, latent=True, seed=0, shape=(16, 3, 8, 8), text_len=16):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"latent": torch.randn(shape, generator=g) if latent else None,
                       "context": torch.randn(text_len, 4096, generator=g)} for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_trainer(patcher, out, dataset=None, **overrides):
    from salad_core.train import SaladTrainModel, TrainConfig, Trainer

    cfg = TrainConfig(**{**TINY_CFG, "out": str(out), **overrides})
    torch.manual_seed(cfg.seed)
    model = SaladTrainModel(patcher.model.diffusion_model, cfg.salad_config(), cfg.lora_rank,
                            cfg.linear_branch, cfg.checkpointing)
    return Trainer(cfg, model=model, dataset=dataset or ListDataset(), model_sampling=patcher.model.model_sampling,
                   device="cpu")
