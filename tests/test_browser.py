"""The shipped 1.3B workflow in the real ComfyUI frontend (headless Debian chromium via playwright).

Starts ComfyUI (main.py --cpu) on 127.0.0.1 with a fresh user dir, opens it, closes the Templates
dialog, checks that /workflow_templates lists the pack's examples, loads
workflows/salad_wan2.1_t2v_1.3B_480p.json with app.loadGraphData, checks that no node is missing
and the SALAD nodes render with their widgets, changes the sparsity widget, queues the prompt,
checks that /prompt accepted it (with the new value) and saves a screenshot to
test-artifacts/browser-salad-workflow.png.

Model files: the workflow's file names are linked to the tiny random checkpoint and VAE of the main
job (bench/render.py) and an empty stand-in text encoder, so the prompt passes ComfyUI's
validation; execution then stops at CLIPLoader (no real umT5 can exist here), which is asserted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from bench import workflow_tools as wt

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = wt.REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser-salad-workflow.png"
TEMPLATES_SHOT = ARTIFACTS / "browser-salad-templates.png"
WORKFLOW = wt.WORKFLOWS_DIR / "salad_wan2.1_t2v_1.3B_480p.json"
SALAD_WIDGETS = ["sparse_mode", "sparsity", "topk", "gate_drop_percentile", "linear_scale", "dense_steps", "backend", "gate_drop_plan",
                 "topk_query_block"]


def _comfy_root() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or wt.REPO / ".comfy" / "ComfyUI").resolve()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)")
    pytest.importorskip("playwright.sync_api")
    root = _comfy_root()
    if not (root / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {root}: run bash .ci/setup_comfyui.sh", pytrace=False)
    from bench import render
    from bench.comfy_server import ComfyServer

    render.prepare_tiny(root)  # tiny checkpoint + VAE in .cache/salad_main_job (reused across runs)
    home = tmp_path_factory.mktemp("browser_comfy")
    ui = wt.load_json(WORKFLOW)
    names = {n["type"]: n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("UNETLoader", "CLIPLoader", "VAELoader")}
    dm, vae, te = (home / "models" / d for d in ("diffusion_models", "vae", "text_encoders"))
    for d in (dm, vae, te, home / "user", home / "output", home / "input"):
        d.mkdir(parents=True, exist_ok=True)
    (dm / names["UNETLoader"]).symlink_to(render.CACHE / "models" / "diffusion_models" / wt.TINY_MODEL_NAME)
    (vae / names["VAELoader"]).symlink_to(render.CACHE / "models" / "vae" / wt.TINY_VAE_NAME)
    (te / names["CLIPLoader"]).write_bytes(b"not a text encoder")
    yaml = home / "extra_model_paths.yaml"
    yaml.write_text(f"salad_browser_test:\n    base_path: {home / 'models'}\n    diffusion_models: diffusion_models\n"
                    f"    vae: vae\n    text_encoders: text_encoders\n")
    srv = ComfyServer(root, cpu=True, extra_model_paths=yaml, log_path=home / "comfyui.log",
                      extra_args=["--user-directory", str(home / "user"), "--output-directory", str(home / "output"),
                                  "--input-directory", str(home / "input"), "--database-url", "sqlite:///:memory:"])
    with srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            pg = browser.new_page(viewport={"width": 1700, "height": 1000})
            pg.set_default_timeout(90_000)
            pg.goto(server.url, wait_until="domcontentloaded")
            pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && document.querySelector('canvas')")
            yield pg
        finally:
            browser.close()


def _close_dialogs(pg, wait_s=20.0):
    """Close the Templates dialog that opens on first load (and any other modal dialog)."""
    try:
        pg.locator(".p-dialog").first.wait_for(state="visible", timeout=wait_s * 1000)
    except Exception:
        return  # none appeared
    for _ in range(10):
        if not pg.locator(".p-dialog:visible").count():
            return
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(400)
        for btn in pg.locator(".p-dialog:visible .p-dialog-close-button, .p-dialog:visible button:has(i.pi-times)").all():
            try:
                btn.click(timeout=1000)
            except Exception:
                pass


def test_templates_route_lists_the_pack_examples(server):
    listing = server.get("/workflow_templates")
    assert sorted(listing.get("salad", [])) == sorted(p.stem for p in wt.shipped("ui")), listing
    served = server.get(f"/api/workflow_templates/salad/{WORKFLOW.name}")
    assert served == wt.load_json(WORKFLOW)


def test_salad_workflow_in_the_frontend(server, page):
    pg = page
    # The Templates dialog (opens on first load) lists this pack's examples under EXTENSIONS > salad.
    dlg = pg.locator(".workflow-template-selector-dialog").first
    dlg.wait_for(state="visible", timeout=30_000)
    nav = dlg.locator("nav").first
    # Waited for, not read once: the nav fills in after the dialog shows (CI once read "..." rows).
    entry = nav.get_by_text("salad", exact=True)
    entry.wait_for(state="visible", timeout=30_000)
    entry.click()
    for p in wt.shipped("ui"):
        dlg.get_by_text(p.stem, exact=False).first.wait_for(state="visible", timeout=15_000)
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(TEMPLATES_SHOT))
    _close_dialogs(pg)
    if pg.locator(".p-dialog:visible").count():
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "browser-dialog-not-closed.png"))
        html = pg.locator(".p-dialog:visible").first.evaluate("e => e.outerHTML")[:3000]
        pytest.fail(f"a dialog is still open after closing the Templates dialog: {html}")

    workflow = wt.load_json(WORKFLOW)
    pg.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, 'salad_wan2.1_t2v_1.3B_480p'); }", workflow)
    pg.wait_for_timeout(1500)
    dialogs = [d.inner_text() for d in pg.locator(".p-dialog:visible").all()]
    assert not dialogs, f"dialog after loading the workflow (missing nodes/models?): {dialogs}"

    info = pg.evaluate("""() => {
        const g = window.app.graph;
        return g._nodes.map(n => ({id: n.id, type: n.type, has_error: !!n.has_errors,
            registered: !!window.LiteGraph.registered_node_types[n.type],
            widgets: (n.widgets || []).map(w => [w.name, w.value])}));
    }""")
    assert len(info) == len(workflow["nodes"])
    missing = [n["type"] for n in info if not n["registered"]]
    assert not missing, f"node types not registered in the frontend: {missing}"
    by_type = {n["type"]: n for n in info}
    apply_w = by_type["SaladApply"]["widgets"]
    assert [w[0] for w in apply_w] == SALAD_WIDGETS
    assert [w[1] for w in apply_w] == ["topk", pytest.approx(0.9), 0, 0, 1, 0, "auto", "top", "128"]
    assert by_type["SaladWeightsLoader"]["widgets"][0] == ["weights_name", "none (training-free)"]
    assert "SaladStats" in by_type

    # Change a widget as a user would, then queue through the frontend.
    pg.evaluate("""() => {
        const n = window.app.graph._nodes.find(n => n.type === 'SaladApply');
        const w = n.widgets.find(w => w.name === 'sparsity');
        w.value = 0.8; w.callback?.(0.8);
        window.app.graph.setDirtyCanvas(true, true);
    }""")
    with pg.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as resp_info:
        pg.evaluate("() => window.app.queuePrompt(0, 1)")
    resp = resp_info.value
    body = resp.json()
    sent = json.loads(resp.request.post_data)["prompt"]
    assert resp.status == 200 and body.get("prompt_id") and not body.get("node_errors"), body
    salad = next(v for v in sent.values() if v["class_type"] == "SaladApply")
    assert salad["inputs"]["sparsity"] == pytest.approx(0.8)
    assert {v["class_type"] for v in sent.values()} >= {"SaladApply", "SaladWeightsLoader", "SaladStats", "KSampler"}

    # Tiny mode: the stand-in text encoder cannot load, so the run must stop exactly there.
    deadline = time.time() + 60
    entry = None
    while time.time() < deadline:
        entry = server.get(f"/history/{body['prompt_id']}").get(body["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert entry is not None, "queued prompt never reached the history"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "CLIPLoader", entry["status"]

    _close_dialogs(pg, wait_s=2)
    pg.evaluate("""() => {  // readable zoom (below ~0.6 LiteGraph stops drawing widget text), loaders..save in view
        const c = window.app.canvas;
        c.ds.scale = 0.68; c.ds.offset = [110, 140];
        c.setDirty(true, true);
    }""")
    pg.wait_for_timeout(800)
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT}", file=sys.stderr)
    assert SCREENSHOT.stat().st_size > 10_000
