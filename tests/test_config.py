import subprocess
import sys

import pytest

from salad_core import HeadWindow, SaladConfig
from salad_core.config import default_head_windows, uniform_window_blocks


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparse_mode": "radial"},
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"topk": -1},
        {"block_size": 48},
        {"query_group": 3},
        {"query_group": 0},
        {"linear_scale": -1.0},
        {"linear_scale": float("nan")},
        {"gate_drop_percentile": 101},
        {"gate_drop_plan": "middle"},
        {"dense_steps": -2},
        {"backend": "cuda"},
        {"windows": ((),)},
    ],
)
def test_invalid_values_raise_expected_got_try(kwargs):
    with pytest.raises(ValueError, match=r"Expected .*, got .*\. Try .*\."):
        SaladConfig(**kwargs)


def test_config_is_immutable():
    cfg = SaladConfig()
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.5


def test_head_window_validation_and_json_roundtrip():
    with pytest.raises(ValueError, match="Expected head kind"):
        HeadWindow("diagonal", 64)
    with pytest.raises(ValueError, match="Expected a window of at least 1 token"):
        HeadWindow("spatial", 0)
    w = HeadWindow("temporal", 192)
    assert HeadWindow.from_json(w.to_json()) == w


def test_topk_for_derives_from_sparsity_and_respects_explicit_k():
    assert SaladConfig(sparsity=0.9).topk_for(512) == 51
    assert SaladConfig(sparsity=0.0).topk_for(37) == 37
    assert SaladConfig(sparsity=0.99).topk_for(10) == 1
    assert SaladConfig(topk=4).topk_for(512) == 4
    assert SaladConfig(topk=4000).topk_for(512) == 512


def test_windows_must_match_model():
    windows = ((HeadWindow("spatial", 64),) * 2,) * 3
    cfg = SaladConfig(sparse_mode="st_swa", windows=windows)
    cfg.check_windows_for(3, 2)
    with pytest.raises(ValueError, match="Expected ST-SWA windows for 2 layers x 2 heads"):
        cfg.check_windows_for(2, 2)


def test_uniform_window_hits_target_density():
    nb = 512
    r = uniform_window_blocks(nb, 0.9)
    density = (nb * (2 * r + 1) - r * (r + 1)) / nb**2
    assert abs(density - 0.1) < 2.0 / nb
    heads = default_head_windows(4, nb, 64, 0.9)
    assert [h.kind for h in heads] == ["spatial", "temporal", "spatial", "temporal"]
    assert {h.window for h in heads} == {r * 64}


def test_core_packages_import_without_comfy_or_gpu():
    code = (
        "import sys, torch, salad_core, kernels, salad_core.patch\n"
        "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules), 'comfy imported'\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA touched at import time'\n"
    )
    env_path = [p for p in sys.path if "ComfyUI" not in p and "_comfyui" not in p]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
        env={"PYTHONPATH": ":".join(env_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
