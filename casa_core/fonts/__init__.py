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


def line_height(px: float) -> int:
    return int(np.ceil((_atlas.ASCENT + _atlas.DESCENT) * px / MASTER))


def text_width(text: str, px: float, bold: bool = False) -> int:
    """Width in pixels of ``text`` at size ``px`` (what :func:`text_mask` returns)."""
    text = normalize(text)
    w = _layout(text)[1] + (_bold_extra(px) if bold else 0)
    return max(int(np.ceil(w * px / MASTER)), 1)


def _bold_extra(px: float) -> int:
    return max(2, int(round(0.06 * MASTER)))


def _area_resample(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Box-filter resampling of ``a`` along ``axis`` to ``n_out`` cells (exact overlap areas)."""
    a = np.moveaxis(a, axis, 0)
    n_in = a.shape[0]
    scale = n_in / n_out
    # cumulative integral at integer input positions, then at the output edges by linear interpolation
    cum = np.concatenate([np.zeros((1,) + a.shape[1:], dtype=np.float64), np.cumsum(a, axis=0, dtype=np.float64)])
    edges = np.arange(n_out + 1) * scale
    i = np.clip(np.floor(edges).astype(np.int64), 0, n_in - 1)
    frac = (edges - i).reshape((-1,) + (1,) * (a.ndim - 1))
    at = cum[i] + (cum[i + 1] - cum[i]) * frac
    out = (at[1:] - at[:-1]) / scale
    return np.moveaxis(out.astype(np.float32), 0, axis)


def _layout(text: str) -> tuple[list[tuple[int, int, np.ndarray]], float]:
    """Glyph placements ``(x, y, coverage)`` at master size and the string's extent."""
    placed, pen, extent = [], 0.0, 0.0
    for i, ch in enumerate(text):
        adv, x0, y0, cov = _glyph(ch)
        if i == 0 and x0 < 0:
            pen = -x0  # a first glyph that overhangs its origin (j, x, /) starts at 0
        if cov.size:
            x = int(round(pen)) + x0
            placed.append((x, y0, cov))
            extent = max(extent, x + cov.shape[1])
        pen += adv
    return placed, max(pen, extent)


@lru_cache(maxsize=4096)
def _text_mask_cached(text: str, px: float, bold: bool) -> np.ndarray:
    text = normalize(text)
    extra = _bold_extra(px) if bold else 0
    placed, extent = _layout(text)
    total = extent + extra
    h_out = line_height(px)
    w_out = max(int(np.ceil(total * px / MASTER)), 1)
    # master canvas sized so that it maps exactly onto the output grid
    w_m = max(int(round(w_out * MASTER / px)), int(np.ceil(total)))
    h_m = max(int(round(h_out * MASTER / px)), _atlas.ASCENT + _atlas.DESCENT)
    canvas = np.zeros((h_m, w_m), dtype=np.float32)
    for x, y0, cov in placed:
        hh, ww = min(cov.shape[0], h_m - y0), min(cov.shape[1], w_m - x)
        if hh > 0 and ww > 0:
            region = canvas[y0: y0 + hh, x: x + ww]
            np.maximum(region, cov[:hh, :ww], out=region)
    if bold:
        thick = canvas.copy()
        for d in range(1, extra + 1):
            np.maximum(thick[:, d:], canvas[:, :-d], out=thick[:, d:])
        canvas = thick
    out = _area_resample(_area_resample(canvas, h_out, 0), w_out, 1)
    # a touch of gamma keeps small text from looking washed out
    out = np.clip(out, 0.0, 1.0) ** 0.8
    out.setflags(write=False)
    return out


def text_mask(text: str, px: float, bold: bool = False) -> np.ndarray:
    """Coverage (``line_height(px) x text_width(text, px)``, float32 in 0..1) of one line of text."""
    return _text_mask_cached(str(text), float(px), bool(bold))
