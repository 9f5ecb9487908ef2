"""A small raster canvas with text, and the colour maps of the heatmaps (numpy only).

The canvas records every string it draws (``Canvas.texts``: text, box, size, colour), so
tests can check that a label is really in the picture and callers can describe the layout.
"""
from __future__ import annotations

import numpy as np

from .. import fonts

# Colour map anchors (evenly spaced).  viridis: perceptually uniform, colour-blind safe,
# lightness rising with the value; RdBu (reversed): blue -1, white 0, red +1; Oranges.
VIRIDIS = np.array([
    [68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142], [33, 145, 140],
    [34, 168, 132], [68, 191, 112], [122, 209, 81], [189, 223, 38], [253, 231, 37],
], dtype=np.float64)
RDBU = np.array([
    [5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240], [247, 247, 247],
    [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43], [103, 0, 31],
], dtype=np.float64)
ORANGES = np.array([
    [255, 245, 235], [254, 230, 206], [253, 208, 162], [253, 174, 107], [253, 141, 60],
    [241, 105, 19], [217, 72, 1], [166, 54, 3], [127, 39, 4],
], dtype=np.float64)

WHITE = (255, 255, 255)
INK = (25, 25, 25)
GREY_TEXT = (90, 90, 90)
MISSING = (215, 215, 215)


def colormap(anchors: np.ndarray, t) -> np.ndarray:
    """RGB (float, 0..255) for ``t`` in [0, 1] by linear interpolation between ``anchors``."""
    t = np.clip(np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.floor(t).astype(int).clip(0, len(anchors) - 2)
    frac = (t - lo)[..., None]
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


def invert_colormap(anchors: np.ndarray, rgb, steps: int = 2001) -> np.ndarray:
    """The ``t`` in [0, 1] whose colour is nearest to ``rgb`` (for tests and read-outs)."""
    ts = np.linspace(0.0, 1.0, steps)
    table = colormap(anchors, ts)
    rgb = np.asarray(rgb, dtype=np.float64)
    d = ((rgb.reshape(-1, 1, 3) - table[None]) ** 2).sum(-1)
    return ts[d.argmin(1)].reshape(rgb.shape[:-1])


class Canvas:
    """An ``h x w`` RGB picture (float64 while drawing; :meth:`rgb` gives uint8)."""

    def __init__(self, w: int, h: int, bg=WHITE):
        self.w, self.h = int(w), int(h)
        self.px = np.empty((self.h, self.w, 3), dtype=np.float64)
        self.px[:] = bg
        self.texts: list[dict] = []

    # -- primitives -------------------------------------------------------------------------
    def rect(self, x, y, w, h, color) -> None:
        x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
        x1, y1 = min(int(round(x + w)), self.w), min(int(round(y + h)), self.h)
        if x1 > x0 and y1 > y0:
            self.px[y0:y1, x0:x1] = color

    def frame(self, x, y, w, h, color=INK, t: int = 1) -> None:
        """Outline of the box ``[x, x + w) x [y, y + h)``, drawn outside it, ``t`` pixels thick."""
        self.rect(x - t, y - t, w + 2 * t, t, color)
        self.rect(x - t, y + h, w + 2 * t, t, color)
        self.rect(x - t, y, t, h, color)
        self.rect(x + w, y, t, h, color)

    def blit(self, x: int, y: int, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        x, y = int(x), int(y)
        xs, ys = max(0, -x), max(0, -y)
        x1, y1 = min(self.w, x + w), min(self.h, y + h)
        if x1 > x + xs and y1 > y + ys:
            self.px[y + ys:y1, x + xs:x1] = img[ys:y1 - y, xs:x1 - x]

    def text(self, x, y, s: str, size: float, color=INK, anchor: str = "lt", bold: bool = False,
             rotate: bool = False, tag: str | None = None) -> dict:
        """Draw one line of text; ``anchor``: horizontal l/m/r + vertical t/m/b of the text box.

        ``rotate`` turns it 90 degrees counter-clockwise (reads bottom to top).  Returns (and
        records) ``{"text", "x", "y", "w", "h", "size", "bold", "rotate", "color", "tag"}``.
        """
        mask = fonts.text_mask(s, size, bold)
        if rotate:
            mask = np.rot90(mask)
        h, w = mask.shape
        ax, ay = anchor[0], anchor[1]
        x0 = x - (w / 2 if ax == "m" else w if ax == "r" else 0)
        y0 = y - (h / 2 if ay == "m" else h if ay == "b" else 0)
        x0, y0 = int(round(x0)), int(round(y0))
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, self.w), min(y0 + h, self.h)
        if cx1 > cx0 and cy1 > cy0:
            m = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]
            region = self.px[cy0:cy1, cx0:cx1]
            region *= 1.0 - m
            region += m * np.asarray(color, dtype=np.float64)
        rec = {"text": s, "x": x0, "y": y0, "w": w, "h": h, "size": size, "bold": bold,
               "rotate": rotate, "color": tuple(int(c) for c in color), "tag": tag}
        self.texts.append(rec)
        return rec

    def rgb(self) -> np.ndarray:
        return np.clip(np.round(self.px), 0, 255).astype(np.uint8)


def text_w(s: str, size: float, bold: bool = False) -> int:
    return fonts.text_width(s, size, bold)


def text_h(size: float) -> int:
    return fonts.line_height(size)
