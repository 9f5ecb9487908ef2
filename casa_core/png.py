"""Minimal PNG writing and colour maps (numpy + zlib only, no imaging dependency)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# Anchors of a perceptual sequential map (dark blue -> yellow) and a diverging map.
_SEQ = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float64)
_DIV = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], dtype=np.float64)


def _interp(anchors: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.floor(t).astype(int).clip(0, len(anchors) - 2)
    frac = (t - lo)[..., None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).round().astype(np.uint8)


def sequential(values: np.ndarray) -> np.ndarray:
    """RGB for values in [0, 1]."""
    return _interp(_SEQ, values)


def diverging(values: np.ndarray) -> np.ndarray:
    """RGB for values in [-1, 1] (blue negative, white zero, red positive)."""
    return _interp(_DIV, (np.asarray(values) + 1.0) / 2.0)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``H x W x 3`` uint8 image."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(rgb))
