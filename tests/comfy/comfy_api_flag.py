"""Whether the ComfyUI under test knows the V3 inputs' ``advanced`` argument (0.33.0 does, 0.8.0 does not),
read from its source the way the pack's nodes/common.py decides it, without importing ComfyUI here."""
from __future__ import annotations

import re
from pathlib import Path


def comfy_has_advanced(client) -> bool:
    root = Path(client.comfy_root) if client.comfy_root else None
    src = (root / "comfy_api" / "latest" / "_io.py") if root else None
    if src is None or not src.exists():
        return False
    text = src.read_text(encoding="utf-8")
    block = re.search(r"class Float\b.*?def __init__\((.*?)\):", text, re.DOTALL)
    return bool(block and "advanced" in block.group(1))
