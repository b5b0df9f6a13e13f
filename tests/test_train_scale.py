"""bench/train_scale.py on CPU: torchrun with 1 and 2 gloo processes on the tiny model writes
design.md section 7 records, and the 2-process run's scaling efficiency against the 1-process one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "train_scale.py"
METRICS = {"s_per_step", "steps_s", "s_per_sample", "peak_gib", "recipe_wall_h", "recipe_gpu_h"}


def _torchrun(comfy, out: Path, nproc: int, *extra: str) -> str:
    env = {**os.environ, "COMFYUI_PATH": str(comfy), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(SCRIPT), "--cpu", "--out", str(out), "--run-dir", str(out / f"run{nproc}"), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _by(records, case):
    return {r["metric"]: r for r in records if r["case"] == case}


def test_train_scale_one_and_two_gloo_processes(comfy, tmp_path):
    _torchrun(comfy, tmp_path, 1)
    log = _torchrun(comfy, tmp_path, 2)
    assert "scaling_eff" in log
    records = json.loads((tmp_path / "train-scale-cpu.json").read_text())
    one, two = _by(records, "salad_full_topk_90_ddp1"), _by(records, "salad_full_topk_90_ddp2")
    assert METRICS <= set(one) and METRICS | {"scaling_eff"} <= set(two)
    for r in list(one.values()) + list(two.values()):
        assert r["bench"] == "train_scale" and r["shape"] == "tiny_64p5" and r["device"] == "cpu"
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        assert r["date"] and "commit" in r
    assert two["peak_gib"]["world"] == 2 and len(two["peak_gib"]["per_rank"]) == 2
    assert two["s_per_step"]["grad_accum"] == 4 and one["s_per_step"]["grad_accum"] == 8
    eff = two["scaling_eff"]
    assert eff["baseline_case"] == "salad_full_topk_90_ddp1" and eff["baseline_world"] == 1
    speedup = one["s_per_step"]["value"] / two["s_per_step"]["value"]
    assert eff["speedup"] == pytest.approx(speedup) and eff["value"] == pytest.approx(speedup / 2)
    assert two["recipe_gpu_h"]["value"] == pytest.approx(two["s_per_step"]["value"] * 1600 * 2 / 3600)
    assert one["steps_s"]["value"] == pytest.approx(1 / one["s_per_step"]["value"])
    md = (tmp_path / "train-scale-cpu.md").read_text()
    assert "salad_full_topk_90_ddp2" in md and "scaling_eff" in md
    # a re-run replaces its own records instead of piling them up
    _torchrun(comfy, tmp_path, 1)
    records = json.loads((tmp_path / "train-scale-cpu.json").read_text())
    assert sum(r["case"] == "salad_full_topk_90_ddp1" and r["metric"] == "s_per_step" for r in records) == 1


def test_train_scale_fsdp_two_gloo_processes(comfy, tmp_path):
    # bf16 frozen base + fp32 trainable LoRA/branch, as on GPU (FSDP2 all-gathers mixed dtypes)
    _torchrun(comfy, tmp_path, 2, "--fsdp", "--steps", "1", "--dtype", "bf16")
    recs = _by(json.loads((tmp_path / "train-scale-cpu.json").read_text()), "salad_full_topk_90_fsdp2")
    assert METRICS <= set(recs) and recs["s_per_step"]["mode"] == "fsdp"
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in recs.values())


def test_gpu_script_keeps_nvlink_multicast_off():
    sh = (REPO / "bench" / "train_scale_gpu.sh").read_text()
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in sh
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "train_scale_gpu.sh")]).returncode == 0
