"""Harness for tests that run against a REAL ComfyUI (server subprocess or in-process, CPU only).

Which ComfyUI: see comfy_locate.py (``COMFYUI_PATH``, the custom_nodes layout, or
``~/.cache/casa-lora/ComfyUI``). When no tree is found, or this Python lacks what ComfyUI needs
(torchvision that imports, ComfyUI's requirements), every test in tests/comfy is SKIPPED with the
reason, and the terminal summary says so loudly. Set ``CASA_REQUIRE_COMFYUI=1`` to turn those skips
into failures (for a CI job that must run them).

Fixtures:
  comfy_root       Path of the ComfyUI tree (session)
  comfy_server     a started server and its ComfyClient (session): base_dir, url, post_prompt, wait,
                   run, object_info, interrupt, log, ... (comfy_client.py)
  comfy_inprocess  ComfyUI imported into this process on the CPU (session; comfy_inprocess.py)
  tiny_wan         file name of the tiny Wan2.1 t2v checkpoint in both base dirs' models/diffusion_models
  comfyui_gguf     the ComfyUI-GGUF tree linked into the server's custom_nodes ($CASA_COMFYUI_GGUF; tests/run.sh
                   sets it, always under CI). A test that uses it FAILS when it is absent (never skips).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_locate  # noqa: E402

REPO_ROOT = HERE.parents[1]
TEST_NODES_DIR = HERE / "testnodes"
PACK_DIR_NAME = "casa-lora"
TINY_WAN = "casa_tiny_wan_t2v.safetensors"
REQUIRE_ENV = "CASA_REQUIRE_COMFYUI"
GGUF_ENV = "CASA_COMFYUI_GGUF"
GGUF_PACK_NAME = "ComfyUI-GGUF"


def gguf_pack_path() -> Path | None:
    """The ComfyUI-GGUF tree named by $CASA_COMFYUI_GGUF, when it is a folder with its nodes."""
    value = os.environ.get(GGUF_ENV, "")
    path = Path(value).expanduser() if value else None
    return path if path is not None and (path / "nodes.py").is_file() else None

# Distributions ComfyUI lists but does not need to start (a missing torchaudio only disables audio nodes).
_OPTIONAL_DISTS = {"torchaudio"}

_state = {"checked": False, "reason": None, "location": None, "skipped": 0, "ran": 0,
          "server": None, "client": None}
_LOG_OFFSET = pytest.StashKey[int]()


def _in_this_dir(item) -> bool:
    try:
        return Path(str(item.path)).resolve().is_relative_to(HERE)
    except (AttributeError, ValueError):
        return False


def _missing_requirements(root: Path) -> list[str]:
    """Essential distributions of ``<root>/requirements.txt`` that are not installed in this Python."""
    try:
        lines = (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    missing = []
    for line in lines:
        if "non essential" in line.lower():
            break
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].strip()
        if not name or name.lower() in _OPTIONAL_DISTS:
            continue
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _check() -> str | None:
    """None when the ComfyUI tests can run, else the reason they cannot."""
    if _state["checked"]:
        return _state["reason"]
    _state["checked"] = True
    loc = comfy_locate.locate()
    _state["location"] = loc
    reason = None
    if loc.root is None:
        reason = loc.reason
    else:
        try:
            import torchvision  # noqa: F401  (comfy.sd imports it; a CUDA wheel beside CPU torch fails here)
            import torchvision.ops  # noqa: F401
        except Exception as e:  # ImportError, RuntimeError "operator torchvision::nms does not exist", ...
            reason = (f"this Python ({sys.executable}) cannot import torchvision ({type(e).__name__}: {e}); "
                      f"install tests/comfy/requirements.txt (torch 2.14.1 + torchvision 0.29.1)")
        else:
            missing = _missing_requirements(loc.root)
            if missing:
                reason = (f"ComfyUI's requirements are missing in this Python ({sys.executable}): "
                          f"{', '.join(missing)}; install them: pip install -c tests/comfy/constraints.txt "
                          f"-r {loc.root / 'requirements.txt'} -r tests/comfy/requirements.txt")
    _state["reason"] = reason
    return reason


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if _in_this_dir(it) and it.get_closest_marker("comfy_not_needed") is None]
    if not mine:
        return
    reason = _check()
    if reason is None:
        _state["ran"] = len(mine)
        return
    _state["skipped"] = len(mine)
    if _required():
        marker = pytest.mark.casa_comfy_required(reason)
    else:
        marker = pytest.mark.skip(reason=f"casa-lora ComfyUI test: {reason}")
    for it in mine:
        it.add_marker(marker)


def pytest_configure(config):
    config.addinivalue_line("markers", "casa_comfy_required(reason): internal, ComfyUI required but missing")
    config.addinivalue_line("markers", "comfy_not_needed: a test in tests/comfy that runs without ComfyUI")
    # a killed run (SIGTERM: CI's timeout, `kill`) still tears its fixtures down, so no ComfyUI server or
    # Chromium is left running behind it
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _skip_or_fail(reason: str):
    if _required():
        pytest.fail(f"{REQUIRE_ENV} is set but the ComfyUI tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"casa-lora ComfyUI test: {reason}")


@pytest.fixture(autouse=True)
def _casa_comfy_required_gate(request):
    m = request.node.get_closest_marker("casa_comfy_required")
    if m is not None:
        _skip_or_fail(m.args[0])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    n = _state["skipped"]
    if n:
        why = _state["reason"] or "?"
        short = "no ComfyUI tree (set COMFYUI_PATH)" if _state["location"] and _state["location"].root is None \
            else "this Python cannot run ComfyUI (see reason)"
        verb = "FAILED" if _required() else "SKIPPED"
        tr.write_sep("!", f"casa-lora: {n} ComfyUI tests {verb} — {short}", red=True, bold=True)
        tr.write_line(f"casa-lora: reason: {why}", red=True, bold=True)
        tr.write_line("casa-lora: these tests exercise the pack inside a real ComfyUI; see tests/comfy/README.md",
                      red=True)
    elif _state["ran"]:
        loc = _state["location"]
        line = f"casa-lora: {_state['ran']} ComfyUI tests collected against ComfyUI {loc.version} at {loc.root} ({loc.how})"
        srv = _state["server"]
        if srv is not None and srv.startup_seconds is not None:
            line += f"; server started in {srv.startup_seconds:.1f}s, log {srv.log_path}"
        tr.write_line(line, bold=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    client = _state["client"]
    if client is not None:
        item.stash[_LOG_OFFSET] = client.log_size()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    client = _state["client"]
    if rep.failed and client is not None and "comfy_server" in getattr(item, "fixturenames", ()):
        text = client.log_since(item.stash.get(_LOG_OFFSET, 0))
        if len(text) > 30000:
            text = "[... cut ...]\n" + text[-30000:]
        rep.sections.append((f"ComfyUI server log (full log: {client.log_path})", text or "(nothing new)"))


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_root() -> Path:
    reason = _check()
    if reason is not None:
        _skip_or_fail(reason)
    return _state["location"].root


@pytest.fixture(scope="session")
def tiny_wan() -> str:
    return TINY_WAN


def _make_base_dir(tmp_path_factory, name: str) -> Path:
    import _tiny
    from comfy_client import prepare_base_dir

    gguf = gguf_pack_path()
    base = prepare_base_dir(tmp_path_factory.mktemp(name), pack_root=REPO_ROOT, pack_name=PACK_DIR_NAME,
                            test_nodes=TEST_NODES_DIR, extra_packs={GGUF_PACK_NAME: gguf} if gguf else None)
    _tiny.write_tiny_wan(base / "models" / "diffusion_models" / TINY_WAN)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_root, tmp_path_factory):
    """A ComfyUI server (``python main.py --cpu ...``) on a free loopback port; yields its ComfyClient.

    Base dir: models/diffusion_models/<tiny_wan>, models/loras, custom_nodes/{casa-lora -> repository
    root, casa_test_nodes -> tests/comfy/testnodes}, input, output, temp, user. Output goes to
    ``<base_dir>/comfyui-server.log``.
    """
    from comfy_client import ComfyServer

    base = _make_base_dir(tmp_path_factory, "comfyui-server")
    server = ComfyServer(comfy_root, base)
    _state["server"] = server
    client = server.start()
    _state["client"] = client
    client.startup_seconds = server.startup_seconds
    try:
        yield client
    finally:
        _state["client"] = None
        server.stop()


@pytest.fixture(scope="session")
def comfyui_gguf(comfy_server) -> Path:
    """ComfyUI-GGUF as the server loaded it. Fails (never skips) when $CASA_COMFYUI_GGUF does not name the
    tree, or the server did not register its UnetLoaderGGUF node."""
    path = gguf_pack_path()
    if path is None:
        pytest.fail(f"{GGUF_ENV} must name city96's ComfyUI-GGUF tree (tests/run.sh sets it; got "
                    f"{os.environ.get(GGUF_ENV, '')!r})", pytrace=False)
    if "UnetLoaderGGUF" not in comfy_server.object_info():
        pytest.fail(f"the server did not register UnetLoaderGGUF from {path}; "
                    f"import failures: {comfy_server.custom_node_import_failures()}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_root, tmp_path_factory):
    """ComfyUI imported into this process (CPU, base dir in a tmp dir with the tiny checkpoint)."""
    from comfy_inprocess import InProcessComfy

    base = _make_base_dir(tmp_path_factory, "comfyui-inprocess")
    comfy = InProcessComfy(comfy_root, base)
    yield comfy
    try:
        comfy.unload_all()
    except Exception:
        pass
