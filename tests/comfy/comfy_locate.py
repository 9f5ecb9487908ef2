"""Find the ComfyUI tree that tests/comfy runs against. Standard library only; never imports ComfyUI.

Order (first match wins):

1. ``$COMFYUI_PATH`` when it is set (and not empty). An explicit path that is not a ComfyUI tree is NOT
   silently replaced by another tree: ``find_comfyui()`` returns None and ``locate()`` says why.
2. The usual layout: this repository checked out as ``<ComfyUI>/custom_nodes/<pack>``, detected by a
   ComfyUI tree two levels above the repository root.
3. ``$HOME/.cache/casa-lora/ComfyUI`` (where the developer set-up puts a fetched ComfyUI).

A directory is a ComfyUI tree when ``main.py``, ``nodes.py`` and the ``comfy/`` package exist in it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "COMFYUI_PATH"
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_location() -> Path:
    return Path.home() / ".cache" / "casa-lora" / "ComfyUI"


def is_comfyui_tree(path) -> bool:
    if path is None:
        return False
    p = Path(path)
    return (p / "main.py").is_file() and (p / "nodes.py").is_file() and (p / "comfy").is_dir()


def comfyui_version(root) -> str | None:
    """The ``__version__`` in ``<root>/comfyui_version.py``, or None."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Location:
    root: Path | None     # the ComfyUI tree, or None when none was found
    how: str              # "COMFYUI_PATH", "custom_nodes layout", "default location", or "none"
    reason: str           # one sentence for humans (why this tree, or why none)

    @property
    def version(self) -> str | None:
        return comfyui_version(self.root) if self.root else None


def locate(env=None) -> Location:
    env = os.environ if env is None else env
    explicit = env.get(ENV_VAR, "").strip()
    if explicit:
        p = Path(explicit).expanduser()
        if is_comfyui_tree(p):
            return Location(p.resolve(), ENV_VAR, f"{ENV_VAR}={explicit}")
        return Location(None, "none",
                        f"{ENV_VAR}={explicit} is not a ComfyUI tree (needs main.py, nodes.py and comfy/); "
                        f"point {ENV_VAR} at a ComfyUI checkout or unset it")
    layout = REPO_ROOT.parent.parent
    if is_comfyui_tree(layout):
        return Location(layout.resolve(), "custom_nodes layout", f"repository is {layout}/custom_nodes/{REPO_ROOT.name}")
    d = default_location()
    if is_comfyui_tree(d):
        return Location(d.resolve(), "default location", f"found at the default location {d}")
    return Location(None, "none",
                    f"no ComfyUI tree found: set {ENV_VAR} to a ComfyUI checkout, check this repository out under "
                    f"<ComfyUI>/custom_nodes/, or put ComfyUI at {d}")


def find_comfyui(env=None) -> Path | None:
    """The ComfyUI tree to test against, or None (see the module docstring for the order)."""
    return locate(env).root
