"""Thumbnails of the example workflows for the template browser: ``workflows/<title>.jpg``.

The frontend shows a custom node pack's template with the file's name as its title and ``<name>.jpg``
as its thumbnail; it has no field for a description (comfyui-frontend 1.49.6; an ``index.json`` for
packs is only proposed, Comfy-Org/ComfyUI_frontend#9284). So the thumbnail carries the one-line
description: the title, the description, and the workflow's CASA chain as boxes, drawn with the
project's own raster code (casa_core.pictures.canvas) and saved as JPEG (Pillow, one of ComfyUI's requirements).

``render(name)`` gives the RGB picture; ``write(name, folder)`` the file; the workflow test checks
that each file in ``workflows/`` decodes to ``render(name)`` (JPEG noise aside), so a changed title or
description without new thumbnails fails.
"""
from __future__ import annotations

from pathlib import Path

import _tiny  # noqa: F401  (puts the repository root on sys.path, for casa_core)
import numpy as np
from graphs import WORKFLOWS

from casa_core.pictures.canvas import Canvas, text_h, text_w

SIZE = 512
BG = (24, 28, 36)
INK = (240, 240, 240)
SUB = (190, 198, 210)
BOX = {"casa": (58, 92, 160), "comfy": (70, 74, 84), "out": (60, 120, 80)}

#: the chain drawn on each thumbnail: rows of (label, kind)
CHAINS = {
    "casa_transfer_basic": [[("base model", "comfy"), ("Source Basis", "casa")],
                            [("distilled model", "comfy"), ("Drift", "casa"), ("Transfer LoRA", "casa")],
                            [("sampler", "comfy"), ("video", "out")]],
    "casa_compare_methods": [[("one LoRA", "comfy"), ("CASA", "casa"), ("video", "out")],
                             [("", None), ("ProLoRA", "casa"), ("video", "out")],
                             [("", None), ("direct reuse", "casa"), ("video", "out")]],
    "casa_save_lora": [[("base model", "comfy"), ("Source Basis", "casa")],
                       [("distilled model", "comfy"), ("Drift", "casa"), ("Transfer LoRA", "casa")],
                       [("Save LoRA", "casa"), ("models/loras", "out")]],
    "casa_routing_heatmap": [[("Transfer LoRA", "casa"), ("Routing Heatmap", "casa")],
                             [("restored", "restored"), ("preserved", "preserved"), ("arbitrated", "arbitrated")]],
    "casa_distill_lora_target": [[("base model", "comfy"), ("Source Basis", "casa")],
                                 [("+ distill LoRA", "comfy"), ("Drift", "casa"), ("Transfer LoRA", "casa")],
                                 [("sampler", "comfy"), ("video", "out")]],
    "casa_wan22_two_experts": [[("high noise", "comfy"), ("Drift", "casa"), ("Transfer", "casa")],
                               [("low noise", "comfy"), ("Drift", "casa"), ("Transfer", "casa")],
                               [("steps 0-2", "comfy"), ("steps 2-4", "comfy"), ("video", "out")]],
}
REGION = {"restored": (66, 133, 214), "preserved": (150, 150, 150), "arbitrated": (236, 112, 20)}


def _wrap(text: str, size: float, width: int, bold: bool = False) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        cand = word if not cur else f"{cur} {word}"
        if cur and text_w(cand, size, bold) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return [*lines, cur] if cur else lines


def render(name: str) -> np.ndarray:
    """The thumbnail of workflow ``name`` (a key of graphs.WORKFLOWS), SIZE x SIZE RGB uint8."""
    return _draw(name).rgb()


def texts(name: str) -> dict[str, list[str]]:
    """The strings the thumbnail draws, by tag ("title", "description", "box")."""
    out: dict[str, list[str]] = {}
    for t in _draw(name).texts:
        out.setdefault(t["tag"], []).append(t["text"])
    return out


def _draw(name: str) -> Canvas:
    title, desc = WORKFLOWS[name]
    cv = Canvas(SIZE, SIZE, bg=BG)
    m = 28
    y = m
    cv.rect(m, y, 64, 6, BOX["casa"])
    y += 18
    for ln in _wrap(title, 38, SIZE - 2 * m, bold=True):
        cv.text(m, y, ln, 38, INK, bold=True, tag="title")
        y += text_h(38)
    y += 8
    for ln in _wrap(desc, 23, SIZE - 2 * m):
        cv.text(m, y, ln, 23, SUB, tag="description")
        y += text_h(23) + 2
    rows = CHAINS[name]
    box_h, gap_y = 46, 18
    top = SIZE - m - len(rows) * box_h - (len(rows) - 1) * gap_y
    for r, row in enumerate(rows):
        by = top + r * (box_h + gap_y)
        n = len(row)
        gap_x = 26
        bw = (SIZE - 2 * m - (n - 1) * gap_x) // n
        for c, (label, kind) in enumerate(row):
            bx = m + c * (bw + gap_x)
            if kind is None:
                continue
            colour = REGION.get(kind) or BOX[kind]
            cv.rect(bx, by, bw, box_h, colour)
            size = 19 if text_w(label, 19) <= bw - 10 else 15
            cv.text(bx + bw / 2, by + box_h / 2, label, size, INK, anchor="mm", tag="box")
            nxt = row[c + 1][1] if c + 1 < n else None
            if nxt is not None and kind not in REGION:
                ax = bx + bw + 4
                cv.rect(ax, by + box_h / 2 - 1, gap_x - 12, 3, SUB)
                for k in range(6):  # arrow head
                    cv.rect(ax + gap_x - 14 + k, by + box_h / 2 - 6 + k, 1, 13 - 2 * k, SUB)
    return cv


def write(name: str, folder: Path) -> Path:
    from PIL import Image

    path = Path(folder) / f"{WORKFLOWS[name][0]}.jpg"
    Image.fromarray(render(name)).save(path, format="JPEG", quality=92, optimize=True)
    return path


def read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "JPEG", f"{path} is {im.format}, the frontend asks for .jpg"
        return np.asarray(im.convert("RGB"))
