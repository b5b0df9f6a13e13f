"""Workflow plumbing shared by the main job (bench/render.py), the workflow generator
(bench/make_workflows.py) and the tests (tests/test_workflows.py, tests/test_browser.py).

  Graph                 build one workflow once, emit it as UI (LiteGraph 0.4) and API JSON.
  node_defs()           ComfyUI's node definitions (/object_info format), in-process.
  ui_to_api()           UI workflow -> API prompt, the way the frontend's graphToPrompt does.
  validate_ui()         every node type / widget value / link type checked against node defs.
  bypass() / tiny_api() graph surgery on API prompts (dense baseline; CPU-sized substitution).
  write_tiny_vae()      random Wan2.1-VAE-shaped weights that comfy.sd.VAE detects as Wan 2.1.

No ComfyUI import at module level: the pure-JSON helpers work anywhere.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO / "workflows"  # UI format: listed by ComfyUI as example workflows ("templates")
API_DIR = WORKFLOWS_DIR / "api"  # API format: the template scanner's glob is */workflows/*.json, not recursive
TEST_NODES_DIR = REPO / "tests" / "comfy_test_nodes"

TINY_MODEL_NAME = "salad_tiny_wan_t2v.safetensors"
TINY_I2V_MODEL_NAME = "salad_tiny_wan_i2v.safetensors"
TINY_VAE_NAME = "salad_tiny_wan21_vae.safetensors"
TINY_IMAGE_NAME = "salad_tiny_start.png"

# Frontend-only node types (never sent to the server, not in NODE_CLASS_MAPPINGS).
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combos whose options are files on the user's disk: any file name is a valid saved value.
FILE_WIDGETS = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
                ("CLIPVisionLoader", "clip_name"), ("LoadImage", "image"), ("SaladWeightsLoader", "weights_name")}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


# ------------------------------------------------------------------------------------------
# Building workflows
# ------------------------------------------------------------------------------------------

class Node:
    def __init__(self, nid, type_, widgets, inputs, outputs, pos, size, title, extra_ui):
        self.id, self.type = nid, type_
        self.widgets = list(widgets)  # [(name, value)]; API-visible widgets in widget order
        self.inputs = list(inputs)  # [(name, type)] sockets, in definition order
        self.outputs = list(outputs)  # [(name, type)]
        self.pos, self.size, self.title = list(pos), list(size), title
        self.extra_ui = dict(extra_ui)  # name -> UI-only value inserted after that widget


class Graph:
    """A workflow built once and emitted in both formats, so the two can never drift apart."""

    def __init__(self):
        self.nodes: List[Node] = []
        self.links: List[list] = []  # [id, src, src_slot, dst, dst_slot, type]
        self.groups: List[dict] = []

    def add(self, type_, widgets=(), inputs=(), outputs=(), pos=(0, 0), size=(300, 100), title=None,
            extra_ui=None) -> Node:
        n = Node(len(self.nodes) + 1, type_, widgets, inputs, outputs, pos, size, title, extra_ui or {})
        self.nodes.append(n)
        return n

    def link(self, src: Node, out: str, dst: Node, inp: str) -> None:
        so = [o[0] for o in src.outputs].index(out)
        di = [i[0] for i in dst.inputs].index(inp)
        t = src.outputs[so][1]
        assert t == dst.inputs[di][1], f"type mismatch {src.type}.{out} ({t}) -> {dst.type}.{inp} ({dst.inputs[di][1]})"
        assert all(not (l[3] == dst.id and l[4] == di) for l in self.links), f"{dst.type}.{inp} already linked"
        self.links.append([len(self.links) + 1, src.id, so, dst.id, di, t])

    def group(self, title, x, y, w, h, color="#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x, y, w, h], "color": color,
                            "font_size": 24, "flags": {}})

    def to_ui(self, name: str = "salad") -> dict:
        nodes = []
        for order, n in enumerate(self.nodes):
            wv = []
            for name, value in n.widgets:
                wv.append(value)
                if name in n.extra_ui:
                    wv.append(n.extra_ui[name])
            inputs = [{"name": name, "type": t, "link": next((l[0] for l in self.links if l[3] == n.id and l[4] == i), None)}
                      for i, (name, t) in enumerate(n.inputs)]
            outputs = [{"name": name, "type": t, "links": [l[0] for l in self.links if l[1] == n.id and l[2] == i],
                        "slot_index": i} for i, (name, t) in enumerate(n.outputs)]
            props = {"Node name for S&R": n.type}
            if n.type.startswith("Salad"):
                props["cnr_id"] = "comfyui-salad"
            elif n.type not in VIRTUAL_TYPES:
                props["cnr_id"] = "comfy-core"
            d = {"id": n.id, "type": n.type, "pos": n.pos, "size": n.size, "flags": {}, "order": order,
                 "mode": MODE_ALWAYS, "inputs": inputs, "outputs": outputs, "properties": props,
                 "widgets_values": wv}
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-salad/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": [list(l) for l in self.links], "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": "1.32.9"},
                "version": 0.4}

    def to_api(self) -> dict:
        out = {}
        for n in self.nodes:
            if n.type in VIRTUAL_TYPES:
                continue
            inputs: Dict[str, Any] = {name: value for name, value in n.widgets}
            for l in self.links:
                if l[3] == n.id:
                    inputs[n.inputs[l[4]][0]] = [str(l[1]), l[2]]
            out[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or n.type}}
        return out


# ------------------------------------------------------------------------------------------
# Node definitions (in-process ComfyUI)
# ------------------------------------------------------------------------------------------

_DEFS: Optional[Dict[str, dict]] = None


# Built-in extra node files the shipped workflows need (class in that file -> file).
NEEDED_EXTRAS = {"ModelSamplingSD3": "nodes_model_advanced.py", "EmptyHunyuanLatentVideo": "nodes_hunyuan.py",
                 "CreateVideo": "nodes_video.py", "WanImageToVideo": "nodes_wan.py"}


def load_comfy_nodes() -> None:
    """Register, in this process, what the shipped workflows need: the built-in extra node files
    above, this pack (loaded from the repo as a ``custom_nodes`` package, as tests/test_nodes.py
    does) and tests/comfy_test_nodes. Nodes already registered are not loaded again (loading the
    pack twice would define its torch custom ops twice). ComfyUI (CPU mode set) must be importable."""
    import asyncio

    import folder_paths
    import nodes

    extras = Path(folder_paths.base_path) / "comfy_extras"
    todo = [(extras / f, "comfy_extras") for t, f in NEEDED_EXTRAS.items()]
    todo += [(REPO, "custom_nodes"), (TEST_NODES_DIR, "custom_nodes")]
    keys = list(NEEDED_EXTRAS) + ["SaladApply", "SaladTestConditioning"]
    for key, (path, parent) in zip(keys, todo):
        if key in nodes.NODE_CLASS_MAPPINGS:
            continue
        if not asyncio.run(nodes.load_custom_node(str(path), module_parent=parent)):
            raise RuntimeError(f"ComfyUI failed to import {path} (see the log above)")
    global _DEFS
    _DEFS = None


def node_defs() -> Dict[str, dict]:
    """/object_info for every registered node, computed in-process like server.py does."""
    global _DEFS
    if _DEFS is None:
        import nodes
        from comfy_api.internal import _ComfyNodeInternal

        defs = {}
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if issubclass(cls, _ComfyNodeInternal):
                defs[name] = cls.GET_NODE_INFO_V1()
            else:
                it = cls.INPUT_TYPES()
                defs[name] = {"input": it, "input_order": {k: list(v) for k, v in it.items()},
                              "output": list(cls.RETURN_TYPES),
                              "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}
        _DEFS = json.loads(json.dumps(defs, default=str))
    return _DEFS


def def_inputs(d: dict) -> List[Tuple[str, Any, dict, bool]]:
    """[(name, type, options, optional)] in the order the frontend creates them."""
    res = []
    for section in ("required", "optional"):
        spec = d["input"].get(section) or {}
        for name in (d.get("input_order") or {}).get(section, list(spec)):
            v = spec[name]
            t = v[0] if isinstance(v, (list, tuple)) else v
            opts = v[1] if isinstance(v, (list, tuple)) and len(v) > 1 and isinstance(v[1], dict) else {}
            res.append((name, t, opts, section == "optional"))
    return res


def is_widget(t, opts) -> bool:
    return (isinstance(t, list) or t in WIDGET_TYPES) and not opts.get("forceInput")


def combo_options(t, opts) -> Optional[list]:
    return t if isinstance(t, list) else (opts.get("options") if t == "COMBO" else None)


def extra_ui_values(name, t, opts) -> int:
    """UI-only widgets the frontend adds after this one (control_after_generate, image upload)."""
    n = 0
    if t == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        n += 1
    if opts.get("control_after_generate") and combo_options(t, opts) is not None:
        n += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        n += 1
    return n


# ------------------------------------------------------------------------------------------
# UI -> API, validation
# ------------------------------------------------------------------------------------------

def _widget_slots(node: dict, d: dict):
    """Yield (input name, type, opts, value) for each widget of a UI node, skipping UI-only values."""
    values = list(node.get("widgets_values") or [])
    i = 0
    for name, t, opts, _ in def_inputs(d):
        if not is_widget(t, opts):
            continue
        yield name, t, opts, (values[i] if i < len(values) else KeyError(name))
        i += 1 + extra_ui_values(name, t, opts)


def ui_to_api(ui: dict, defs: Optional[Dict[str, dict]] = None) -> dict:
    """API prompt for a UI workflow (muted/virtual nodes dropped, bypassed nodes routed around)."""
    defs = defs or node_defs()
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}

    def source(link_id):
        src_id, slot = links[link_id][1], links[link_id][2]
        src = by_id[src_id]
        if src.get("mode") == MODE_BYPASS:  # pass through the first input of the same type
            t = src["outputs"][slot]["type"]
            for inp in src.get("inputs", []):
                if inp.get("link") is not None and inp["type"] == t:
                    return source(inp["link"])
            return None
        return [str(src_id), slot]

    api = {}
    for n in ui["nodes"]:
        if n["type"] in VIRTUAL_TYPES or n.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        d = defs[n["type"]]
        inputs = {name: v for name, _, _, v in _widget_slots(n, d) if not isinstance(v, KeyError)}
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                src = source(inp["link"])
                if src is not None:
                    inputs[inp["name"]] = src
        api[str(n["id"])] = {"inputs": inputs, "class_type": n["type"], "_meta": {"title": n.get("title") or n["type"]}}
    return api


def _check_value(node_type, name, t, opts, v) -> Optional[str]:
    where = f"{node_type}.{name}"
    if isinstance(v, KeyError):
        return f"{where}: missing widget value"
    options = combo_options(t, opts)
    if options is not None:
        if (node_type, name) in FILE_WIDGETS:
            return None if isinstance(v, str) and v else f"{where}: expected a file name, got {v!r}"
        return None if v in options else f"{where}: {v!r} not in {options}"
    if t in ("INT", "FLOAT"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (t == "INT" and not float(v).is_integer()):
            return f"{where}: expected {t}, got {v!r}"
        lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
        return None if lo <= v <= hi else f"{where}: {v} outside [{lo}, {hi}]"
    if t == "STRING":
        return None if isinstance(v, str) else f"{where}: expected STRING, got {v!r}"
    if t == "BOOLEAN":
        return None if isinstance(v, bool) else f"{where}: expected BOOLEAN, got {v!r}"
    return None


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def validate_ui(ui: dict, defs: Optional[Dict[str, dict]] = None) -> List[str]:
    """Problems with a UI workflow against the registered node definitions ([] = valid)."""
    defs = defs or node_defs()
    errs: List[str] = []
    if ui.get("version") != 0.4:
        errs.append(f"version {ui.get('version')!r}, expected 0.4")
    by_id = {n["id"]: n for n in ui["nodes"]}
    if len(by_id) != len(ui["nodes"]):
        errs.append("duplicate node ids")
    if ui.get("last_node_id", 0) < max(by_id, default=0):
        errs.append("last_node_id below the largest node id")
    if ui.get("last_link_id", 0) < max((l[0] for l in ui["links"]), default=0):
        errs.append("last_link_id below the largest link id")
    for n in ui["nodes"]:
        t = n["type"]
        if t in VIRTUAL_TYPES:
            continue
        if t not in defs:
            errs.append(f"node {n['id']}: unknown type {t!r}")
            continue
        d = defs[t]
        ins = def_inputs(d)
        want = sum(1 + extra_ui_values(nm, ty, op) for nm, ty, op, _ in ins if is_widget(ty, op))
        got = len(n.get("widgets_values") or [])
        if got != want:
            errs.append(f"node {n['id']} {t}: {got} widgets_values, definition has {want}")
        errs += [f"node {n['id']} {e}" for e in
                 filter(None, (_check_value(t, nm, ty, op, v) for nm, ty, op, v in _widget_slots(n, d)))]
        sockets = {nm: (ty, opt) for nm, ty, op, opt in ins if not is_widget(ty, op)}
        widget_names = {nm for nm, ty, op, _ in ins if is_widget(ty, op)}
        for i, inp in enumerate(n.get("inputs", [])):
            nm = inp["name"]
            if nm not in sockets and not (nm in widget_names and "widget" in inp):
                errs.append(f"node {n['id']} {t}: input {nm!r} not in its definition")
            elif nm in sockets and inp["type"] != sockets[nm][0]:
                errs.append(f"node {n['id']} {t}: input {nm} typed {inp['type']}, definition {sockets[nm][0]}")
        linked = {inp["name"] for inp in n.get("inputs", []) if inp.get("link") is not None}
        for nm, (ty, optional) in sockets.items():
            if not optional and nm not in linked:
                errs.append(f"node {n['id']} {t}: required input {nm} ({ty}) is not connected")
        outs = d.get("output") or []
        if len(n.get("outputs", [])) != len(outs):
            errs.append(f"node {n['id']} {t}: {len(n.get('outputs', []))} outputs, definition has {len(outs)}")
        for i, o in enumerate(n.get("outputs", [])[:len(outs)]):
            if o["type"] != outs[i]:
                errs.append(f"node {n['id']} {t}: output {i} typed {o['type']}, definition {outs[i]}")
    for l in ui["links"]:
        lid, s, ss, dd, ds, lt = l[:6]
        if s not in by_id or dd not in by_id:
            errs.append(f"link {lid}: dangling node id")
            continue
        so = by_id[s].get("outputs", [])
        di = by_id[dd].get("inputs", [])
        if ss >= len(so) or ds >= len(di):
            errs.append(f"link {lid}: slot out of range")
            continue
        if lid not in (so[ss].get("links") or []) or di[ds].get("link") != lid:
            errs.append(f"link {lid}: not recorded on both ends")
        st, dt = so[ss]["type"], di[ds]["type"]
        if by_id[s]["type"] not in VIRTUAL_TYPES and by_id[s]["type"] in defs:
            st = (defs[by_id[s]["type"]].get("output") or [st] * (ss + 1))[ss]
        if not (_types_match(st, lt) and _types_match(lt, dt)):
            errs.append(f"link {lid}: {by_id[s]['type']}[{ss}] {st} -> {by_id[dd]['type']}.{di[ds]['name']} {dt} (link says {lt})")
    return errs


# ------------------------------------------------------------------------------------------
# API prompt surgery
# ------------------------------------------------------------------------------------------

def find(api: dict, class_type: str) -> List[str]:
    return [k for k, v in api.items() if v["class_type"] == class_type]


def bypass(api: dict, node_id: str, drop: Iterable[str] = ()) -> dict:
    """Copy of ``api`` with ``node_id`` bypassed (its consumers fed from its same-typed input; like
    the frontend's Bypass for SaladApply: MODEL in -> MODEL out) and the ``drop`` nodes removed."""
    api = copy.deepcopy(api)
    src = api[node_id]["inputs"]["model"]
    for k in list(drop) + [node_id]:
        api.pop(k, None)
    for v in api.values():
        for name, val in v["inputs"].items():
            if isinstance(val, list) and len(val) == 2 and val[0] == node_id:
                v["inputs"][name] = list(src)
    return api


def tiny_api(api: dict, model_name=TINY_MODEL_NAME, vae_name=TINY_VAE_NAME, width=256, height=256, length=9,
             steps=4, image_name=TINY_IMAGE_NAME) -> dict:
    """CPU-sized copy of a shipped API workflow: no text encoder / CLIP vision files exist, so
    CLIPLoader + CLIPTextEncode become SaladTestConditioning (positive random, negative zeros),
    CLIP vision is dropped (optional input of WanImageToVideo), model/VAE/image point at tiny files,
    the latent and step count shrink. Everything else (SALAD nodes, sampler, decode, save) is kept."""
    api = copy.deepcopy(api)
    for k in find(api, "CLIPTextEncode"):
        text = api[k]["inputs"]["text"]
        negative = "negative" in api[k]["_meta"]["title"].lower()
        api[k] = {"class_type": "SaladTestConditioning", "_meta": {"title": f"test conditioning ({text[:30]}...)"},
                  "inputs": {"batch": 1, "seed": 1, "mode": "zeros" if negative else "random"}}
    for k in find(api, "CLIPLoader") + find(api, "CLIPVisionLoader") + find(api, "CLIPVisionEncode"):
        api.pop(k)
    for v in api.values():
        v["inputs"].pop("clip_vision_output", None)
        ct, inp = v["class_type"], v["inputs"]
        if ct == "UNETLoader":
            inp["unet_name"], inp["weight_dtype"] = model_name, "default"
        elif ct == "VAELoader":
            inp["vae_name"] = vae_name
        elif ct == "LoadImage":
            inp["image"] = image_name
        elif ct in ("EmptyHunyuanLatentVideo", "WanImageToVideo"):
            inp.update(width=width, height=height, length=length)
        elif ct in ("KSampler", "KSamplerAdvanced"):
            inp["steps"] = steps
    return api


def with_files(api: dict, model=None, text_encoder=None, vae=None) -> dict:
    """Copy of a shipped API workflow with only the model file names replaced."""
    api = copy.deepcopy(api)
    for v in api.values():
        ct, inp = v["class_type"], v["inputs"]
        if ct == "UNETLoader" and model:
            inp["unet_name"] = model
        elif ct == "CLIPLoader" and text_encoder:
            inp["clip_name"] = text_encoder
        elif ct == "VAELoader" and vae:
            inp["vae_name"] = vae
    return api


# ------------------------------------------------------------------------------------------
# Tiny model files
# ------------------------------------------------------------------------------------------

def write_tiny_vae(path, dim: int = 4, seed: int = 0) -> Path:
    """Random weights with the Wan2.1 VAE's key names and layout (ComfyUI reads ``dim`` from
    ``decoder.head.0.gamma``, so dim 4 instead of 96 keeps CPU decode at ~3 s for 9x256x256).
    Needs ComfyUI importable (uses comfy.ldm.wan.vae for the exact structure)."""
    import torch
    from safetensors.torch import save_file

    import comfy.ldm.wan.vae as wan_vae

    m = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in m.state_dict().items():  # comfy.ops skips init: fill every tensor ourselves
        if k.endswith("gamma"):
            t = torch.ones(v.shape)
        elif k.endswith("bias"):
            t = torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=g) / math.sqrt(max(1, v[0].numel()))
        sd[k] = t.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"salad.note": "RANDOM weights, Wan2.1-VAE layout, for CPU tests"})
    return path


def write_tiny_image(path, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def load_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def shipped(kind: str = "ui") -> List[Path]:
    d = WORKFLOWS_DIR if kind == "ui" else API_DIR
    return sorted(d.glob("*.json"))
