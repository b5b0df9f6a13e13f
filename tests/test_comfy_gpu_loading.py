"""SALAD in ComfyUI's GPU loading paths (each flow in its own process: the harness forces CPU):
a model sampled dense first in the same graph (ComfyUI then skips loading the SALAD patcher's
modules) and a partial (lowvram) load must both run SALAD on the GPU and give the same latent
as the plain flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FLOW = Path(__file__).with_name("comfy_gpu_flow.py")


def run_flow(flow: str, out: Path, comfy_root: Path) -> tuple:
    from safetensors.torch import load_file

    env = {**os.environ, "COMFYUI_PATH": str(comfy_root)}
    done = subprocess.run([sys.executable, str(FLOW), flow, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{flow} failed:\n{done.stderr[-3000:]}"
    return load_file(str(out / f"{flow}.safetensors"))["latent"], json.loads((out / f"{flow}.json").read_text())


@pytest.mark.gpu
def test_salad_runs_the_same_after_a_dense_load_and_in_lowvram(comfy, tmp_path):
    import torch

    reference, info = run_flow("salad_first", tmp_path, comfy)
    assert info["branch_devices"] == ["cuda:0"]
    assert torch.isfinite(reference).all()
    after_dense, info = run_flow("dense_then_salad", tmp_path, comfy)
    assert info["branch_devices"] == ["cuda:0"]  # moved once, not copied from the CPU at every call
    assert torch.allclose(after_dense, reference, rtol=1e-3, atol=1e-3), float((after_dense - reference).abs().max())
    lowvram, _ = run_flow("lowvram", tmp_path, comfy)
    assert torch.allclose(lowvram, reference, rtol=1e-3, atol=1e-3), float((lowvram - reference).abs().max())
