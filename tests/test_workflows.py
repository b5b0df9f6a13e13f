"""Shipped example workflows (workflows/*.json UI, workflows/api/*.json API) against the real ComfyUI:

* every UI workflow validates against the registered node definitions (types exist, widget
  counts and values, link types) and converts (frontend-style) to exactly its API file;
* every API workflow runs through ComfyUI's own executor on tiny random Wan2.1 models, with
  the same CPU substitution the main job uses (bench/workflow_tools.tiny_api);
* ComfyUI's /workflow_templates lists the UI files (only) under this pack and serves them;
* the generator (bench/make_workflows.py) reproduces the committed files.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import uuid
from pathlib import Path

import pytest

from bench import workflow_tools as wt

UI_FILES = wt.shipped("ui")
API_FILES = wt.shipped("api")
NAMES = [p.stem for p in UI_FILES]


@pytest.fixture(scope="module")
def defs(comfy):
    wt.load_comfy_nodes()
    return wt.node_defs()


@pytest.fixture(scope="module")
def tiny_files(comfy, tiny_wan_path, tiny_wan_i2v_path):
    import folder_paths

    vae = Path(folder_paths.get_folder_paths("vae")[0]) / wt.TINY_VAE_NAME
    if not vae.exists():
        wt.write_tiny_vae(vae)
    wt.write_tiny_image(Path(folder_paths.get_input_directory()) / wt.TINY_IMAGE_NAME)
    folder_paths.filename_list_cache.clear()
    assert tiny_wan_path.name == wt.TINY_MODEL_NAME and tiny_wan_i2v_path.name == wt.TINY_I2V_MODEL_NAME
    return vae


def test_three_workflows_shipped_in_both_formats():
    assert sorted(NAMES) == sorted(["salad_wan2.1_t2v_1.3B_480p", "salad_wan2.1_t2v_14B_720p",
                                    "salad_wan2.1_i2v_14B_480p"])
    assert [p.stem for p in API_FILES] == NAMES


def test_generator_reproduces_committed_files():
    from bench import make_workflows as mw

    for name, kw in mw.WORKFLOWS.items():
        g = mw.build(prefix=f"video/{name}", **kw)
        assert wt.load_json(wt.WORKFLOWS_DIR / f"{name}.json") == json.loads(json.dumps(g.to_ui(name))), \
            f"{name}: UI file is stale, run `python bench/make_workflows.py`"
        assert wt.load_json(wt.API_DIR / f"{name}.json") == json.loads(json.dumps(g.to_api())), \
            f"{name}: API file is stale, run `python bench/make_workflows.py`"


def test_workflow_contents_match_the_spec():
    ui = wt.load_json(wt.WORKFLOWS_DIR / "salad_wan2.1_t2v_1.3B_480p.json")
    by_type = {}
    for n in ui["nodes"]:
        by_type.setdefault(n["type"], []).append(n["widgets_values"])
    assert by_type["UNETLoader"] == [["wan2.1_t2v_1.3B_fp16.safetensors", "default"]]
    assert by_type["CLIPLoader"][0][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    assert by_type["VAELoader"] == [["wan_2.1_vae.safetensors"]]
    assert len(by_type["CLIPTextEncode"]) == 2
    assert by_type["EmptyHunyuanLatentVideo"] == [[832, 480, 81, 1]]
    assert by_type["ModelSamplingSD3"] == [[8.0]]
    assert by_type["SaladApply"] == [["topk", 0.9, 0, 0.0, 1.0, 0, "auto", "top", "128"]]
    assert by_type["SaladWeightsLoader"] == [["none (training-free)"]]
    ks = by_type["KSampler"][0]
    assert ks[2:6] == [30, 6.0, "uni_pc", "simple"]
    assert by_type["CreateVideo"] == [[16.0]]
    for t in ("VAEDecode", "SaveVideo", "SaladStats", "PreviewImage"):
        assert t in by_type
    big = {n["type"]: n["widgets_values"] for n in wt.load_json(wt.WORKFLOWS_DIR / "salad_wan2.1_t2v_14B_720p.json")["nodes"]}
    assert big["EmptyHunyuanLatentVideo"][:3] == [1280, 720, 81] and "14B" in big["UNETLoader"][0]
    i2v = {n["type"]: n for n in wt.load_json(wt.WORKFLOWS_DIR / "salad_wan2.1_i2v_14B_480p.json")["nodes"]}
    for t in ("LoadImage", "CLIPVisionLoader", "CLIPVisionEncode", "WanImageToVideo"):
        assert t in i2v
    assert i2v["WanImageToVideo"]["widgets_values"][:3] == [832, 480, 81]


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_validates_against_node_definitions(defs, name):
    ui = wt.load_json(wt.WORKFLOWS_DIR / f"{name}.json")
    assert wt.validate_ui(ui, defs) == []
    for n in ui["nodes"]:  # every non-virtual type is registered, SALAD's included
        assert n["type"] in wt.VIRTUAL_TYPES or n["type"] in defs
    assert {"SaladApply", "SaladWeightsLoader", "SaladStats"} <= {n["type"] for n in ui["nodes"]}


@pytest.mark.parametrize("name", NAMES)
def test_ui_converts_to_the_shipped_api_file(defs, name):
    ui = wt.load_json(wt.WORKFLOWS_DIR / f"{name}.json")
    api = wt.load_json(wt.API_DIR / f"{name}.json")
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert strip(wt.ui_to_api(ui, defs)) == strip(api)


def test_validator_catches_broken_workflows(defs):
    ui = wt.load_json(wt.WORKFLOWS_DIR / "salad_wan2.1_t2v_1.3B_480p.json")
    node = lambda u, t: next(n for n in u["nodes"] if n["type"] == t)  # noqa: E731

    bad = copy.deepcopy(ui)
    node(bad, "SaladApply")["widgets_values"][0] = "dense"  # not an option
    node(bad, "SaladApply")["widgets_values"][1] = 1.5  # sparsity above max 0.99
    node(bad, "KSampler")["widgets_values"].pop(1)  # lost control_after_generate value
    bad["nodes"].append({**copy.deepcopy(node(ui, "VAEDecode")), "id": 99, "type": "NoSuchNode", "inputs": [], "outputs": []})
    link = next(l for l in bad["links"] if l[5] == "VAE")
    link[5] = "MODEL"
    errs = "\n".join(wt.validate_ui(bad, defs))
    for frag in ("'dense' not in", "outside [0.0, 0.99]", "KSampler: 6 widgets_values", "unknown type 'NoSuchNode'",
                 f"link {link[0]}:"):
        assert frag in errs, errs


def test_bypass_feeds_ksampler_from_model_sampling():
    api = wt.load_json(wt.API_DIR / "salad_wan2.1_t2v_1.3B_480p.json")
    sid, ks, msd = wt.find(api, "SaladApply")[0], wt.find(api, "KSampler")[0], wt.find(api, "ModelSamplingSD3")[0]
    dense = wt.bypass(api, sid, drop=wt.find(api, "SaladStats") + wt.find(api, "PreviewImage"))
    assert sid not in dense and not wt.find(dense, "SaladStats")
    assert dense[ks]["inputs"]["model"] == [msd, 0]


def _run(prompt):
    import execution

    class Server:
        client_id, last_node_id = None, None
        messages = []

        def send_sync(self, event, data, sid=None):
            self.messages.append((event, data))

    server = Server()
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 16.0})
    pid = str(uuid.uuid4())
    valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert valid, f"prompt invalid: {err} {node_errors}"
    ex.execute(prompt, pid, {"client_id": "salad-workflow-test"}, outputs)
    errors = [d for e, d in server.messages if e == "execution_error"]
    assert not errors, f"{errors[0]['node_type']}: {errors[0]['exception_message']}\n{''.join(errors[0]['traceback'][-5:])}"
    return ex.history_result["outputs"]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_executes_on_tiny_models(defs, tiny_files, name):
    import folder_paths

    api = wt.load_json(wt.API_DIR / f"{name}.json")
    i2v = bool(wt.find(api, "WanImageToVideo"))
    prompt = wt.tiny_api(api, model_name=wt.TINY_I2V_MODEL_NAME if i2v else wt.TINY_MODEL_NAME,
                         width=128, height=128, length=5, steps=2)
    save = wt.find(prompt, "SaveVideo")[0]
    prompt[save]["inputs"]["filename_prefix"] = f"wf_test/{name}"
    assert {"SaladApply", "SaladWeightsLoader", "SaladStats", "KSampler", "VAEDecode"} <= {
        v["class_type"] for v in prompt.values()}
    outs = _run(prompt)

    files = (outs[save].get("images") or outs[save].get("videos"))
    video = Path(folder_paths.get_output_directory()) / files[0]["subfolder"] / files[0]["filename"]
    assert video.suffix == ".mp4" and video.stat().st_size > 0
    text = "".join(map(str, outs[wt.find(prompt, "SaladStats")[0]]["text"]))
    assert "measured sparsity:" in text and "n/a" not in text.split("measured sparsity:")[1].split(";")[0]


def _import_custom_node_manager():
    """app.custom_node_manager imports ComfyUI's ``utils`` package. ComfyUI's nodes.py puts
    ``<ComfyUI>/comfy`` first on sys.path, so once it is imported, ``import utils`` finds
    comfy/utils.py instead (main.py avoids this by importing utils.extra_config first). Import the
    package with that entry moved aside, then put everything back."""
    import importlib
    import sys

    import folder_paths

    comfy_dir = str(Path(folder_paths.base_path) / "comfy")
    shadow = sys.modules.get("utils")
    saved_path = list(sys.path)
    if shadow is not None and not hasattr(shadow, "__path__"):
        del sys.modules["utils"]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(comfy_dir)]
    try:
        return importlib.import_module("app.custom_node_manager").CustomNodeManager
    finally:
        sys.path[:] = saved_path
        if shadow is not None and not hasattr(shadow, "__path__"):
            sys.modules["utils"] = shadow


def test_template_browser_lists_ui_workflows_under_the_pack(comfy, tmp_path):
    """GET /workflow_templates via ComfyUI's own CustomNodeManager routes, with the pack linked into a
    custom_nodes folder as .ci/setup_comfyui.sh does; UI files listed, API files not; files served."""
    import folder_paths
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    CustomNodeManager = _import_custom_node_manager()

    cn = tmp_path / "custom_nodes"
    cn.mkdir()
    (cn / "salad").symlink_to(wt.REPO, target_is_directory=True)
    saved = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(cn)], saved[1])

    async def go():
        routes = web.RouteTableDef()
        app = web.Application()
        CustomNodeManager().add_routes(routes, app, [("salad", os.path.abspath(cn / "salad"))])
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            served = {}
            for name in listing.get("salad", []):
                r = await client.get(f"/api/workflow_templates/salad/{name}.json")
                served[name] = (r.status, await r.json() if r.status == 200 else None)
            return listing, served

    try:
        listing, served = asyncio.run(go())
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved
    assert sorted(listing["salad"]) == sorted(NAMES)
    for name in NAMES:
        status, data = served[name]
        assert status == 200 and data == wt.load_json(wt.WORKFLOWS_DIR / f"{name}.json")
