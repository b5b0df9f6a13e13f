"""Render workflows/<name>.jpg thumbnails (shown by ComfyUI's template browser next to each example
workflow) by loading each UI workflow into the real frontend in headless chromium.

    python bench/make_thumbnails.py       # needs .ci/setup_comfyui.sh done and /usr/bin/chromium
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import workflow_tools as wt  # noqa: E402
from bench.comfy_server import ComfyServer  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    root = Path(os.environ.get("COMFYUI_PATH") or wt.REPO / ".comfy" / "ComfyUI").resolve()
    with tempfile.TemporaryDirectory() as home, \
            ComfyServer(root, cpu=True, extra_args=["--user-directory", home, "--database-url", "sqlite:///:memory:"]) as srv, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.goto(srv.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph")
        pg.wait_for_timeout(3000)
        for _ in range(5):
            pg.keyboard.press("Escape")
        for btn in pg.locator(".p-dialog:visible button:has(i.pi-times)").all():
            btn.click()
        pg.evaluate("async () => { try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {} }")
        pg.mouse.move(800, 600)  # no tooltip
        for path in wt.shipped("ui"):
            pg.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wt.load_json(path))
            pg.wait_for_timeout(800)
            pg.evaluate("""() => {
                const c = window.app.canvas; const b = [Infinity, Infinity, -Infinity, -Infinity];
                for (const n of window.app.graph._nodes) { if (n.pos[0] < 0) continue;
                  b[0] = Math.min(b[0], n.pos[0]); b[1] = Math.min(b[1], n.pos[1]);
                  b[2] = Math.max(b[2], n.pos[0] + n.size[0]); b[3] = Math.max(b[3], n.pos[1] + n.size[1]); }
                const s = Math.min(1480 / (b[2] - b[0]), 760 / (b[3] - b[1] + 40));
                c.ds.scale = s; c.ds.offset = [70 / s - b[0], 150 / s - (b[1] - 40)]; c.setDirty(true, true);
            }""")
            pg.wait_for_timeout(500)
            png = pg.screenshot(clip={"x": 60, "y": 125, "width": 1520, "height": 810})
            img = Image.open(io.BytesIO(png)).convert("RGB")
            img.thumbnail((768, 768))
            out = path.with_suffix(".jpg")
            img.save(out, quality=85)
            print(f"wrote {out.relative_to(wt.REPO)} {img.size}")
        browser.close()


if __name__ == "__main__":
    main()
