"""2-process gloo DDP on CPU gives the same gradients as one process on the combined batch."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(comfy_root: str) -> None:
    sys.path.insert(0, comfy_root)
    sys.path.insert(1, str(HERE.parent))
    sys.path.insert(2, str(HERE))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    torch.set_num_threads(1)


def _grads(model_path: str, out_dir: str, global_batch: int, micro_batch: int):
    import comfy.sd

    from train_helpers import make_trainer

    patcher = comfy.sd.load_diffusion_model(model_path)
    t = make_trainer(patcher, out_dir, global_batch=global_batch, micro_batch=micro_batch)
    loss = t.backward_step(0)
    return loss, {n: p.grad.detach().clone() for n, p in t.model.named_trainable()}


def _worker(rank, world, port, comfy_root, model_path, out_dir):
    _setup(comfy_root)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from salad_core.train.trainer import close_distributed

    _, grads = _grads(model_path, out_dir, global_batch=4, micro_batch=1)
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, "ddp_grads.pt"))
    close_distributed()  # the trainer's DDP module went with _grads


def test_ddp_two_process_gloo_matches_single_process(comfy, tiny_wan_path, tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(comfy), str(tiny_wan_path), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp_grads.pt")
    _, single = _grads(str(tiny_wan_path), str(tmp_path / "single"), global_batch=4, micro_batch=4)
    assert set(ddp) == set(single) and len(single) > 0
    nonzero = 0
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-8, msg=name)
        nonzero += int(g.abs().max() > 0)
    assert nonzero >= 12  # lora_B and proj (A, gate and scale see zero grads at the zero init)
