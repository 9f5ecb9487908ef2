"""Headless Chromium driven over the DevTools protocol, for the frontend tests (test_nodes_workflows.py,
test_web_heatmap.py).

* ``find_chromium()``: ``$CASA_CHROMIUM`` (a path or a command name), else the first of ``chromium``,
  ``chromium-browser``, ``google-chrome``, ``google-chrome-stable`` on the PATH, else None.
* ``require_chromium(what)``: that binary, or a skip through conftest's ``_skip_or_fail`` (a failure when
  ``CASA_REQUIRE_COMFYUI=1``) when there is none or aiohttp is missing.
* ``Chromium(exe, window=(w, h))``: the browser in a fresh profile (removed by ``close()``) with one page
  of that size; ``call`` (any CDP method), ``eval`` (a JS expression, promises awaited, the value
  returned), ``wait_for``, ``mouse``, ``click``, ``press``, ``screenshot``, and for ComfyUI's page
  ``open_comfy`` and ``load_workflow``; ``reload``. ``console`` collects the page's console calls ("<type>: ...") and
  uncaught exceptions ("exception: ...").

The client uses aiohttp, one of ComfyUI's requirements. No ``__init__.py`` here: modules in tests/comfy
are imported by their base name.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def find_chromium() -> str | None:
    exe = os.environ.get("CASA_CHROMIUM")
    if exe:
        return exe if Path(exe).exists() else shutil.which(exe)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium(what: str) -> str:
    """The Chromium binary, or skip the calling test / fixture (conftest's mechanism)."""
    import conftest

    exe = find_chromium()
    if exe is None:
        conftest._skip_or_fail(f"no Chromium for {what}: install it (Debian: apt-get install -y chromium) or set "
                               "CASA_CHROMIUM to a Chromium/Chrome binary")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        conftest._skip_or_fail("aiohttp (one of ComfyUI's requirements) is missing in this Python")
    return exe


def quiet_frontend_settings(base_dir) -> None:
    """The frontend's user settings in a ComfyUI base dir: no first-run tutorial dialog, no minimap over
    the canvas, the right side panel closed (other settings there are kept)."""
    settings = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(settings.read_text()) if settings.exists() else {}
    current.update({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.RightSidePanel.IsOpen": False})
    settings.write_text(json.dumps(current))


class Chromium:
    """Headless Chromium (flags of comfyui-notes §7) and one page of ``window`` CSS pixels, over CDP."""

    def __init__(self, exe: str, window: tuple[int, int] = (1400, 900)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="casa-chromium-")
        self.log_path = Path(self.profile) / "chromium.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
             f"--window-size={window[0]},{window[1]}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=5) as r:
                    page = next(t for t in json.load(r) if t["type"] == "page")
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"Chromium did not start (log {self.log_path})") from None
                time.sleep(0.2)
        self.loop = asyncio.new_event_loop()
        self.console: list[str] = []
        self.n = 0
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False})

    async def _connect(self, url):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    def _event(self, data: dict) -> None:
        method = data.get("method")
        if method == "Runtime.consoleAPICalled":
            p = data["params"]
            self.console.append(f"{p.get('type')}: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = data["params"]["exceptionDetails"]
            self.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")

    async def _call(self, method, params, timeout):
        self.n += 1
        mid = self.n
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))
        end = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.1, end - time.monotonic()))
            data = json.loads(msg.data)
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
            if data.get("method") == "Page.javascriptDialogOpening":
                # e.g. the frontend's "leave the page?" on a reload with unsaved workflows: accept it
                self.n += 1
                self.console.append(f"dialog: {data['params'].get('type')} {data['params'].get('message', '')!r} accepted")
                await self.ws.send_str(json.dumps({"id": self.n, "method": "Page.handleJavaScriptDialog",
                                                   "params": {"accept": True}}))
                continue
            self._event(data)

    def call(self, method, params=None, timeout=60):
        return self.loop.run_until_complete(self._call(method, params, timeout))

    def eval(self, expr: str, timeout=60):
        r = self.call("Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True}, timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"JS: {d.get('exception', {}).get('description') or json.dumps(d)[:3000]}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout=60.0, what: str | None = None):
        """Poll ``expr`` until it is truthy; return that value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.eval(expr)
            except RuntimeError as e:
                last = str(e)
            else:
                if last:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or expr} (last: {last!r})\n"
                             "console:\n" + "\n".join(self.console[-25:]))

    def mouse(self, kind: str, x: float, y: float, **kw):
        self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **kw})

    def click(self, x: float, y: float):
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button="left", clickCount=1)
        self.mouse("mouseReleased", x, y, button="left", clickCount=1)

    def press(self, key: str, key_code: int):
        """Key down and up; ``key`` is both KeyboardEvent.key and .code (e.g. "Escape", 27)."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                 "windowsVirtualKeyCode": key_code})

    def reload(self, timeout: float = 120.0) -> None:
        """Reload the page (dialogs such as "leave the page?" accepted) and wait until the document is
        a new one."""
        marker = f"casa{time.monotonic_ns()}"
        self.eval(f"window.__casaReloadMarker = {json.dumps(marker)}; true")
        self.call("Page.reload", {"ignoreCache": True}, timeout=timeout)
        self.wait_for(f"window.__casaReloadMarker !== {json.dumps(marker)} && document.readyState === 'complete'",
                      timeout, "the reloaded page")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    # --- ComfyUI's page ----------------------------------------------------------------------------
    def open_comfy(self, url: str, node_types=(), timeout=120.0):
        """Navigate to the ComfyUI frontend at ``url`` and wait until its app, graph and canvas are up and
        ``node_types`` are registered; then a second for the start-up workflow to settle."""
        self.call("Page.navigate", {"url": url})
        registered = "".join(f" && window.LiteGraph?.registered_node_types?.{t}" for t in node_types)
        self.wait_for(f"!!(window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.canvas?.ds{registered})",
                      timeout, "the ComfyUI frontend")
        time.sleep(1.0)

    def load_workflow(self, wf: dict, tries: int = 5) -> dict:
        """app.loadGraphData(wf), then graphToPrompt(): {"workflow": what the frontend saves, "output": API}.
        Retried while the frontend is still settling (its own start-up workflow can replace ours)."""
        for attempt in range(tries):
            got = json.loads(self.eval(
                "(async () => { const app = window.comfyAPI.app.app;"
                f" await app.loadGraphData({json.dumps(wf)}, true, true, 'casa-test');"
                " await new Promise(r => setTimeout(r, 200));"
                " const p = await app.graphToPrompt(); return JSON.stringify(p); })()"))
            if len(got["workflow"]["nodes"]) == len(wf["nodes"]):
                return got
            time.sleep(1.0)
        raise RuntimeError(f"the frontend kept {len(got['workflow']['nodes'])} of {len(wf['nodes'])} nodes")

    def close(self):
        try:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
