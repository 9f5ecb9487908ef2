"""Anti-aliased text with numpy only: a built-in glyph atlas (Aileron Regular, public domain).

``text_mask(text, px)`` returns the coverage (0..1, ``float32``) of a one-line string set at a
font size of ``px`` pixels; its height is the line height (ascent + descent) at that size and its
width the string's advance.  The string is composed at the atlas' master size (64 px) and
area-resampled to the target size, so any size works and glyphs keep sub-pixel positions.
Characters the atlas lacks are drawn as ``?``; ``\u2212`` (minus) and ``\u00d7`` (times) are mapped to
``-`` and ``x``.  ``bold=True`` thickens the strokes (Aileron has a single weight here).
"""
from __future__ import annotations

import base64
import zlib
from functools import lru_cache

import numpy as np

from . import aileron_atlas as _atlas

MASTER = _atlas.MASTER
_SUBST = {"\u2212": "-", "\u00d7": "x", "\u2013": "-", "\u2014": "-", "\u2264": "<=", "\u2265": ">="}


@lru_cache(maxsize=1)
def _glyph_bytes() -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode("".join(_atlas.DATA))), dtype=np.uint8)


@lru_cache(maxsize=None)
def _glyph(ch: str) -> tuple[float, int, int, np.ndarray]:
    """(advance, x offset, y offset, coverage 0..1 at master size) of one character."""
    adv4, x0, y0, w, h, off = _atlas.GLYPHS[ch]
    if w == 0 or h == 0:
        return adv4 / 4.0, 0, 0, np.zeros((0, 0), dtype=np.float32)
    wp = w + (w % 2)
    packed = _glyph_bytes()[off: off + h * wp // 2].reshape(h, wp // 2)
    q = np.empty((h, wp), dtype=np.uint8)
    q[:, 0::2] = packed >> 4
    q[:, 1::2] = packed & 15
    return adv4 / 4.0, x0, y0, (q[:, :w].astype(np.float32) / 15.0)


def normalize(text: str) -> str:
    out = []
    for ch in text:
        ch = _SUBST.get(ch, ch)
        for c in ch:
            out.append(c if c in _atlas.GLYPHS else "?")
    return "".join(out)


def _master_width(text: str) -> float:
    return sum(_glyph(c)[0] for c in text)


def line_height(px: float) -> int:
    return int(np.ceil((_atlas.ASCENT + _atlas.DESCENT) * px / MASTER))


def ascent(px: float) -> float:
    return _atlas.ASCENT * px / MASTER


def text_width(text: str, px: float, bold: bool = False) -> int:
    """Width in pixels of ``text`` at size ``px`` (what :func:`text_mask` returns)."""
    text = normalize(text)
    w = _master_width(text) + (_bold_extra(px) if bold else 0)
    return max(int(np.ceil(w * px / MASTER)), 0)


def _bold_extra(px: float) -> int:
    return max(2, int(round(0.06 * MASTER)))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` matrix averaging input cells onto output cells (box filter, exact areas)."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return (overlap / scale).astype(np.float32)


@lru_cache(maxsize=4096)
def _text_mask_cached(text: str, px: float, bold: bool) -> np.ndarray:
    text = normalize(text)
    extra = _bold_extra(px) if bold else 0
    total = _master_width(text) + extra
    h_master = _atlas.ASCENT + _atlas.DESCENT
    h_out = line_height(px)
    w_out = max(int(np.ceil(total * px / MASTER)), 1)
    # master canvas sized so that it maps exactly onto the output grid
    w_m = int(round(w_out * MASTER / px))
    h_m = int(round(h_out * MASTER / px))
    canvas = np.zeros((max(h_m, h_master), max(w_m, int(np.ceil(total)) + 1)), dtype=np.float32)
    pen = 0.0
    for ch in text:
        adv, x0, y0, cov = _glyph(ch)
        if cov.size:
            x = int(round(pen)) + x0
            hh, ww = cov.shape
            hh = min(hh, canvas.shape[0] - y0)
            ww = min(ww, canvas.shape[1] - x)
            if hh > 0 and ww > 0:
                region = canvas[y0: y0 + hh, x: x + ww]
                np.maximum(region, cov[:hh, :ww], out=region)
        pen += adv
    if bold:
        thick = canvas.copy()
        for d in range(1, extra + 1):
            np.maximum(thick[:, d:], canvas[:, :-d], out=thick[:, d:])
        canvas = thick
    canvas = canvas[:h_m, :w_m]
    ry = _area_matrix(canvas.shape[0], h_out)
    rx = _area_matrix(canvas.shape[1], w_out)
    out = ry @ canvas @ rx.T
    # a touch of gamma keeps small text from looking washed out
    out = np.clip(out, 0.0, 1.0) ** 0.8
    out.setflags(write=False)
    return out


def text_mask(text: str, px: float, bold: bool = False) -> np.ndarray:
    """Coverage (``line_height(px) x text_width(text, px)``, float32 in 0..1) of one line of text."""
    return _text_mask_cached(str(text), float(px), bool(bold))
