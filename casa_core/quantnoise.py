"""Quantisation noise of a stored target and a drift that is separated from it.

A distilled model stored in fp8 or GGUF is ``W_t^q = W_t + E``: every element was rounded to the
storage grid. At a realistic distillation drift (about 1.5 % of the weight norm) the fp8 rounding
error is larger than the drift itself, so ``W_t^q - W_s`` is mostly noise, and restoring "the drift"
would write that noise into the transferred LoRA.

**The grid is known** (:class:`StorageGrid`): for fp8 the spacing at each stored value (3 mantissa
bits for e4m3, 2 for e5m2, times the per-tensor or per-row scale); for GGUF the block scale of every
32 (or 16) values (Q8_0: ``d = max|x| / 127`` exactly; K-quants: the sub-block's step, read back
from the dequantised values; IQ4_NL / IQ4_XS: the block scale of their 16-level codebook, read back the
same way; end levels also hold what a block's scale clipped). So for every element we know the
*cell* ``[q + lo, q + hi]`` that the unrounded value lies in (round to nearest), and the noise variance
``(hi - lo)^2 / 12``.

**Separation** (:func:`separate_drift`). A distillation drift has a decaying singular spectrum (a
distillation LoRA is low rank by construction; extracted ones show the same shape), while rounding
noise spreads evenly over all ``min(m, n)`` singular directions. We estimate the drift as the
low-rank matrix that is *consistent with the cells*: alternating projections between "rank k" and
"``W_s + drift`` lies in every element's cell" (POCS, over-relaxed; Nesterov's momentum was tried:
faster, and better on some layers, but 3x worse on a 13824x5120 scaled-fp8 one, so it is not used).
The rank is the number of singular values of ``W_t^q - W_s`` above the noise's spectral edge (the
largest singular value of a sample of the noise itself) when the drift clearly stands out (amplitude
SNR >= 2); below that, on the coarse grids (fp8, GGUF),
consistency recovers components the spectrum cannot show, and the rank is chosen among 0.75-2x that
count by cross-validation (fit on 90 % of the cells, score the held-out 10 %; ranks are tried upwards and
the search stops after two worse ones in a row). For uniform rounding
noise, consistent estimation is known to beat linear estimation and singular-value thresholding:
its error falls like ``1/oversampling`` instead of ``1/sqrt(oversampling)`` (Thao & Vetterli 1994;
here the oversampling is ``mn / (k (m + n))``, 10-40 for Wan layers). Whatever the low-rank part
leaves is added back with a Wiener (James-Stein) factor ``max(0, 1 - noise energy / residual energy)``,
so a drift with a large full-rank part (a heavy fine-tune) is kept, and pure noise is not. Measured
in ``benchmarks/bench_quantised.py``. A clean target (amplitude SNR >= ``PROJECT_SNR``, e.g. bf16 storage of
a usual distillation) skips the consistency refinement: the projection onto the components above the
noise edge removes most of its rounding (1.5 % drift at 1536x1536: drift error 11 % -> 3.2 %, transfer
error 8.9 % -> 5.5 %) for the cost of one randomised SVD instead of minutes per 14B layer.

ComfyUI's own layouts are modelled too: INT8 (per tensor or per row), MXFP8 and NVFP4 (block scales read back
from the values). A lossy storage without a model here (GGUF IQ2/IQ3/TQ, INT8 with a rotation, 4-bit SVDQuant
or AWQ layouts) has a grid
that is not :attr:`StorageGrid.supported`: its drift is used as stored, and the summaries say so.

**Signal-to-noise** per layer: ``snr = sqrt(max(||dF||^2 - N, 0) / N)`` with ``N`` the expected noise
energy, an amplitude ratio: below 1 the layer's drift is under its noise floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import linalg

__all__ = ["GGUF_GRIDS", "DriftEstimate", "StorageGrid", "drift_snr", "grid_of", "noise_energy", "separate_drift",
           "separate_drift_parts"]

# fp8 formats: (mantissa bits, smallest normal exponent)
_FLOAT_GRIDS = {
    "float8_e4m3fn": (3, -6),
    "float8_e5m2": (2, -14),
    "bfloat16": (7, -126),
    "float16": (10, -14),
}
_FLOAT_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
                 torch.bfloat16: "bfloat16", torch.float16: "float16"}

#: GGUF quantisation types: (values per scale block, levels, symmetric). Symmetric blocks store
#: ``x = d * q`` with ``|q| <= levels // 2`` (step ``max|x| / (levels // 2)``, exact for Q8_0's
#: ``max|x| / 127``); the others ``x = d * q - m`` with ``q in 0..levels-1`` (step
#: ``(max - min) / (levels - 1)``). K-quants are given by their sub-blocks (the super-block only holds
#: the scales of the scales).
GGUF_GRIDS: dict[str, tuple[int, int, bool]] = {
    "Q8_0": (32, 255, True),
    "Q4_0": (32, 16, True),
    "Q4_1": (32, 16, False),
    "Q5_0": (32, 32, True),
    "Q5_1": (32, 32, False),
    "Q2_K": (16, 4, False),
    "Q3_K": (16, 8, True),
    "Q4_K": (32, 16, False),
    "Q5_K": (32, 32, False),
    "Q6_K": (16, 64, True),
}
_SYMMETRIC_QMAX = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16, "Q3_K": 4, "Q6_K": 32}
# K-quants also quantise the sub-block scales (6 or 8 bits) and choose them by a weighted search, so
# their step is known less exactly than Q8_0's: their cells get this extra width
_SCALE_SLACK = {"Q2_K": 1.25, "Q3_K": 1.25, "Q4_K": 1.25, "Q5_K": 1.25, "Q6_K": 1.25}
_GAP_ROWS = 512
#: K-quants: the largest sub-block scale integer (``sc`` of the sub-block with the largest step)
_K_SCALE_MAX = {"Q2_K": 15, "Q3_K": 32, "Q4_K": 63, "Q5_K": 63, "Q6_K": 127}
#: GGUF types with a non-uniform codebook: every 32 values are ``d * IQ4_LEVELS[q]`` (IQ4_XS: ``d`` is the
#: super-block scale times a 6-bit sub-block scale; the form per 32 values is the same)
CODEBOOK_GRIDS = ("IQ4_NL", "IQ4_XS")
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: the GGUF types that are plain floats or integers: no rounding grid of a quantiser
_GGUF_PLAIN = ("F32", "F64", "F16", "BF16", "I8", "I16", "I32", "I64")
#: block-scaled layouts (ComfyUI's QuantizedTensor layouts from comfy_kitchen): values per scale block along
#: the input dimension. MXFP8: e4m3 values times a power-of-two scale per block, chosen so that the block's
#: largest magnitude fits (``2^ceil(log2(max / 448))``). NVFP4: e2m1 values (``E2M1_LEVELS``) times a
#: per-block scale (an e4m3 number times a per-tensor float32) close to ``max / 6``.
BLOCK_GRIDS = {"mxfp8": 32, "nvfp4": 16}
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E4M3_MAX = 448.0


@dataclass(frozen=True)
class StorageGrid:
    """How one layer's weight is stored, enough to rebuild every element's rounding cell.

    ``kind``: ``"float8_e4m3fn"``, ``"float8_e5m2"`` or ``"gguf:<type>"`` (``gguf:Q8_0``, ``gguf:Q4_K`` …);
    ``scale``: the fp8 scale (scalar or one per output row), None for 1.
    """

    kind: str
    scale: torch.Tensor | None = None
    #: int8: the unit roundoff of the arithmetic the quantiser divided in (ComfyUI's divides a bfloat16
    #: weight by its scale in bfloat16: up to a step more at the largest integers), 0 for exact division
    arith_eps: float = 0.0

    @classmethod
    def fp8(cls, dtype: torch.dtype, scale: torch.Tensor | None = None) -> StorageGrid:
        return cls(_FLOAT_DTYPES[dtype], None if scale is None else scale.detach().float().cpu())

    @classmethod
    def of_dtype(cls, dtype: torch.dtype, scale: torch.Tensor | None = None) -> StorageGrid | None:
        """The grid of a float storage dtype (fp8, bfloat16, float16), None for float32/float64."""
        return cls.fp8(dtype, scale) if dtype in _FLOAT_DTYPES else None

    @classmethod
    def gguf(cls, qtype: str) -> StorageGrid | None:
        """The grid of a GGUF tensor type, None for the float and integer types (F32, F16, BF16 …). A
        quantised type without a noise model here (IQ2_XXS, TQ1_0 …) gets a grid that is not
        :attr:`supported`, so that the drift says so instead of passing for a clean one."""
        return None if qtype in _GGUF_PLAIN else cls("gguf:" + qtype)

    @classmethod
    def int8(cls, scale: torch.Tensor, source_dtype: torch.dtype | None = None) -> StorageGrid:
        """Integers ``-128..127`` times ``scale`` (one per tensor, or one per output row), rounded to the
        nearest (ComfyUI's ``TensorWiseINT8Layout``). ``source_dtype``: the dtype of the weights that were
        quantised; the quantiser divides in it (a bfloat16 quotient and scale are each off by up to
        ``2^-8`` of their value), so the cells of the larger integers are wider."""
        eps = 2.0 ** -8 if source_dtype == torch.bfloat16 else 2.0 ** -11 if source_dtype == torch.float16 else 0.0
        return cls("int8", scale.detach().float().cpu().reshape(-1), eps)

    @classmethod
    def block_scaled(cls, kind: str) -> StorageGrid:
        """A block-scaled layout of :data:`BLOCK_GRIDS` (``"mxfp8"``, ``"nvfp4"``); its block scales are
        read back from the dequantised values."""
        if kind not in BLOCK_GRIDS:
            raise ValueError(f"unknown block-scaled layout {kind!r}")
        return cls(kind)

    @classmethod
    def unmodelled(cls, name: str) -> StorageGrid:
        """A lossy storage whose rounding cannot be modelled here (e.g. a ComfyUI quantised layout other
        than fp8): not :attr:`supported`; ``name`` is how the summary calls it."""
        return cls("other:" + name)

    @property
    def supported(self) -> bool:
        if self.kind.startswith("gguf:"):
            return self.kind[5:] in GGUF_GRIDS or self.kind[5:] in CODEBOOK_GRIDS
        return self.kind in _FLOAT_GRIDS or self.kind == "int8" or self.kind in BLOCK_GRIDS

    @property
    def coarse(self) -> bool:
        """fp8 and GGUF grids (a few bits per value), whose noise can be several times a drift; bfloat16
        and float16 are fine grids: :func:`separate_drift` needs no rank search on them."""
        return self.kind not in ("bfloat16", "float16")

    def describe(self) -> str:
        if self.kind.startswith("gguf:"):
            return f"GGUF {self.kind[5:]}"
        if self.kind.startswith("other:"):
            return self.kind[6:]
        if self.kind == "int8":
            return "int8 (scaled per row)" if self.scale is not None and self.scale.numel() > 1 else "int8 (scaled)"
        if self.kind in BLOCK_GRIDS:
            return self.kind.upper()
        fmt = {"bfloat16": "bf16", "float16": "fp16"}.get(self.kind, self.kind.replace("float8_", "fp8 "))
        return f"{fmt} (scaled)" if self.scale is not None else fmt

    def cells(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: the unrounded value of ``w[i, j]`` (the dequantised stored weight, ``out x in``)
        lies in ``[w + lo, w + hi]``; ``lo <= 0 <= hi``."""
        return self._cells(w)[:2]

    def noise_variance(self, w: torch.Tensor) -> torch.Tensor:
        """The rounding error's variance per element: ``step^2 / 12`` (the cells of GGUF blocks are a
        little wider than a step, to allow for the rounding of their scales)."""
        return self._cells(w)[2]

    def cells_and_variance(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lo, hi, variance)``: :meth:`cells` and :meth:`noise_variance` from one pass over ``w``."""
        return self._cells(w)

    def _cells(self, w: torch.Tensor):
        w = w.float()
        if self.kind in _FLOAT_GRIDS:
            lo, hi = _float_cells(w, self.scale, *_FLOAT_GRIDS[self.kind])
            return lo, hi, (hi - lo).square_().div_(12.0)
        if self.kind == "int8":
            return _int8_cells(w, self.scale, self.arith_eps)
        if self.kind == "mxfp8":
            lo, hi = _float_cells(w, _mx_scales(w), *_FLOAT_GRIDS["float8_e4m3fn"])
            return lo, hi, (hi - lo).square_().div_(12.0)
        if self.kind == "nvfp4":
            return _nvfp4_cells(w)
        if self.kind.startswith("gguf:") and (self.kind[5:] in GGUF_GRIDS or self.kind[5:] in CODEBOOK_GRIDS):
            return _stored_rows(w, self.kind[5:])
        raise ValueError(f"no noise model for storage {self.kind!r}")


def _float_cells(w: torch.Tensor, scale: torch.Tensor | None, mbits: int, emin: int):
    # exact: 2^floor(log2 |x|) is |x| with its mantissa bits cleared (no log2 rounding at powers of two);
    # a dozen passes over the layer, each writing at most one new tensor
    if scale is None:
        x, half = w.abs(), 0.5
    else:
        if scale.shape == w.shape:  # one scale per value (block scales, expanded)
            s = scale.to(w.device)
        else:
            s = scale.to(w.device).reshape(-1, 1) if scale.numel() > 1 else scale.to(w.device).reshape(())
        x, half = (w / s).abs_(), s.abs() / 2
    smallest = 2.0 ** emin
    power = (x.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_min_(smallest)
    up = power.mul(2.0 ** -mbits)  # spacing above |x| (and below, inside the binade)
    at_power = (x == power).logical_and_(power > smallest)  # at 2^e the spacing below halves
    del x, power
    down = torch.where(at_power, up * 0.5, up)
    del at_power
    neg = w < 0
    hi = torch.where(neg, down, up).mul_(half)
    lo = torch.where(neg, up, down).neg_().mul_(half)
    return lo, hi


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """``w`` (``m x n``) as ``m x ceil(n / block) x block``, a last partial block padded with zeros (the
    layouts pad a row to whole blocks with zeros)."""
    m, n = w.shape
    pad = (-n) % block
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(m, -1, block)


def _per_value(per_block: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return per_block.repeat_interleave(block, dim=1)[:, :n]


def _int8_cells(w: torch.Tensor, scale: torch.Tensor, eps: float):
    """``w = step * q``: the cell is half a step either side, plus ``2 eps |q|`` steps for a quotient and a
    scale each rounded to a relative ``eps`` before the rounding to an integer; the variance is the
    uniform rounding's ``step^2 / 12`` plus the two relative roundings' ``(q step)^2 2 eps^2 / 3``."""
    step = scale.to(w.device).abs()
    step = step.reshape(-1, 1) if step.numel() > 1 else step.reshape(())
    if eps > 0:
        q = (w / step.clamp_min(1e-30)).abs_().round_()
        half = (q * (2.0 * eps)).add_(0.5).mul_(step)
        var = (q.square_().mul_(2.0 * eps * eps / 3.0).add_(1.0 / 12.0)).mul_(step.square())
    else:
        half = (step / 2).expand_as(w).clone()
        var = (step.square() / 12.0).expand_as(w).clone()
    return -half, half, var


def _mx_scales(w: torch.Tensor) -> torch.Tensor:
    """MXFP8's power-of-two scale of every value's block, read back from the dequantised values. The
    quantiser's scale is ``2^ceil(log2(max / 448))`` of the block's largest magnitude, and the stored
    largest magnitude over 448 lies in ``(1/2, 1]`` of it, reaching 1/2 exactly when rounding took the
    largest value down to a power of two: then the scale is either ``max / 448`` or twice that. The cells
    depend on the scale only through e4m3's subnormals (values 2^14 times below the block's largest), and
    the coarser of the two gives cells that hold the finer one's, so the scale read back is
    ``2^(floor(log2(max / 448)) + 1)``."""
    amax = _blocks(w, BLOCK_GRIDS["mxfp8"]).abs().amax(-1)
    s = torch.exp2(torch.floor(torch.log2((amax / _E4M3_MAX).clamp_min(2.0 ** -127))) + 1.0)
    s = torch.where(amax > 0, s, torch.ones_like(s))
    return _per_value(s, BLOCK_GRIDS["mxfp8"], w.shape[1])


def _nvfp4_cells(w: torch.Tensor):
    """Cells of NVFP4 values: e2m1 levels times the block's scale ``d``, which is the block's largest
    dequantised magnitude over 6 (the quantiser's scale is ``max / 6`` rounded to e4m3, within 2^-4, so
    the largest value always rounds to the level 6). The level 6 also holds what the rounded scale let
    exceed it: up to ``6 / (1 - 2^-4)``. A block whose e4m3 scale is subnormal (its largest value below
    ``2^-6 / 448`` of the tensor's: the per-tensor scale is the tensor's largest over ``6 * 448``) has a
    scale rounded too coarsely to read back: its cells span every value such a block can hold."""
    m, n = w.shape
    block = BLOCK_GRIDS["nvfp4"]
    d_block = _blocks(w, block).abs().amax(-1) / 6.0
    tensor_scale = float(d_block.max()) / _E4M3_MAX if d_block.numel() else 0.0
    tiny = _per_value(d_block < tensor_scale * 2.0 ** -6, block, n)
    d = _per_value(d_block, block, n)
    levels = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=w.device)
    mids = (levels[1:] + levels[:-1]) / 2
    lower = torch.cat([levels[:1], mids])  # the cell of level i in units of d: [lower[i], upper[i]]
    upper = torch.cat([mids, levels[-1:] / (1.0 - 2.0 ** -4)])
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.bucketize(w.abs() / safe, mids).clamp_(0, len(E2M1_LEVELS) - 1)
    lv = levels[q]
    out = (upper[q] - lv) * d  # away from zero
    inn = torch.where(q == 0, mids[0], lv - lower[q]) * d  # towards zero (across it, for the level 0)
    del q, lv
    neg = w < 0
    hi = torch.where(neg, inn, out)
    lo = torch.where(neg, out, inn).neg_()
    if bool(tiny.any()):  # |x| <= 6 (2^-6 + 2^-10) times the per-tensor scale
        reach = 6.0 * (2.0 ** -6 + 2.0 ** -10) * tensor_scale
        hi = torch.where(tiny, reach - w, hi)
        lo = torch.where(tiny, -reach - w, lo)
    return lo, hi, (hi - lo).square_().div_(12.0)


def _stored_rows(w: torch.Tensor, qtype: str):
    """GGUF cells on the layout the blocks were made on. A weight whose rows are not a whole number of
    super-blocks (256 values for the K-quants and IQ4_XS, a block otherwise) is stored by city96's converter
    as rows of 256 values of the flat weight, its shape kept aside (``comfy.gguf.orig_shape``): its blocks
    run across the logical rows, so the cells are computed on that flat layout and given back in shape."""
    block = GGUF_GRIDS[qtype][0] if qtype in GGUF_GRIDS else _CODEBOOK_BLOCK
    whole = 256 if qtype in _K_SCALE_MAX or qtype == "IQ4_XS" else block
    m, n = w.shape
    flat = n % whole != 0 and w.numel() % 256 == 0
    x = w.reshape(-1, 256) if flat else w
    lo, hi, var = _gguf_cells(x, qtype) if qtype in GGUF_GRIDS else _codebook_cells(x, qtype)
    return (lo.reshape(m, n), hi.reshape(m, n), var.reshape(m, n)) if flat else (lo, hi, var)


def _gguf_cells(w: torch.Tensor, qtype: str):
    block, levels, symmetric = GGUF_GRIDS[qtype]
    m, n = w.shape
    if n % block:
        raise ValueError(f"a {qtype} row of {n} values is not a whole number of {block}-value blocks")
    b = w.reshape(m, n // block, block)
    if symmetric:
        step = b.abs().amax(-1, keepdim=True) / _SYMMETRIC_QMAX[qtype]
    else:
        # x = off + step q: the range over (levels - 1) is a lower bound of the step (exact when both end
        # levels are used); the smallest gap between two distinct values is a whole number of steps, so
        # the step is that gap over the largest whole number that keeps it above the bound (a sub-block
        # whose scale was rounded up uses fewer levels, and its range alone would give too small a step)
        lower = (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / (levels - 1)
        step = torch.empty_like(lower)
        for r in range(0, m, _GAP_ROWS):  # a few rows at a time: sorting makes a value and an index per value
            lw = lower[r:r + _GAP_ROWS]
            gaps = torch.diff(torch.sort(b[r:r + _GAP_ROWS], dim=-1).values, dim=-1)
            gaps = torch.where(gaps > lw * 1e-3, gaps, torch.full_like(gaps, math.inf)).amin(-1, keepdim=True)
            times = torch.floor(gaps / lw.clamp_min(1e-30) + 1e-3).clamp_(min=1.0)
            step[r:r + _GAP_ROWS] = torch.where(torch.isfinite(gaps) & (lw > 0), gaps / times, lw)
    # the block scale d is stored as float16 but the values were rounded with the unrounded d, so a
    # value can sit up to qmax * |d - fp16(d)| <= qmax * d * 2^-11 beyond its half step
    qmax = _SYMMETRIC_QMAX.get(qtype, levels - 1)
    slack = _SCALE_SLACK.get(qtype, 1.0)
    half = (step * (0.5 + qmax * 2.0 ** -11) * slack).expand_as(b)
    var = (step ** 2 / 12.0).expand_as(b).reshape(m, n)
    lo, hi = -half, half.clone()
    if qtype in _K_SCALE_MAX:
        # K-quants: a sub-block's step is an integer sc times the super-block's d, and llama.cpp's scale
        # search may pick a step that leaves the block's extremes outside the levels: the values at the
        # lowest and highest level of a sub-block also hold what was clipped, up to a step from the search
        # plus qmax / (2 sc) steps from rounding sc (sc read back against the super-block's largest step)
        per = max(1, 256 // block)
        sup = step.reshape(m, -1, per)
        sc = (sup / (sup.amax(-1, keepdim=True) / _K_SCALE_MAX[qtype]).clamp_min(1e-30)).round_().clamp_(min=1.0)
        k_extra = torch.clamp(qmax / (2.0 * sc.reshape(step.shape)), min=1.5)
        reach = (step * (0.5 + k_extra)) * slack
        top = b >= b.amax(-1, keepdim=True) - step * 0.5
        bottom = b <= b.amin(-1, keepdim=True) + step * 0.5
        hi = torch.where(top, reach.expand_as(b), hi)
        lo = torch.where(bottom, -reach.expand_as(b), lo)
    else:
        k_extra = 0.0
    if symmetric and qmax != 127:
        # levels -qmax..qmax-1 (Q4_0, Q5_0, Q3_K, Q6_K): the block's largest magnitude is the level -qmax,
        # so on the other side of zero the last level, qmax - 1 steps out, also holds what was clipped (up
        # to qmax steps): its cell reaches a whole step outwards
        top = b.gather(-1, b.abs().argmax(-1, keepdim=True))
        edge = (b * top < 0) & (b.abs() >= step * (qmax - 1.5))
        full = (step * (1.0 + qmax * 2.0 ** -11 + k_extra) * slack).expand_as(b)
        hi = torch.where(edge & (b > 0), torch.maximum(full, hi), hi)
        lo = torch.where(edge & (b < 0), torch.minimum(-full, lo), lo)
    return lo.reshape(m, n), hi.reshape(m, n), var


_CODEBOOK_BLOCK = 32
_CODEBOOK_CHUNK = 1 << 14  # blocks per pass of the scale search (16 candidates x 32 values each)


def _codebook_fit(x: torch.Tensor, cand_levels: torch.Tensor, levels: torch.Tensor,
                  mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For blocks ``x`` (``blocks x 32``): the first of the candidate levels of the largest value that
    makes every value a level (its scale), and whether one did (``mids``: the midpoints between levels)."""
    top = x.gather(1, x.abs().argmax(1, keepdim=True))  # blocks x 1, signed
    cands = top / cand_levels  # blocks x c
    ratio = x[:, None, :] / cands[:, :, None]  # an all-zero block: NaN, no candidate fits
    near = torch.bucketize(ratio, mids).clamp_(0, 15)
    ok = (ratio - levels[near]).abs_().amax(-1) <= 1e-3  # blocks x c
    found = ok.any(1)
    first = torch.where(found, ok.float().argmax(1), 0)
    return cands.gather(1, first[:, None])[:, 0], found


def _codebook_scales(b: torch.Tensor, levels: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """The scale ``d`` of every block of ``b`` (``blocks x 32``, values ``d * IQ4_LEVELS[q]``), read back
    from the values: the block's largest value is ``d`` times one of the 16 levels, and only the true one
    (or, for a block of a single repeated value, the largest level, the narrowest cells) makes every value
    a level. The two outer levels are tried first (llama.cpp's scale search starts from the largest value
    at -127, and most blocks keep it at an outer level), the other 14 on the blocks they leave. A block no
    candidate explains (NaN, or values not from an IQ4 grid) gets ``max|x| / 127``."""
    order = torch.argsort(levels.abs(), descending=True)  # the largest levels first
    outer, inner = levels[order[:2]], levels[order[2:]]
    out = torch.empty(b.shape[0], dtype=torch.float32, device=b.device)
    for s0 in range(0, b.shape[0], _CODEBOOK_CHUNK):
        x = b[s0:s0 + _CODEBOOK_CHUNK]
        d, found = _codebook_fit(x, outer, levels, mids)
        rest = torch.nonzero(~found).flatten()
        if rest.numel():
            d2, found2 = _codebook_fit(x[rest], inner, levels, mids)
            d[rest] = torch.where(found2, d2, x[rest].abs().amax(1) / 127.0)
        out[s0:s0 + _CODEBOOK_CHUNK] = d
    return out


def _codebook_cells(w: torch.Tensor, qtype: str):
    """Cells of IQ4_NL / IQ4_XS values, in units of their block's scale ``d``: the midpoints to the
    neighbouring levels (the quantiser takes the nearest level given its scale). The two outer levels
    also hold what was clipped: the block's largest value is about 127 ``d`` (llama.cpp's scale search
    moves it by up to 7 levels; an IQ4_XS sub-block scale ``d (l - 32)`` rounded to an integer ``l``
    lets it reach ``127 (1 + 1/(2 |l - 32|))``, or ``127 * 32.5 / 31`` where ``l - 32`` was clamped to
    31). Widened for the float16 rounding of the super-block scale that the levels were chosen with
    (relative ``2^-11``, or ``2^-25`` absolute where it is subnormal)."""
    m, n = w.shape
    if n % _CODEBOOK_BLOCK:
        raise ValueError(f"an IQ4 row of {n} values is not a whole number of {_CODEBOOK_BLOCK}-value blocks")
    b = w.reshape(-1, _CODEBOOK_BLOCK)
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=w.device)
    mids = (levels[1:] + levels[:-1]) / 2
    d = _codebook_scales(b, levels, mids)[:, None]
    ad = d.abs()
    if qtype == "IQ4_XS" and n % 256 == 0:  # 8 sub-blocks per super-block; the largest has |l - 32| = 32
        d16 = (ad.reshape(-1, 8).amax(1, keepdim=True) / 32.0).expand(-1, 8).reshape(-1, 1)
        steps = torch.where(d16 > 0, ad / d16, torch.ones_like(ad)).round_().clamp_(min=1.0)
        # l - 32 is clamped to -32..31, so a sub-block as large as the largest but of the other sign has
        # l - 32 = 31 for a scale of up to 32.5 units
        reach = 127.0 * (1.0 + torch.where(steps >= 31, 1.5, 0.5) / steps)
    else:
        d16 = ad
        reach = torch.full_like(ad, 127.0 + 8.0)
    rel = torch.maximum(torch.full_like(d16, 2.0 ** -11), 2.0 ** -25 / d16.clamp_min(2.0 ** -40))
    gap = levels[1:] - levels[:-1]
    below = torch.cat([gap[:1], gap]) / 2  # half-gap to the level below (outermost: the inner one)
    above = torch.cat([gap, gap[-1:]]) / 2
    safe = torch.where(d != 0, d, torch.ones_like(d))
    q = torch.bucketize(b / safe, mids).clamp_(0, 15)
    lv = levels[q]
    lo_u = lv - below[q]
    hi_u = lv + above[q]
    lo_u = torch.where(q == 0, torch.minimum(lo_u, -reach), lo_u)
    hi_u = torch.where(q == 15, torch.maximum(hi_u, reach), hi_u)
    lo_u = (lo_u - lv) - lo_u.abs() * rel  # relative to the stored value, widened
    hi_u = (hi_u - lv) + hi_u.abs() * rel
    del q, lv
    pos = d >= 0
    lo = torch.where(pos, lo_u * d, hi_u * d).reshape(m, n)
    hi = torch.where(pos, hi_u * d, lo_u * d).reshape(m, n)
    return lo, hi, (hi - lo).square_().div_(12.0)


def grid_of(w: torch.Tensor) -> StorageGrid | None:
    """The grid of a weight from its dtype, or, for a float32 tensor, from its values: a float32 copy of
    fp8, bfloat16 or float16 weights (ComfyUI upcasts models it runs in float32) lies on that grid; the
    narrowest format the values fit is the one they were stored in."""
    grid = StorageGrid.of_dtype(w.dtype)
    if grid is not None or w.dtype != torch.float32:
        return grid
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
        if bool(torch.equal(w.to(dtype).float(), w)):
            return StorageGrid.of_dtype(dtype)
    return None


def noise_energy(var: torch.Tensor) -> float:
    """Expected squared Frobenius norm of the rounding error (the sum of the per-element variances)."""
    return float(var.double().sum())


def drift_snr(drift_energy: float, noise: float) -> float:
    """Amplitude signal-to-noise of a drift whose observed energy is ``drift_energy``."""
    if noise <= 0:
        return math.inf
    return math.sqrt(max(drift_energy - noise, 0.0) / noise)


# -- separation ---------------------------------------------------------------------------------------

#: below this noise share of the observed drift energy the drift is used as it is
NEGLIGIBLE_NOISE = 1e-3
POCS_ITERS = 40
#: the consistency refinement on a fine grid (bf16 / fp16, no rank search): its cells are narrow, so the
#: iterate settles sooner. Measured with benchmarks/bench_quantised.py (1.3B shapes, a 0.3 % drift: SNR 1.6
#: in bf16), the transfer's distance to the one on the float32 drift, self_attn.q / ffn.2, after 10 / 20 / 40
#: steps: 1.7 / 1.6 / 1.5 % and 0.8 / 0.7 / 0.6 % (the raw drift: 6.4 %, the projection alone 2.6 / 1.8 %),
#: at a quarter of the time of 40 steps (about 1 s per 1.3B layer less, 10 s per 14B one)
FINE_POCS_ITERS = 12
REFINE_ITERS = 100
RANK_CANDIDATES = (0.75, 1.0, 1.25, 1.5, 2.0)  # times the number of singular values above the noise edge
CLEAR_SNR = 2.0  # above this drift/noise ratio the rank is the count above the noise edge
#: at or above this drift/noise amplitude ratio (noise energy <= 1/16 of the drift's: bf16 or fp16 targets
#: of a usual distillation, SNR 9 at a 1.5 % drift) the low-rank part is the projection onto the components
#: above the noise edge, without the consistency refinement
PROJECT_SNR = 4.0
RELAX = 1.8
PATIENCE = 2  # the search over ranks stops after this many worse held-out scores in a row
HOLD_OUT = 0.1  # share of the entries held out to choose the rank
NOISE_MARGIN = 1.1  # the noise energy is known to a few per cent: only a residual clearly above it is kept
#: on a coarse grid, a consistent estimate is kept this many times its expected per-entry error inside the
#: cells (see :func:`edge_margin`). A point that merely touches the cells is pinned to their edges wherever
#: its own error pushed it there; the truth, uniform in its cell, seldom is. Measured with
#: benchmarks/bench_quantised.py's layers, the drift error, multiplier 0 / 0.5 / 1 / 2:
#: 14B self_attn.q e4m3fn 19.9 / 15.6 / 14.9 / 16.4 %; 1.3B self_attn.q e4m3fn 53 / 48 / 45 / 45 %,
#: scaled fp8 16.9 / 11.5 / 14.8 / 21.2 %, Q8_0 10.4 / 10.3 / 10.0 / 8.8 %; 1.3B ffn.2 e4m3fn
#: 34.5 / 28.6 / 27.2 / 29.1 %, scaled 14.4 / 12.7 / 13.2 / 19.2 %, Q8_0 8.7 / 8.6 / 8.2 / 7.0 %
EDGE_MARGIN = 0.75


def _noise_edge(var: torch.Tensor, gen: torch.Generator, iters: int = 24) -> float:
    """Largest singular value of a sample of the rounding noise (uniform, of the given variances)."""
    half = (3.0 * var).sqrt()
    e = half * (2.0 * torch.rand(var.shape, generator=gen, device="cpu").to(var.device) - 1.0)
    v = torch.randn(e.shape[1], 1, generator=gen).to(e.device)
    for _ in range(iters):
        v = e.T @ (e @ v)
        nv = v.norm()
        if float(nv) == 0.0:
            return 0.0
        v = v / nv
    return float((e @ v).norm())


def _top_right(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, s)``: approximately the top-k right singular vectors of ``x`` (``n x k``, ordered) and
    the singular values (randomised subspace iteration)."""
    y = torch.randn(x.shape[1], k, generator=gen).to(x.device)
    q, _ = linalg.qr(x.T @ (x @ y))
    for _ in range(iters):
        q, _ = linalg.qr(x.T @ (x @ q))
    _, s, vh = linalg.svd(x @ q)
    return q @ vh.T, s


def _tangent_share(shape: tuple[int, int], k: int) -> float:
    """The share of an ``m x n`` matrix's dimensions in the tangent space of the rank-``k`` matrices,
    ``k (m + n - k) / (m n)``: the share of white noise a rank-``k`` fit keeps."""
    m, n = shape
    return k * (m + n - k) / (m * n)


def edge_margin(noise: float, shape: tuple[int, int], k: int, multiple: float = EDGE_MARGIN) -> float:
    """How far inside its cells a rank-``k`` estimate is kept: ``multiple`` times the root-mean-square
    per entry of the noise's part in the tangent space of the rank-``k`` matrices at the estimate,
    ``sqrt(noise * k (m + n - k)) / (m n)`` (``noise``: the expected ``||E||_F^2``), which is the per-entry
    error a rank-``k`` fit to noisy entries keeps."""
    if multiple <= 0 or noise <= 0 or k <= 0:
        return 0.0
    return multiple * math.sqrt(noise * _tangent_share(shape, k) / (shape[0] * shape[1]))


def _pocs(d0, lo_b, hi_b, v, iters, margin: float = 0.0):
    """Alternating projections onto {rank <= k} (one warm-started subspace step each) and the cells.

    An entry without a cell constraint (held out for cross-validation) has the cell ``(-inf, inf)``.
    ``margin``: the cells are narrowed by this much at both ends (by at most a quarter of their width)
    while the projections run, and restored after (in place: one buffer more, not three).
    The cell projection and its relaxation are two in-place passes over one buffer, and the rank-k product
    is written into the iterate's own: no ``m x n`` temporaries per iteration. Returns the iterate and
    its factors ``(q, z)`` (``x = q z``)."""
    if margin > 0:
        half = torch.sub(hi_b, lo_b).mul_(0.25).clamp_(max=margin)  # inf (an unconstrained entry) -> margin
        lo_b.add_(half)
        hi_b.sub_(half)
        try:
            return _pocs(d0, lo_b, hi_b, v, iters)
        finally:
            lo_b.sub_(half)
            hi_b.add_(half)
    x = None
    xb = torch.empty_like(d0)
    for _ in range(iters):
        if x is None:
            src = d0
        else:
            # over-relaxed projection onto the cells (x + RELAX (P(x) - x)): same fixed points, faster
            torch.clamp(x, lo_b, hi_b, out=xb)
            torch.lerp(x, xb, RELAX, out=xb)  # x + RELAX (xb - x), one pass
            src = xb
        q, _ = linalg.qr(src @ v)
        z = q.T @ src
        x = torch.mm(q, z, out=x) if x is not None else q @ z
        v, _ = linalg.qr(z.T)
    return x, (q, z)


def _box_residual(x, lo_b, hi_b) -> float:
    return float((x - torch.minimum(torch.maximum(x, lo_b), hi_b)).norm() / x.norm().clamp_min(1e-30))


@dataclass
class DriftEstimate:
    """A separated drift, ``left @ right + residual`` (``out x in``): the low-rank part as its factors
    (``left``: ``out x k``, ``right``: ``k x in``; ``k`` may be 0) and what is kept of the rest (dense, or
    None when nothing is, the usual case: then the drift is exactly rank ``k`` and the drift's coordinates
    cost ``O(mnk)``, not ``O(mn min(m, n))``)."""

    left: torch.Tensor
    right: torch.Tensor
    residual: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    def dense(self) -> torch.Tensor:
        low = self.left @ self.right
        return low if self.residual is None else low + self.residual


def separate_drift(d0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, var: torch.Tensor | None = None, *,
                   max_rank: int = 256, seed: int = 0, rank_search: bool = True,
                   margin: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The drift ``W_t - W_s`` estimated from ``d0 = W_t^q - W_s`` and the cells of ``W_t^q``, dense
    (:func:`separate_drift_parts` gives it factored, with the same arguments and report)."""
    est, info = separate_drift_parts(d0, lo, hi, var, max_rank=max_rank, seed=seed, rank_search=rank_search,
                                     margin=margin)
    return est.dense(), info


def separate_drift_parts(d0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, var: torch.Tensor | None = None, *,
                         max_rank: int = 256, seed: int = 0, rank_search: bool = True,
                         overwrite_cells: bool = False, margin: float = 0.0) -> tuple[DriftEstimate, dict]:
    """The drift ``W_t - W_s`` estimated from ``d0 = W_t^q - W_s`` and the cells of ``W_t^q``.

    ``lo``/``hi``: the cells (see :meth:`StorageGrid.cells`), ``var`` the noise variances
    (:meth:`StorageGrid.noise_variance`; default: uniform in the cells); ``rank_search`` False (a fine
    grid, :attr:`StorageGrid.coarse`) keeps the rank at the count above the noise edge below
    ``CLEAR_SNR`` too; ``overwrite_cells``: ``lo`` and ``hi`` may be overwritten (two layers' worth of
    memory less); ``margin``: the multiple of :func:`edge_margin` a consistent estimate keeps inside the
    cells (:data:`EDGE_MARGIN` for coarse grids; 0: it only has to touch them). Returns the estimate
    (:class:`DriftEstimate`, float32, on ``d0``'s device) and a report: ``noise_norm`` (expected
    ``||E||_F``), ``drift_norm`` (``||d0||``), ``snr`` (amplitude, :func:`drift_snr`), ``rank`` (of the consistent low-rank part), ``edge_rank``
    (singular values above the noise edge), ``residual_kept`` (the Wiener factor), ``method``.
    """
    d0 = d0.float()
    if var is None:
        var = (hi - lo) ** 2 / 12.0
    transposed = d0.shape[0] < d0.shape[1]
    if transposed:
        d0, lo, hi, var = d0.T, lo.T, hi.T, var.T
    m, n = d0.shape
    noise = noise_energy(var)
    energy = float((d0.double() ** 2).sum())
    info = {"noise_norm": math.sqrt(noise), "drift_norm": math.sqrt(energy), "snr": drift_snr(energy, noise),
            "rank": None, "edge_rank": None, "residual_kept": 1.0, "method": "raw"}

    def out(a: torch.Tensor, b: torch.Tensor, resid: torch.Tensor | None):
        if transposed:  # the work was on d0^T = a b
            a, b, resid = b.T, a.T, None if resid is None else resid.T
        return DriftEstimate(a.contiguous(), b.contiguous(), None if resid is None else resid.contiguous()), info

    if energy == 0.0 or noise <= NEGLIGIBLE_NOISE * energy:
        return out(d0.new_zeros(m, 0), d0.new_zeros(0, n), d0)
    gen = torch.Generator().manual_seed(seed)
    edge = _noise_edge(var, gen)
    k_cap = max(1, min(max_rank, n // 2))
    probe = min(n, 64)
    while True:  # grow the probe until it reaches below the noise edge
        v, s = _top_right(d0, min(n, probe + 8), gen)
        k_edge = int((s > edge).sum())
        if k_edge < probe or probe >= k_cap:
            break
        probe = min(k_cap, 2 * probe)
    info["edge_rank"] = k_edge
    lo_b, hi_b = (lo.add_(d0), hi.add_(d0)) if overwrite_cells else (d0 + lo, d0 + hi)

    def inset(rank: int) -> float:  # the absolute margin a rank-``rank`` estimate keeps inside the cells
        return edge_margin(noise, (m, n), rank, margin)

    del lo, hi
    k = min(k_edge, k_cap)
    if k == 0:
        low = torch.zeros_like(d0)
        factors = (d0.new_zeros(m, 0), d0.new_zeros(0, n))
    elif info["snr"] >= PROJECT_SNR:
        # a clean target (bf16 / fp16 storage of a usual distillation): the components above the noise
        # edge are the drift's, and projecting onto them already removes most of the rounding; the
        # consistency refinement would cost minutes per 14B layer for little more
        factors = (d0 @ v[:, :k], v[:, :k].T)
        low = factors[0] @ factors[1]
        info["method"] = "low-rank projection"
    elif info["snr"] >= CLEAR_SNR or not rank_search:
        # a clear drift: the spectrum shows every component above the noise, consistency refines them.
        # On a fine grid (bf16 / fp16) the rank search below does not pay at any SNR: measured at Wan-1.3B
        # shapes with a rank-64 drift of 0.1-0.3 % (SNR 0-1.6), its transfer was within 0.1 percentage point
        # of this one's (1.4 vs 1.5 %, 0.8 vs 0.9 %, 2.6 vs 2.6 %) and took 5x the time
        low, factors = _pocs(d0, lo_b, hi_b, v[:, :k].contiguous(), POCS_ITERS if rank_search else FINE_POCS_ITERS,
                             inset(k))
        info["method"] = "consistent low-rank"
        info["consistency"] = _box_residual(low, lo_b, hi_b)
    else:
        # rank by cross-validation: fit on the cells of 90 % of the entries only (the held-out 10 %
        # enter neither the start nor the subspace), score the held-out entries against their stored
        # values. The expected score is the estimation error there plus the known noise variance, so
        # its minimum over the candidate ranks is the rank that best predicts the drift.
        held = torch.rand(d0.shape, generator=gen).to(d0.device) < HOLD_OUT
        held_noise = float(var[held].sum())
        d_fit = torch.where(held, torch.zeros_like(d0), d0) / (1.0 - HOLD_OUT)
        lo_f = torch.where(held, -math.inf, lo_b)  # the held-out entries: no cell to keep to
        hi_f = torch.where(held, math.inf, hi_b)
        v_fit, _ = _top_right(d_fit, min(n, 2 * k + 8), gen)
        idx = torch.nonzero(held.flatten()).flatten()
        d_held = d0.flatten()[idx]
        del held

        def held_score(x: torch.Tensor) -> float:
            return float(((x.flatten()[idx] - d_held) ** 2).sum()) - held_noise

        trace = info["trace"] = []
        best, worse = None, 0
        for factor in RANK_CANDIDATES:  # ascending; stop once two ranks in a row predict worse
            kc = max(1, min(k_cap, v_fit.shape[1], round(k * factor)))
            if any(kc == t[0] for t in trace):
                continue
            x, _ = _pocs(d_fit, lo_f, hi_f, v_fit[:, :kc].contiguous(), POCS_ITERS, inset(kc))
            sc = held_score(x)
            del x
            trace.append((kc, sc))
            if best is None or sc < best[0]:
                best, worse = (sc, kc), 0
            else:
                worse += 1
                if worse >= PATIENCE:
                    break
        del d_fit, lo_f, hi_f
        k = best[1]
        low, factors = _pocs(d0, lo_b, hi_b,
                             v[:, :k].contiguous() if k <= v.shape[1] else _top_right(d0, k, gen)[0], REFINE_ITERS,
                             inset(k))
        info["method"] = "consistent low-rank"
        info["consistency"] = _box_residual(low, lo_b, hi_b)
    # what the low-rank part leaves: kept in proportion to how much of it is not noise
    resid = d0 - low
    r_energy = float((resid.double() ** 2).sum())
    r_noise = noise * max(0.0, 1.0 - _tangent_share((m, n), k))
    keep = max(0.0, 1.0 - NOISE_MARGIN * r_noise / r_energy) if r_energy > 0 else 0.0
    info.update(rank=k, residual_kept=keep)
    if info["method"] == "raw":
        info["method"] = "wiener"
    del low
    return out(*factors, resid.mul_(keep) if keep > 0 else None)
