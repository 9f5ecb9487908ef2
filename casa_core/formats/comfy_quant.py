"""ComfyUI's integer and block-scaled weight formats in safetensors files, decoded without ComfyUI.

A quantised layer carries a ``<module>.comfy_quant`` JSON tensor (or an entry of the
``_quantization_metadata`` header) whose ``format`` names how ``<module>.weight`` is stored:

* ``int8_tensorwise``: int8 integers times ``weight_scale`` (a scalar, or one per output row);
* ``mxfp8``: float8_e4m3fn values times a power-of-two ``weight_scale`` (E8M0 exponents) per 32 values of a row;
* ``nvfp4``: two e2m1 values per byte (the first in the high nibble) times an e4m3 ``weight_scale`` per 16
  values of a row times the per-tensor float32 ``weight_scale_2``.

The block scales are stored in cuBLAS's tiled layout for block-scaling factors: the scale matrix, padded
to whole 128-row x 4-column tiles, one tile after the other (row tiles outer), and inside a tile the entry
``(r, c)`` at ``(r % 32) * 16 + (r // 32) * 4 + c``. Rows and columns that pad the weight to whole blocks
are zeros; a padded weight's logical shape is not in the file, so its layer keeps the stored shape.

:func:`decode` gives the float32 weight; :func:`grid` its storage grid
(:class:`~casa_core.quantnoise.StorageGrid`), so that the drift is separated from the rounding as for
fp8 and GGUF targets.
"""
from __future__ import annotations

import torch

from ..quantnoise import E2M1_LEVELS, StorageGrid

__all__ = ["FORMATS", "VALUES_PER_ELEMENT", "decode", "grid", "unswizzle"]

#: format -> the tensors beside ``<module>.weight`` it needs
FORMATS: dict[str, tuple[str, ...]] = {
    "int8_tensorwise": ("weight_scale",),
    "mxfp8": ("weight_scale",),
    "nvfp4": ("weight_scale", "weight_scale_2"),
}
#: values per stored element (NVFP4 packs two per byte): the layer's columns over the stored tensor's
VALUES_PER_ELEMENT = {"nvfp4": 2}
_BLOCK = {"mxfp8": 32, "nvfp4": 16}


def unswizzle(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``rows x cols`` scale matrix from its cuBLAS tiled layout (any shape holding the tiles in order)."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    flat = tiled.reshape(-1)
    if flat.numel() != row_tiles * col_tiles * 512:
        raise ValueError(f"{flat.numel()} block scales do not tile a {rows} x {cols} scale matrix "
                         f"({row_tiles * col_tiles * 512} expected)")
    # tile (i, j), inner (r0, r1, c) with r = 32 r1 + r0 -> full (128 i + 32 r1 + r0, 4 j + c)
    t = flat.reshape(row_tiles, col_tiles, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return t.reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def _e8m0(x: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8 bytes) as float32 powers of two (255: NaN)."""
    e = x.view(torch.uint8).to(torch.float32)
    return torch.where(e == 255, torch.full_like(e, float("nan")), torch.exp2(e - 127.0))


def _e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Two e2m1 codes per byte (high nibble first) as float32 values."""
    lut = torch.tensor(E2M1_LEVELS + tuple(-v for v in E2M1_LEVELS), dtype=torch.float32)
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack([b >> 4, b & 0x0F], dim=-1).reshape(packed.shape[0], -1)
    return lut[codes]


def decode(fmt: str, weight: torch.Tensor, scales: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of a layer stored as ``fmt`` (``scales``: suffix -> tensor, see :data:`FORMATS`).
    Raises ValueError naming what does not fit."""
    if fmt == "int8_tensorwise":
        if weight.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"an int8_tensorwise weight must be int8, not {weight.dtype}")
        q = weight.view(torch.int8).to(torch.float32)
        s = scales["weight_scale"].to(torch.float32)
        if s.numel() == 1:
            return q * s.reshape(())
        if s.numel() == q.shape[0]:
            return q * s.reshape(-1, 1)
        raise ValueError(f"weight_scale has shape {list(s.shape)}, neither a scalar nor one value per output row")
    if fmt == "mxfp8":
        if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
            raise ValueError(f"an mxfp8 weight must be float8_e4m3fn, not {weight.dtype}")
        v = weight.view(torch.float8_e4m3fn).to(torch.float32)
    elif fmt == "nvfp4":
        if weight.dtype not in (torch.uint8, torch.int8):
            raise ValueError(f"an nvfp4 weight must be packed bytes (uint8), not {weight.dtype}")
        v = _e2m1(weight)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    rows, cols = v.shape
    block = _BLOCK[fmt]
    if cols % block:
        raise ValueError(f"a row of {cols} values is not a whole number of {block}-value blocks")
    raw = scales["weight_scale"]
    if fmt == "mxfp8":
        s = _e8m0(unswizzle(raw.view(torch.uint8), rows, cols // block))
    else:
        s = unswizzle(raw.view(torch.uint8), rows, cols // block).view(torch.float8_e4m3fn).to(torch.float32)
        s = s * scales["weight_scale_2"].to(torch.float32).reshape(())
    return (v.reshape(rows, -1, block) * s[:, :, None]).reshape(rows, cols)


def grid(fmt: str, scales: dict[str, torch.Tensor]) -> StorageGrid:
    """The storage grid of a layer stored as ``fmt``. int8: the quantiser's division is taken to be in
    bfloat16 (what ComfyUI does for a bf16 model), whose cells hold those of an exact division too."""
    if fmt == "int8_tensorwise":
        return StorageGrid.int8(scales["weight_scale"].to(torch.float32), torch.bfloat16)
    return StorageGrid.block_scaled(fmt)
