"""SALAD through ComfyUI's GPU loading and sampling paths, each flow in its own process (the
harness forces ComfyUI's CPU mode; tests/comfy_gpu_flow.py says what each flow does): a graph
that samples the dense model first (ComfyUI then skips loading the SALAD patcher's modules), a
partial (lowvram) load, cfg > 1 (cond and uncond batched), fp8-stored weights and ComfyUI's
torch.compile node. Results are the models' part of the final latent on a tiny Wan2.1.

Tolerances: the same path reached two ways gives the same result (bitwise on an H100: SAME_TOL
only absorbs a last-bit change); the Triton kernels' error against an fp32 torch-backend run is
at most twice the bf16 torch backend's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FLOW = Path(__file__).with_name("comfy_gpu_flow.py")
SAME_TOL = 1e-6
SALAD_ACTIVE = 0.05  # rel. L2 of SALAD's result from the dense model's, at least (CPU: 0.44-0.49)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def flow(comfy, tmp_path_factory):
    """flow(name) -> (SALAD result, dense result, the flow's JSON), each flow run once."""
    from safetensors.torch import load_file

    out, done = tmp_path_factory.mktemp("flows"), {}

    def run(name: str):
        if name not in done:
            env = {**os.environ, "COMFYUI_PATH": str(comfy)}
            proc = subprocess.run([sys.executable, str(FLOW), name, str(out)], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
            t = load_file(str(out / f"{name}.safetensors"))
            info = json.loads((out / f"{name}.json").read_text())
            print(f"{name}: {info}")
            assert info["salad_keys_pinned"] == 0, (name, info)  # see salad_core.patch.unpin_branches
            done[name] = t["salad"], t["dense"], info
            assert rel(t["salad"], t["dense"]) > SALAD_ACTIVE, (name, rel(t["salad"], t["dense"]))  # SALAD ran
        return done[name]

    return run


def torch_error(flow, prefix=""):
    """rel. L2 of the bf16 torch backend against the fp32 one."""
    return rel(flow(prefix + "torch")[0], flow(prefix + "fp32_torch")[0])


@pytest.mark.gpu
@pytest.mark.parametrize("name,devices", [
    ("dense_then_salad", ["cuda:0"]), ("lowvram", ["cpu", "cuda:0"]), ("lowvram_then_dense", ["cpu", "cuda:0"]),
])
def test_same_result_however_comfyui_loads_it(flow, name, devices):
    """After a dense load SALAD's branches are moved to the GPU once (not copied at every call);
    in a partial load ComfyUI keeps Proj and the gate on the CPU and casts them per call (the
    scale, 2 bytes, is moved); unloading after a dense run of the same model does not raise."""
    salad, _, info = flow(name)
    assert info["branch_devices"] == devices
    if name.startswith("lowvram"):
        assert info["keys_pinned"] > 0  # ComfyUI pinned offloaded weights: the unload path was exercised
    print(f"{name} vs salad_first: rel L2 {rel(salad, flow('salad_first')[0]):.2e}")
    assert rel(salad, flow("salad_first")[0]) <= SAME_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("prefix", ["", "cfg_"])
def test_kernels_within_twice_the_torch_error(flow, prefix):
    kernels = flow("salad_first" if not prefix else "cfg")[0]
    err = rel(kernels, flow(prefix + "fp32_torch")[0])
    print(f"{prefix}kernels {err:.2e}, torch bf16 {torch_error(flow, prefix):.2e}")
    assert err <= 2 * torch_error(flow, prefix)


@pytest.mark.gpu
def test_fp8_weights_kernels_match_torch(flow):
    """Kernels against the torch backend on fp8-stored weights: within twice their bf16 gap."""
    err, bf16_gap = rel(flow("fp8")[0], flow("fp8_torch")[0]), rel(flow("salad_first")[0], flow("torch")[0])
    print(f"fp8 kernels vs torch {err:.2e}, bf16 kernels vs torch {bf16_gap:.2e}")
    assert err <= 2 * bf16_gap


@pytest.mark.gpu
def test_compiled_matches_eager(flow):
    """Inductor changes the rest of the model's numerics too: SALAD compiled is within twice
    what compiling does to the dense model (or to the torch backend's bf16 error)."""
    salad_c, dense_c, info = flow("compiled")
    salad_e, dense_e, _ = flow("salad_first")
    assert info["branch_devices"] == ["cuda:0"]
    budget = max(rel(dense_c, dense_e), torch_error(flow))
    print(f"compiled SALAD {rel(salad_c, salad_e):.2e}, compiled dense {rel(dense_c, dense_e):.2e}")
    assert rel(salad_c, salad_e) <= 2 * budget
