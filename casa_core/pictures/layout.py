"""What both pictures share: the :class:`Figure`, text sizes, cell grids, colour bars and line wrapping."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .canvas import GREY_TEXT, INK, WHITE, Canvas, colormap, text_w


@dataclass
class Figure:
    rgb: np.ndarray  # H x W x 3 uint8
    meta: dict


class Sizes:
    def __init__(self, s: float):
        self.s = s
        # at scale 1 no text is below 12 px: legible at 0.83x (10 px), the widget's default size
        self.title = 18 * s
        self.verdict = 14 * s
        self.subtitle = 12 * s
        self.panel_title = 14 * s
        self.axis = 13 * s
        self.tick = 12 * s
        self.note = 12 * s
        self.margin = int(round(18 * s))

    def px(self, v: float) -> int:
        return max(1, int(round(v * self.s)))


def edges(n: int, cell: int, gap_last: int) -> list[list[int]]:
    """[start, end) pixel offsets of ``n`` cells; a gap separates the last one when ``gap_last``."""
    out, x = [], 0
    for i in range(n):
        if i == n - 1 and gap_last:
            x += gap_last
        out.append([x, x + cell])
        x += cell
    return out


def index_map(edges: list[list[int]], length: int) -> np.ndarray:
    idx = np.full(length, -1, dtype=np.int64)
    for i, (a, b) in enumerate(edges):
        idx[a:b] = i
    return idx


def paint_cells(colors: np.ndarray, ry: list, cx: list, bg=WHITE) -> np.ndarray:
    """Picture of a cell grid (``colors``: rows x cols x 3) with the given cell edges."""
    h, w = ry[-1][1], cx[-1][1]
    iy, ix = index_map(ry, h), index_map(cx, w)
    out = colors[np.clip(iy, 0, None)][:, np.clip(ix, 0, None)].astype(np.float64)
    out[(iy < 0)[:, None] | (ix < 0)[None, :]] = bg
    return out


def colorbar(cv: Canvas, x: int, y: int, w: int, h: int, anchors: np.ndarray, ticks: list[tuple[float, str]],
              sz: Sizes, caption: str | None = None) -> dict:
    """Vertical colour bar (top = 1); ``ticks``: (t in 0..1, label)."""
    t = 1.0 - (np.arange(h) + 0.5) / h
    cv.blit(x, y, np.repeat(colormap(anchors, t)[:, None, :], w, axis=1))
    cv.frame(x, y, w, h, (120, 120, 120), 1)
    for tv, lab in ticks:
        yy = y + (1.0 - tv) * h
        cv.rect(x + w, int(round(yy)) - (0 if tv < 1 else 1), sz.px(4), 1, INK)
        cv.text(x + w + sz.px(6), yy, lab, sz.tick, INK, anchor="lm", tag="colorbar-tick")
    if caption:
        cv.text(x + w + sz.px(6), y + h + sz.px(4), caption, sz.tick, GREY_TEXT, anchor="lt")
    return {"x": x, "y": y, "w": w, "h": h}


def wrap(text: str, size: float, width: int) -> list[str]:
    words, lines, cur = text.split(" "), [], ""
    for wd in words:
        cand = wd if not cur else cur + " " + wd
        if cur and text_w(cand, size) > width:
            lines.append(cur)
            cur = wd
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


def fit_label(options: list[str], size: float, room: float) -> str:
    """The first (longest) label that fits ``room`` pixels, else the last."""
    for o in options:
        if text_w(o, size) <= room:
            return o
    return options[-1]
