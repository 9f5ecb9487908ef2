"""ComfyUI's INT8, MXFP8 and NVFP4 weight layouts, quantised here from their definitions (plain torch, no
ComfyUI): the independent references the noise models of :mod:`casa_core.quantnoise` are checked against,
and the copies ``benchmarks/bench_quantised.py`` builds.

* :func:`int8` — round to the nearest integer step of ``max / 127`` (per tensor or per row), the division
  done in a chosen dtype (ComfyUI divides a bfloat16 weight by a bfloat16 copy of its scale);
* :func:`mxfp8` — per 32 values of a row a power-of-two scale ``2^ceil(log2(max / 448))``, then e4m3;
* :func:`nvfp4` — per 16 values an e4m3 scale of ``max / 6`` over the per-tensor ``max / (448 * 6)``, then
  the nearest e2m1 level.

Rows that are not a whole number of blocks end in a partial block (padded with zeros, as the layouts do).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    m, n = w.shape
    return torch.nn.functional.pad(w, (0, (-n) % block)).reshape(m, -1, block)


def mxfp8(w: torch.Tensor) -> torch.Tensor:
    b = _blocks(w, 32)
    s = torch.exp2(torch.ceil(torch.log2(b.abs().amax(-1, keepdim=True) / FP8_MAX)))
    return ((b / s).to(torch.float8_e4m3fn).float() * s).reshape(w.shape[0], -1)[:, : w.shape[1]]


def nvfp4(w: torch.Tensor) -> torch.Tensor:
    b = _blocks(w, 16)
    ts = w.abs().max() / (FP8_MAX * 6.0)
    total = (b.abs().amax(-1, keepdim=True) / 6.0 / ts).to(torch.float8_e4m3fn).float() * ts
    x = b / total
    levels = E2M1.to(w.device)
    q = levels[(x.abs()[..., None] - levels).abs().argmin(-1)] * x.sign()
    return (q * total).reshape(w.shape[0], -1)[:, : w.shape[1]]


def int8(w: torch.Tensor, per_row: bool = False, dtype: torch.dtype = torch.float32):
    """``(dequantised weight, scale)``."""
    s = (w.abs().amax(1, keepdim=True) if per_row else w.abs().max()) / 127.0
    q = torch.round((w.to(dtype) / s.to(dtype)).float()).clamp(-128, 127)
    return q * s, s
