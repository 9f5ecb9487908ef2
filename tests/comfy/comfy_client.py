"""A small client for a ComfyUI server started by the tests (HTTP API only; standard library only).

``ComfyServer`` starts ``main.py`` headless on the CPU in a prepared base directory and stops it;
``ComfyClient`` posts API prompts and reads ``/history``. Used by the ``comfy_server`` fixture in
conftest.py; usable by hand too::

    srv = ComfyServer(comfy_root, base_dir); client = srv.start(); ...; srv.stop()
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

SERVER_START_TIMEOUT = float(os.environ.get("CASA_COMFY_START_TIMEOUT", "180"))
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ComfyError(Exception):
    """Base class of the errors raised by the client."""


class ComfyPromptError(ComfyError):
    """``POST /prompt`` refused the graph (validation failed): ``.status``, ``.body`` (error, node_errors)."""

    def __init__(self, status: int, body, log_tail: str = ""):
        self.status = status
        self.body = body
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        self.error = body.get("error", {}) if isinstance(body, dict) else body
        msg = f"/prompt answered {status}: {json.dumps(self.error)[:2000]}"
        if self.node_errors:
            msg += f"\nnode_errors: {json.dumps(self.node_errors)[:4000]}"
        if log_tail:
            msg += f"\n--- server log (tail) ---\n{log_tail}"
        super().__init__(msg)


class ComfyExecutionError(ComfyError):
    """The prompt ran and ended without success (``execution_error`` or ``execution_interrupted``).

    ``.entry`` is the /history entry, ``.messages`` its status messages, ``.error`` the data of the
    ``execution_error`` message (node_id, node_type, exception_message, traceback, ...) or None.
    """

    def __init__(self, prompt_id: str, entry: dict, log_tail: str = ""):
        self.prompt_id = prompt_id
        self.entry = entry
        status = entry.get("status", {}) or {}
        self.messages = status.get("messages", [])
        self.error = next((d for name, d in self.messages if name == "execution_error"), None)
        self.interrupted = any(name == "execution_interrupted" for name, _ in self.messages)
        if self.error:
            tb = "".join(self.error.get("traceback", []) or [])
            msg = (f"prompt {prompt_id} failed in node {self.error.get('node_id')} ({self.error.get('node_type')}): "
                   f"{self.error.get('exception_type')}: {self.error.get('exception_message')}\n{tb}")
        elif self.interrupted:
            msg = f"prompt {prompt_id} was interrupted"
        else:
            msg = f"prompt {prompt_id} ended with status {status.get('status_str')!r}: {json.dumps(self.messages)[:2000]}"
        if log_tail:
            msg += f"\n--- server log (tail) ---\n{log_tail}"
        super().__init__(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    """HTTP client of one running server. ``log()`` returns the server's stdout+stderr so far."""

    def __init__(self, url: str, base_dir: Path, log_path: Path, comfy_root: Path | None = None,
                 version: str | None = None):
        self.url = url.rstrip("/")
        self.base_dir = Path(base_dir)
        self.log_path = Path(log_path)
        self.comfy_root = comfy_root
        self.version = version
        self.client_id = uuid.uuid4().hex

    # --- raw HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, data=None, timeout: float = 30.0):
        """(status, parsed JSON or bytes). Non-2xx answers are returned, not raised."""
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        if "json" in ctype:
            try:
                return status, json.loads(raw)
            except ValueError:
                pass
        return status, raw

    def get(self, path: str, timeout: float = 30.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} answered {status}: {body!r:.2000}")
        return body

    def post(self, path: str, data=None, timeout: float = 30.0):
        return self.request("POST", path, data if data is not None else {}, timeout=timeout)

    # --- API --------------------------------------------------------------------------------------
    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes) or the schema of one node class."""
        if node_class is None:
            return self.get("/object_info", timeout=60)
        return self.get("/object_info/" + urllib.parse.quote(node_class))[node_class]

    def post_prompt(self, api_graph: dict) -> str:
        """Queue an API-format graph; returns its prompt_id. Raises ComfyPromptError on a 4xx answer."""
        status, body = self.post("/prompt", {"prompt": api_graph, "client_id": self.client_id})
        if status != 200:
            raise ComfyPromptError(status, body, self.log_tail(40))
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry of a finished prompt, or None while it is queued or running."""
        return self.get("/history/" + urllib.parse.quote(prompt_id)).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.05) -> dict:
        """Poll /history until the prompt has finished; returns the entry (outputs, status, meta).

        Does not raise when the prompt failed: check ``entry["status"]["status_str"]`` (or use ``run``).
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if time.monotonic() > deadline:
                queue = self.get("/queue")
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s; queue={json.dumps(queue)[:1000]}"
                                   f"\n--- server log (tail) ---\n{self.log_tail(60)}")
            time.sleep(poll)

    def run(self, api_graph: dict, timeout: float = 120.0) -> dict:
        """post_prompt + wait; raises ComfyExecutionError (with the node's error and traceback) unless success."""
        prompt_id = self.post_prompt(api_graph)
        entry = self.wait(prompt_id, timeout=timeout)
        if (entry.get("status") or {}).get("status_str") != "success":
            raise ComfyExecutionError(prompt_id, entry, self.log_tail(60))
        entry["prompt_id"] = prompt_id
        return entry

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stops the prompt that is running now (only ``prompt_id`` when given)."""
        status, body = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyError(f"/interrupt answered {status}: {body!r:.500}")

    def queue(self) -> dict:
        return self.get("/queue")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def reset_cache(self) -> None:
        """Empty ComfyUI's node cache before the next prompt. /free only sets flags, which the prompt worker
        acts on after its current or NEXT item; so one cheap prompt (the harness's test nodes, a latent
        of a size of its own) runs first, and the reset has certainly happened when this returns."""
        import uuid

        self.free(unload_models=True, free_memory=True)
        g = {"latent": {"class_type": "EmptyHunyuanLatentVideo",
                        "inputs": {"width": 32 + 16 * (uuid.uuid4().int % 50), "height": 32, "length": 5,
                                   "batch_size": 1}},
             "stats": {"class_type": "CasaTestLatentStats", "inputs": {"samples": ["latent", 0]}}}
        self.run(g, timeout=60)

    def view(self, filename: str, type: str = "output", subfolder: str = "") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "type": type, "subfolder": subfolder})
        status, body = self.request("GET", "/view?" + q)
        if status != 200:
            raise ComfyError(f"/view {q} answered {status}")
        return body

    # --- server log -------------------------------------------------------------------------------
    def custom_node_import_failures(self) -> list[str]:
        """Paths of the custom node packs the server reported as ``(IMPORT FAILED)`` at start-up."""
        return [line.split("(IMPORT FAILED):", 1)[1].strip()
                for line in self.log().splitlines() if "(IMPORT FAILED):" in line]

    def log(self) -> str:
        """Everything the server printed (stdout and stderr) so far, without colour codes."""
        try:
            return _ANSI.sub("", self.log_path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return _ANSI.sub("", f.read().decode("utf-8", errors="replace"))
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class ComfyServer:
    """Starts ``<comfy_root>/main.py`` headless on the CPU with ``--base-directory base_dir``.

    Output goes to ``log_path`` (default ``<base_dir>/comfyui-server.log``), never to the terminal.
    """

    def __init__(self, comfy_root, base_dir, python: str | None = None, log_path=None,
                 extra_args: list[str] | None = None, env: dict | None = None):
        self.comfy_root = Path(comfy_root)
        self.base_dir = Path(base_dir)
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui-server.log"
        self.extra_args = list(extra_args or [])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self.client: ComfyClient | None = None

    def command(self, port: int) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--database-url", "sqlite:///:memory:", *self.extra_args]

    def start(self, timeout: float = SERVER_START_TIMEOUT, attempts: int = 3) -> ComfyClient:
        from comfy_locate import comfyui_version

        last = None
        for _ in range(attempts):
            port = free_port()
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("DO_NOT_TRACK", "1")
            t0 = time.monotonic()
            with open(self.log_path, "ab") as log:
                log.write(f"=== casa-lora tests: {' '.join(self.command(port))} (cwd {self.comfy_root})\n".encode())
                log.flush()
                self.proc = subprocess.Popen(self.command(port), cwd=self.comfy_root, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            client = ComfyClient(f"http://127.0.0.1:{port}", self.base_dir, self.log_path, self.comfy_root,
                                 comfyui_version(self.comfy_root))
            deadline = t0 + timeout
            try:
                while time.monotonic() < deadline:
                    if self.proc.poll() is not None:
                        break
                    try:
                        status, _ = client.request("GET", "/object_info", timeout=30)
                        if status == 200:
                            self.port, self.client = port, client
                            self.startup_seconds = time.monotonic() - t0
                            return client
                    except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                        pass
                    time.sleep(0.2)
            except BaseException:  # interrupted while it starts: leave no server behind
                self.stop()
                raise
            tail = client.log_tail(60)
            if self.proc.poll() is None:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer /object_info within {timeout:.0f}s "
                                 f"(log: {self.log_path})\n{tail}")
            last = f"ComfyUI exited with code {self.proc.returncode} during start-up (log: {self.log_path})\n{tail}"
            self.proc = None
            if "address already in use" not in tail.lower():
                break
        raise ComfyError(last)

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def prepare_base_dir(base_dir, pack_root=None, pack_name: str = "casa-lora", test_nodes=None,
                     test_nodes_name: str = "casa_test_nodes", extra_packs=None) -> Path:
    """Lay out a ComfyUI base directory: models/{diffusion_models,loras}, custom_nodes, input, output,
    temp, user. ``pack_root``, ``test_nodes`` and ``extra_packs`` (``{folder name: path}``, e.g.
    ComfyUI-GGUF) are symlinked into custom_nodes (copied where symlinks are not allowed)."""
    import shutil

    base = Path(base_dir)
    for sub in ("models/diffusion_models", "models/loras", "models/checkpoints", "models/vae",
                "models/text_encoders", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for src, name in ((pack_root, pack_name), (test_nodes, test_nodes_name), *((p, n) for n, p in
                                                                               (extra_packs or {}).items())):
        if src is None:
            continue
        dst = base / "custom_nodes" / name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            dst.symlink_to(Path(src).resolve(), target_is_directory=True)
        except OSError:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__"))
    return base
