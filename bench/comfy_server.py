"""Run a real ComfyUI server (main.py) on 127.0.0.1 and drive it over HTTP + websocket.

    with ComfyServer(comfy_root, extra_model_paths=yaml) as srv:
        pid = srv.queue(api_prompt)
        entry = srv.wait(pid)                 # /history entry; raises on execution errors
        srv.node_times(pid)["10"]             # wall seconds of node 10 (from websocket messages)
        srv.step_times(pid)                   # arrival times of the sampler's progress messages

Used by bench/render.py (main job) and tests/test_browser.py. Only the standard library plus
aiohttp (a ComfyUI requirement) for the websocket.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    pass


class ComfyServer:
    def __init__(self, comfy_root, python: str = sys.executable, port: Optional[int] = None, cpu: Optional[bool] = None,
                 extra_args: Sequence[str] = (), extra_model_paths: Optional[Path] = None,
                 log_path: Optional[Path] = None, env: Optional[dict] = None, startup_timeout: float = 180):
        self.root = Path(comfy_root)
        self.python = python
        self.port = port or free_port()
        if cpu is None:
            try:
                import torch

                cpu = not torch.cuda.is_available()
            except Exception:
                cpu = True
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.extra_model_paths = extra_model_paths
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.messages: List[tuple] = []  # (perf_counter, message dict) from the websocket
        self._ws_thread = None
        self._ws_loop = None
        self._log = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--log-stdout"]
        if self.cpu:
            cmd.append("--cpu")
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        cmd += self.extra_args
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up{self._log_hint()}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        else:
            raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s{self._log_hint()}")
        self._start_ws()
        return self

    def stop(self) -> None:
        if self._ws_loop is not None:
            self._ws_loop.call_soon_threadsafe(self._ws_loop.stop)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail)

    # ---- HTTP -------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from None

    def queue(self, prompt: dict, extra_data: Optional[dict] = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        res = self.post("/prompt", body)
        if res.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(res['node_errors'])[:4000]}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                st = entry["status"]
                if st.get("status_str") != "success":
                    errs = [m[1] for m in st.get("messages", []) if m[0] == "execution_error"]
                    detail = errs[0] if errs else st
                    if isinstance(detail, dict):
                        detail = (f"node {detail.get('node_id')} ({detail.get('node_type')}): "
                                  f"{detail.get('exception_type')}: {detail.get('exception_message')}\n"
                                  + "".join(detail.get("traceback", [])[-6:]))
                    raise ComfyError(f"prompt {prompt_id} failed: {detail}{self._log_hint()}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died (exit {self.proc.returncode}){self._log_hint()}")
            time.sleep(0.2)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    # ---- websocket timing -------------------------------------------------------------------
    def _start_ws(self) -> None:
        import aiohttp

        ready = threading.Event()

        async def listen():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                        max_msg_size=0) as ws:
                    ready.set()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append((time.perf_counter(), json.loads(msg.data)))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        def run():
            loop = asyncio.new_event_loop()
            self._ws_loop = loop
            task = loop.create_task(listen())
            try:
                loop.run_forever()
            finally:
                task.cancel()
                try:
                    loop.run_until_complete(task)
                except BaseException:
                    pass
                loop.close()

        self._ws_thread = threading.Thread(target=run, daemon=True, name="comfy-ws")
        self._ws_thread.start()
        ready.wait(10)

    def _events(self, prompt_id: str):
        return [(t, m) for t, m in list(self.messages) if (m.get("data") or {}).get("prompt_id") == prompt_id]

    def node_times(self, prompt_id: str) -> Dict[str, float]:
        """Wall seconds per executed node: from its 'executing' message to the next one."""
        ev = [(t, m["data"]["node"]) for t, m in self._events(prompt_id) if m["type"] == "executing"]
        return {node: ev[i + 1][0] - t for i, (t, node) in enumerate(ev[:-1]) if node is not None}

    def step_times(self, prompt_id: str, node: Optional[str] = None) -> List[float]:
        """perf_counter() arrival times of 'progress' messages (one per sampler step)."""
        seen = defaultdict(list)
        for t, m in self._events(prompt_id):
            if m["type"] == "progress":
                seen[(m["data"].get("node"), m["data"].get("max"))].append(t)
        if node is not None:
            seen = {k: v for k, v in seen.items() if k[0] == node}
        return max(seen.values(), key=len) if seen else []
