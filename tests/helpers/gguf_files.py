"""GGUF model files for the tests, written with the ``gguf`` package (llama.cpp's Python library).

* :func:`quantize` — a float matrix (``out x in``) as the raw bytes of one GGUF tensor type. Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1 and BF16 come from ``gguf.quants.quantize``; the package only *dequantises*
  the K-quants and IQ4s, so Q2_K … Q6_K, IQ4_NL and IQ4_XS are encoded here, straight from the block layouts (what the
  decoder reads: fp16 super-block scales, 6-bit packed sub-block scales and mins, 4/5/6-bit values),
  with round-to-nearest given the final scales. :func:`dequantize` is the gguf package's decoder, the
  independent reference; ``tests/core/test_gguf.py`` checks that the two agree.
* :func:`save_gguf` — a state dict as a GGUF file the way ComfyUI-GGUF's converter lays it out:
  ``general.architecture`` (``wan``, ``hyvid``), the model's own key names, 2-D weights in the chosen
  types (``qtypes``: a type per layer, or one for all), everything else in F32, and tensors of more than
  four dimensions flattened with their shape in ``comfy.gguf.orig_shape.<name>``.

Needs numpy, torch and gguf only (importable by path from the ComfyUI tests).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

QK_K = 256


def _gguf():
    import gguf

    return gguf


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12-byte scale field of Q4_K/Q5_K from 6-bit scales and mins (n_blocks x 8 each)."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _k_affine(blocks: np.ndarray, levels: int):
    """Per 32-value sub-block: ``x ~ d*sc*q - dmin*m`` with 6-bit sc/m; returns (d, dmin, sc, m, q)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # the stored min is subtracted, so it is <= 0
    hi = sub.max(-1)
    scale = (hi - lo) / (levels - 1)
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 63), 0)
    mq = np.where(dmin[:, None] > 0, np.clip(np.rint(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63), 0)
    step = d[:, None] * sc
    off = dmin[:, None] * mq
    q = np.where(step[..., None] > 0, np.rint((sub + off[..., None]) / np.where(step > 0, step, 1)[..., None]), 0)
    q = np.clip(q, 0, levels - 1).astype(np.uint8)
    return d, dmin, sc, mq, q


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, mq, q = _k_affine(blocks, 16)
    qs = np.zeros((n, 4, 32), dtype=np.uint8)
    for p in range(4):
        qs[:, p] = q[:, 2 * p] | (q[:, 2 * p + 1] << 4)
    return np.concatenate([_f16(d), _f16(dmin), _pack_k_scales(sc, mq), qs.reshape(n, 128)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, mq, q = _k_affine(blocks, 32)
    low, high = q & 0x0F, q >> 4
    qs = np.zeros((n, 4, 32), dtype=np.uint8)
    for p in range(4):
        qs[:, p] = low[:, 2 * p] | (low[:, 2 * p + 1] << 4)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] & 1) << j
    return np.concatenate([_f16(d), _f16(dmin), _pack_k_scales(sc, mq), qh, qs.reshape(n, 128)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sf = np.abs(sub).max(-1) / 31.0  # q in -31..31: no clipping
    d = (sf.max(-1) / 127.0).astype(np.float16).astype(np.float32)
    scales = np.where(d[:, None] > 0, np.clip(np.rint(sf / np.where(d > 0, d, 1)[:, None]), -127, 127), 0)
    step = d[:, None] * scales
    q = np.where(step[..., None] > 0, np.rint(sub / np.where(step > 0, step, 1)[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    ql = np.zeros((n, 2, 64), dtype=np.uint8)
    qh = np.zeros((n, 2, 32), dtype=np.uint8)
    for i in range(128):
        ql[:, :, i % 64] |= (q[:, :, i] & 0x0F) << (4 * (i // 64))
        qh[:, :, i % 32] |= (q[:, :, i] >> 4) << (2 * (i // 32))
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), scales.astype(np.int8).view(np.uint8),
                           _f16(d)], axis=1)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, with its sign (llama.cpp's ``max``)."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """256 2-bit values per block -> 64 bytes: value ``g*128 + s*32 + j`` in bits ``2s`` of byte ``g*32 + j``."""
    n = q.shape[0]
    q = q.reshape(n, 2, 4, 32)
    out = np.zeros((n, 2, 32), dtype=np.uint8)
    for s in range(4):
        out |= (q[:, :, s] & 3) << (2 * s)
    return out.reshape(n, 64)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16 values ``x ~ d*sc*q - dmin*m``, 4-bit sc and m, q in 0..3; fp16 d, dmin."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    lo = np.minimum(sub.min(-1), 0.0)
    scale, mins = (sub.max(-1) - lo) / 3.0, -lo
    d = (scale.max(-1) / 15.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 15.0).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 15), 0)
    mq = np.where(dmin[:, None] > 0, np.clip(np.rint(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0, 15), 0)
    step, off = d[:, None] * sc, dmin[:, None] * mq
    q = np.where(step[..., None] > 0, np.rint((sub + off[..., None]) / np.where(step > 0, step, 1)[..., None]), 0)
    q = np.clip(q, 0, 3).astype(np.uint8).reshape(n, 256)
    scales = (sc.astype(np.uint8) & 0x0F) | (mq.astype(np.uint8) << 4)
    return np.concatenate([scales, _pack_2bit(q), _f16(d), _f16(dmin)], axis=1)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16 values ``x ~ d (sc - 32) q``, q in -4..3 (the largest magnitude of each
    sub-block maps to -4, as llama.cpp's make_q3_quants does), 6-bit sc packed in 12 bytes; fp16 d."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    top = _signed_max(sub)
    scale = -top / 4.0
    big = _signed_max(scale)
    d = -big / 32.0
    ls = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]), -32, 31)
    dl = (d.astype(np.float16).astype(np.float32)[:, None] * ls)[..., None]
    q = np.clip(np.rint(sub / np.where(dl == 0, 1, dl)), -4, 3).astype(np.int8).reshape(n, 256)
    ql = np.where(q >= 0, q, q + 4).astype(np.uint8)
    hbit = (q >= 0).astype(np.uint8).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= hbit[:, b] << b
    sc = (ls + 32).astype(np.uint8)
    packed = np.zeros((n, 12), dtype=np.uint8)
    for i in range(16):
        packed[:, i % 8] |= (sc[:, i] & 0x0F) << (4 * (i // 8))
        packed[:, 8 + i % 4] |= ((sc[:, i] >> 4) & 3) << (2 * (i // 4))
    return np.concatenate([hmask, _pack_2bit(ql), packed, _f16(d)], axis=1)


# IQ4_NL / IQ4_XS: llama.cpp's non-uniform 4-bit codebook (ggml-common.h's kvalues_iq4nl)
_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _iq4_levels(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The nearest codebook level of ``x / d`` (``d`` broadcast over the last axis; 0 -> level 8)."""
    r = x / np.where(d == 0, 1, d)
    return np.abs(r[..., None] - _IQ4).argmin(-1).astype(np.uint8)


def _iq4_nibbles(q: np.ndarray) -> np.ndarray:
    """32 levels per block -> 16 bytes: value j in the low nibble of byte j, value j + 16 in its high one."""
    return q[..., :16] | (q[..., 16:] << 4)


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """IQ4_NL, 32 values per block: fp16 ``d`` and 16 bytes of levels. The value of largest magnitude
    maps to the level -127 (``d = -x_max / 127``, as llama.cpp starts its scale search), the levels are
    the nearest ones given the unrounded ``d``."""
    b = blocks.reshape(-1, 32)
    top = _signed_max(b)
    d = -top / 127.0
    q = _iq4_levels(b, d[:, None])
    return np.concatenate([_f16(d), _iq4_nibbles(q)], axis=1).reshape(blocks.shape[0], -1)


def _iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS, 256-value super-blocks: fp16 ``d``, 8 sub-block scales ``ls`` in 6 bits (``dl = d (ls - 32)``,
    low nibbles in ``scales_l``, the two high bits in ``scales_h``) and 128 bytes of levels."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    top = _signed_max(sub)
    scale = -top / 127.0  # n x 8, the sub-blocks' own scales
    big = _signed_max(scale)
    d = -big / 32.0
    ls = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None]) + 32, 0, 63).astype(np.uint8)
    dl = d[:, None] * (ls.astype(np.float32) - 32)
    q = _iq4_levels(sub, dl[..., None])
    scales_l = np.zeros((n, 4), dtype=np.uint8)
    for ib in range(8):
        scales_l[:, ib // 2] |= (ls[:, ib] & 0x0F) << (4 * (ib % 2))
    scales_h = np.zeros(n, dtype=np.uint16)
    for ib in range(8):
        scales_h |= ((ls[:, ib] >> 4) & 3).astype(np.uint16) << (2 * ib)
    return np.concatenate([_f16(d), scales_h.view(np.uint8).reshape(n, 2), scales_l,
                           _iq4_nibbles(q).reshape(n, 128)], axis=1)


_K_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k,
                                                              "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_XS": _iq4_xs}


def quantize(w: torch.Tensor, qtype: str) -> np.ndarray:
    """``w`` (float, ``out x in``) as GGUF tensor bytes of type ``qtype``: ``uint8 [out, row bytes]``
    (``float32``/``float16`` arrays for F32/F16)."""
    gguf = _gguf()
    x = w.detach().float().cpu().numpy()
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype == "IQ4_NL":
        if x.shape[-1] % 32:
            raise ValueError(f"IQ4_NL rows must be a multiple of 32 values, got {x.shape[-1]}")
        return _iq4_nl(x.reshape(x.shape[0], -1, 32).reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)
    if qtype in _K_ENCODERS:
        if x.shape[-1] % QK_K:
            raise ValueError(f"{qtype} rows must be a multiple of {QK_K} values, got {x.shape[-1]}")
        blocks = x.reshape(-1, QK_K)
        raw = _K_ENCODERS[qtype](blocks)
        return raw.reshape(x.shape[0], -1)
    return gguf.quants.quantize(x, t)


def dequantize(raw: np.ndarray, qtype: str, shape) -> torch.Tensor:
    """The gguf package's dequantisation of ``quantize``'s output, as a float32 tensor of ``shape``."""
    gguf = _gguf()
    if qtype in ("F32", "F16"):
        return torch.from_numpy(np.asarray(raw, dtype=np.float32)).reshape(shape)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, t), dtype=np.float32)).reshape(shape)


def save_gguf(path, state_dict: Mapping[str, torch.Tensor], qtypes: str | Mapping[str, str] = "Q8_0",
              arch: str = "wan") -> Path:
    """Write ``state_dict`` as a GGUF file: 2-D ``.weight`` tensors in ``qtypes`` (one type, or
    ``{key: type}`` with a default under ``"*"``), the rest in F32. Returns the path."""
    gguf = _gguf()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    writer.add_type("diffusion")  # "general.type", as the converters write it
    for key, t in state_dict.items():
        t = t.detach().float().cpu()
        if t.ndim == 2 and key.endswith(".weight"):
            qtype = qtypes if isinstance(qtypes, str) else qtypes.get(key, qtypes.get("*", "F32"))
        else:
            qtype = "F32"
        if t.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(t.shape))
            t = t.reshape(t.shape[0], -1)
        raw = quantize(t if t.ndim else t.reshape(1), qtype)
        if qtype in ("F32", "F16"):
            writer.add_tensor(key, raw)
        else:
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
