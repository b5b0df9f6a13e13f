"""Shared pytest fixtures: a real ComfyUI (CPU), tiny random Wan2.1 checkpoints, a forward pass.

Fixtures (names are stable; the whole team writes tests against them):

  comfy              (session) ComfyUI root path. ComfyUI is on sys.path[0], runs on CPU
                     (comfy.cli_args.args.cpu = True, argv never parsed), and folder_paths
                     points every model/input/output/temp/user dir into a session tmp dir.
  comfy_models_dir   (session) that tmp models dir (pathlib.Path); ``salad`` is registered there.
  tiny_wan_path      (session) path of a tiny t2v checkpoint (WanShape.tiny(), seed 0, fp32),
                     placed in ComfyUI's ``diffusion_models`` folder: UNETLoader lists it as
                     ``salad_tiny_wan_t2v.safetensors``.
  tiny_wan_i2v_path  (session) same for WanShape.tiny_i2v() (``salad_tiny_wan_i2v.safetensors``).
  load_wan           function load_wan(path_or_name, dtype=None) -> ModelPatcher, loaded with
                     comfy.sd.load_diffusion_model exactly like the stock UNETLoader.
  wan_inputs         function wan_inputs(patcher, batch=1, frames=3, height=8, width=12, seed=0)
                     -> dict(x [B,16,F,H,W], sigma [B], context [B,512,4096]) (+ c_concat
                     [B,20,F,H,W] for i2v models), seeded random.
  run_wan            function run_wan(patcher, inputs, transformer_options=None) -> output tensor:
                     load_models_gpu([patcher]) like the sampler, then apply_model under no_grad,
                     with transformer_options built the way comfy.samplers does it.

  comfy_nodes        (session) ComfyUI's ``nodes`` module after loading this pack through ComfyUI's
                     own custom-node loader (custom_nodes/salad, V1 mappings or V3 comfy_entrypoint);
                     use ``comfy_nodes.NODE_CLASS_MAPPINGS[...]``. Fails if the pack does not load.

Markers: ``gpu`` (auto-skipped without CUDA), ``browser`` (needs chromium + playwright).

Without ComfyUI the ``comfy`` fixture fails with instructions to run .ci/setup_comfyui.sh;
set SALAD_ALLOW_NO_COMFY=1 to skip those tests instead.

Import note: ComfyUI has a top-level ``nodes`` module, and so does this repo (``nodes/``).
ComfyUI's root is put ahead of the repo root on sys.path, so ``import nodes`` is ComfyUI's
nodes.py; import this pack's node code through the package ComfyUI loads (custom_nodes/salad).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY = REPO_ROOT / ".comfy" / "ComfyUI"
TINY_T2V_NAME = "salad_tiny_wan_t2v.safetensors"
TINY_I2V_NAME = "salad_tiny_wan_i2v.safetensors"


def comfyui_root() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFY).expanduser().resolve()


def _is_comfy_tree(p: Path) -> bool:
    return (p / "main.py").is_file() and (p / "comfy").is_dir() and (p / "folder_paths.py").is_file()


def _prepare_comfy_imports(root: Path) -> None:
    """Put ComfyUI first on sys.path and force CPU before anything imports comfy.model_management."""
    root_s = str(root)
    if root_s in sys.path:
        sys.path.remove(root_s)
    sys.path.insert(0, root_s)
    # Repo root goes after ComfyUI (ComfyUI's nodes.py must win over this repo's nodes/).
    repo_s = str(REPO_ROOT)
    if repo_s not in sys.path:
        sys.path.insert(1, repo_s)

    # comfy.options.args_parsing is False unless someone enables it, so comfy.cli_args calls
    # parser.parse_args([]) and never sees pytest's argv. Keep it that way.
    import comfy.options

    if comfy.options.args_parsing:
        comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    # Same as ComfyUI's own tests-unit: set before comfy.model_management is imported.
    args.cpu = True
    if "comfy.model_management" in sys.modules:
        import comfy.model_management as mm

        if mm.cpu_state != mm.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before the test harness set args.cpu=True")


# --------------------------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped automatically without one)")
    config.addinivalue_line("markers", "browser: drives the real ComfyUI frontend with chromium + playwright")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    # salad_core / kernels importable even without ComfyUI.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    # Done here (not only in the fixture) so that test modules importing comfy at module level
    # still get CPU mode and never see pytest's argv.
    root = comfyui_root()
    if _is_comfy_tree(root):
        _prepare_comfy_imports(root)


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
        for it in gpu_items:
            it.add_marker(skip)


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_home") / "models"


@pytest.fixture(scope="session")
def comfy(comfy_models_dir) -> Path:
    root = comfyui_root()
    if not _is_comfy_tree(root):
        msg = (f"ComfyUI not found at {root} (COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r}). "
               "Run `bash .ci/setup_comfyui.sh` (then `source .venv/bin/activate`), "
               "or point COMFYUI_PATH at an existing ComfyUI checkout.")
        if os.environ.get("SALAD_ALLOW_NO_COMFY") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)

    _prepare_comfy_imports(root)
    import folder_paths

    home = comfy_models_dir.parent
    models = comfy_models_dir
    models.mkdir(parents=True, exist_ok=True)
    folder_paths.models_dir = str(models)
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":
            continue
        new_paths = []
        for p in paths:
            d = models / Path(p).name
            d.mkdir(parents=True, exist_ok=True)
            new_paths.append(str(d))
        folder_paths.folder_names_and_paths[name] = (new_paths, exts)
    if "salad" not in folder_paths.folder_names_and_paths:
        (models / "salad").mkdir(exist_ok=True)
        folder_paths.folder_names_and_paths["salad"] = ([str(models / "salad")], {".safetensors"})
    for sub, setter in (("output", folder_paths.set_output_directory), ("input", folder_paths.set_input_directory),
                        ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        (home / sub).mkdir(parents=True, exist_ok=True)
        setter(str(home / sub))
    folder_paths.filename_list_cache.clear()

    import comfy.model_management as mm

    assert mm.cpu_state == mm.CPUState.CPU, "ComfyUI is not in CPU mode"
    return root


def _write_into_diffusion_models(comfy_root, shape, name):
    import folder_paths
    import torch
    from salad_core.tiny_wan import write_wan_checkpoint

    target = Path(folder_paths.get_folder_paths("diffusion_models")[-1]) / name
    write_wan_checkpoint(target, shape, seed=0, dtype=torch.float32)
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    return target


@pytest.fixture(scope="session")
def tiny_wan_path(comfy) -> Path:
    from salad_core.tiny_wan import WanShape

    return _write_into_diffusion_models(comfy, WanShape.tiny(), TINY_T2V_NAME)


@pytest.fixture(scope="session")
def tiny_wan_i2v_path(comfy) -> Path:
    from salad_core.tiny_wan import WanShape

    return _write_into_diffusion_models(comfy, WanShape.tiny_i2v(), TINY_I2V_NAME)


def _load_wan(path, dtype=None, model_options=None):
    """Load a Wan diffusion-model file the way the stock UNETLoader does -> ModelPatcher."""
    import comfy.sd
    import folder_paths

    p = Path(path)
    if not p.is_file():  # a name as UNETLoader's widget shows it
        p = Path(folder_paths.get_full_path_or_raise("diffusion_models", str(path)))
    opts = dict(model_options or {})
    if dtype is not None:
        opts["dtype"] = dtype
    return comfy.sd.load_diffusion_model(str(p), model_options=opts)


@pytest.fixture
def load_wan(comfy):
    return _load_wan


def _wan_inputs(patcher, batch=1, frames=3, height=8, width=12, seed=0):
    import torch

    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(int(seed))
    out = {
        "x": torch.randn(batch, 16, frames, height, width, generator=g),
        "sigma": torch.rand(batch, generator=g) * 0.9 + 0.05,
        "context": torch.randn(batch, 512, dm.text_dim, generator=g),
    }
    extra = dm.in_dim - 16
    if extra > 0:  # i2v: mask (4) + reference latent (16) are concatenated to x
        out["c_concat"] = torch.randn(batch, extra, frames, height, width, generator=g)
    return out


@pytest.fixture
def wan_inputs(comfy):
    return _wan_inputs


def _run_wan(patcher, inputs, transformer_options=None):
    """One denoiser call as KSampler makes it (one cond, no CFG batching); returns apply_model's output.

    Mirrors comfy.samplers.CFGGuider: clone the patcher's model_options, register the patcher's
    wrappers/callbacks into transformer_options (sampler_helpers.prepare_model_patcher), load the
    model with load_models_gpu, pre_run(), then calc_cond_batch's transformer_options
    (cond_or_uncond, uuids, sigmas) and model_function_wrapper if one is set. Pass
    ``transformer_options={"sample_sigmas": ...}`` to emulate a particular sampling schedule.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import torch

    model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    model_options.setdefault("transformer_options", {})
    if transformer_options:
        model_options["transformer_options"] = comfy.patcher_extension.merge_nested_dicts(
            model_options["transformer_options"], transformer_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, {}, model_options)
    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    device = patcher.load_device
    x = inputs["x"].to(device)
    sigma = inputs["sigma"].to(device)

    to = comfy.patcher_extension.copy_nested_dicts(model_options["transformer_options"])
    to.setdefault("cond_or_uncond", [0])
    to.setdefault("uuids", [uuid.uuid4()])
    to["sigmas"] = sigma

    c = {"c_crossattn": inputs["context"].to(device), "transformer_options": to}
    if inputs.get("c_concat") is not None:
        c["c_concat"] = inputs["c_concat"].to(device)
    try:
        with torch.no_grad():
            patcher.pre_run()
            try:
                if "model_function_wrapper" in model_options:
                    return model_options["model_function_wrapper"](
                        model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": to["cond_or_uncond"]})
                return model.apply_model(x, sigma, **c)
            finally:
                patcher.cleanup()
    finally:
        patcher.restore_hook_patches()


@pytest.fixture
def run_wan(comfy):
    return _run_wan


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    import asyncio

    import nodes  # ComfyUI's nodes.py (ComfyUI root is ahead of the repo on sys.path)

    assert Path(nodes.__file__).resolve().parent == Path(comfy).resolve(), f"wrong nodes module: {nodes.__file__}"
    link = Path(comfy) / "custom_nodes" / "salad"
    pack_dir = link if (link.exists() and link.resolve() == REPO_ROOT) else REPO_ROOT
    if not (pack_dir / "__init__.py").is_file():
        pytest.fail(f"{pack_dir}/__init__.py missing: the pack has no ComfyUI entry point", pytrace=False)
    ok = asyncio.run(nodes.load_custom_node(str(pack_dir), module_parent="custom_nodes"))
    if not ok:
        pytest.fail(f"ComfyUI could not load the pack from {pack_dir} (see the log above)", pytrace=False)
    return nodes
