"""The storage grids and the drift separated from rounding noise (plain maths written out here)."""
from __future__ import annotations

import math

import pytest
import torch

from casa_core.quantnoise import StorageGrid, drift_snr, grid_of, separate_drift
from helpers import layouts

FP8_MAX = 448.0


def _weights(m=256, n=256, seed=0, std=0.02):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("case", ["e4m3_plain", "e4m3_scaled", "e4m3_row", "e5m2", "bf16", "fp16"])
def test_float_cells_hold_the_unrounded_value(case):
    w = _weights(seed=1)
    if case == "e4m3_plain":
        q, grid = w.to(torch.float8_e4m3fn).float(), StorageGrid.fp8(torch.float8_e4m3fn)
    elif case == "e4m3_scaled":
        s = w.abs().max() / FP8_MAX
        q, grid = (w / s).to(torch.float8_e4m3fn).float() * s, StorageGrid.fp8(torch.float8_e4m3fn, s)
    elif case == "e4m3_row":
        s = w.abs().amax(1) / FP8_MAX
        q = (w / s[:, None]).to(torch.float8_e4m3fn).float() * s[:, None]
        grid = StorageGrid.fp8(torch.float8_e4m3fn, s)
    elif case == "e5m2":
        q, grid = w.to(torch.float8_e5m2).float(), StorageGrid.fp8(torch.float8_e5m2)
    elif case == "bf16":
        q, grid = w.bfloat16().float(), StorageGrid.of_dtype(torch.bfloat16)
    else:
        q, grid = w.half().float(), StorageGrid.of_dtype(torch.float16)
    lo, hi = grid.cells(q)
    err = w - q
    assert bool(((err >= lo) & (err <= hi)).all())
    # the cells are the rounding cells, not wider: some errors come close to their edges
    assert float(torch.maximum(err / hi.clamp_min(1e-30), err / lo.clamp_max(-1e-30)).max()) > 0.9
    ratio = float(grid.noise_variance(q).sum().sqrt() / err.norm())
    assert 0.85 < ratio < 1.15, ratio


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16])
def test_float_cells_are_the_midpoints_to_the_neighbouring_values_everywhere(dtype):
    """Every finite value of the format (all bit patterns: zeros, subnormals, exact powers of two, the
    largest binades), its cell against the midpoints to its neighbours in the sorted list of all values."""
    bits = torch.arange(2 ** (8 * torch.empty((), dtype=dtype).element_size()), dtype=torch.int32)
    if dtype.itemsize == 1:
        vals = bits.to(torch.uint8).view(dtype).float()
    else:
        vals = bits.to(torch.int16).view(dtype).float()
    vals = torch.unique(vals[torch.isfinite(vals)])  # sorted, one zero
    mid = vals[1:-1]  # the two extremes have no neighbour on one side
    want_lo = (vals[:-2] - mid) / 2
    want_hi = (vals[2:] - mid) / 2
    lo, hi = StorageGrid.of_dtype(dtype).cells(mid[None, :])
    assert torch.equal(lo[0], want_lo) and torch.equal(hi[0], want_hi)


@pytest.mark.parametrize("case", ["int8", "int8_row", "int8_bf16", "mxfp8", "nvfp4"])
def test_layout_cells_hold_the_unrounded_value(case):
    """ComfyUI's INT8, MXFP8 and NVFP4 layouts, quantised from their definitions (tests/helpers/layouts.py);
    rows of 250 values end in a partial block, and one row is 1e-5 times the others (NVFP4's block scales
    there are e4m3 subnormals, MXFP8's values are still normal: the power-of-two scale follows the block)."""
    w = _weights(128, 250, seed=4)
    w[5] *= 1e-5
    # a block whose largest value rounds down to a power of two times 448 (its scale is then twice what
    # the stored largest suggests), holding values small enough to be e4m3 subnormals under that scale
    w[7, :32] = torch.linspace(1e-7, 1.5e-6, 32)
    w[7, 0] = FP8_MAX * 2.0 ** -14 * (1 + 2.0 ** -6)
    if case.startswith("int8"):
        wt = w.bfloat16().float() if case == "int8_bf16" else w
        q, s = layouts.int8(wt, case == "int8_row", torch.bfloat16 if case == "int8_bf16" else torch.float32)
        grid = StorageGrid.int8(s, torch.bfloat16 if case == "int8_bf16" else torch.float32)
        w = wt
    elif case == "mxfp8":
        q, grid = layouts.mxfp8(w), StorageGrid.block_scaled("mxfp8")
    else:
        q, grid = layouts.nvfp4(w), StorageGrid.block_scaled("nvfp4")
    assert grid.supported and grid.coarse
    lo, hi, var = grid.cells_and_variance(q)
    err = w - q
    assert float(err.norm()) > 0
    assert bool(((err >= lo) & (err <= hi)).all())
    reach = torch.maximum(err / hi.clamp_min(1e-30), err / lo.clamp_max(-1e-30))
    # the cells are the rounding cells, not wider: some errors come close to their edges
    assert float(reach.max()) > (0.75 if case == "int8_bf16" else 0.9)
    ratio = float(var.sum().sqrt() / err.norm())
    assert 0.85 < ratio < 1.15, ratio


def test_int8_cells_widen_with_the_division_in_bfloat16():
    """Divided in bfloat16, the largest integers are off by more than half a step: the exact-division
    model would not hold them, the bfloat16 one does."""
    w = _weights(128, 256, seed=6).bfloat16().float()
    q, s = layouts.int8(w, False, torch.bfloat16)
    err = w - q
    lo, hi = StorageGrid.int8(s).cells(q)
    assert not bool(((err >= lo) & (err <= hi)).all())
    lo, hi = StorageGrid.int8(s, torch.bfloat16).cells(q)
    assert bool(((err >= lo) & (err <= hi)).all())


def test_grid_of_recognises_upcast_weights():
    w = _weights()
    assert grid_of(w) is None
    assert grid_of(w.bfloat16().float()).kind == "bfloat16"
    assert grid_of(w.half().float()).kind == "float16"
    assert grid_of(w.to(torch.float8_e4m3fn)).kind == "float8_e4m3fn"
    assert grid_of(w.to(torch.float8_e4m3fn).float()).kind == "float8_e4m3fn"  # the narrowest grid that fits


def _low_rank_drift(ws, rank=16, rel=0.015, seed=3):
    g = torch.Generator().manual_seed(seed)
    m, n = ws.shape
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    s = torch.arange(1, rank + 1).float() ** -0.5
    d = (u * s) @ v.T
    return d * (rel * float(ws.norm()) / float(d.norm()))


def _separated_from_scaled_fp8(ws, wt, drift):
    """``wt`` stored as per-tensor scaled fp8 e4m3 and its drift from ``ws`` separated: ``(stored weight,
    separation report, relative error of the stored difference, relative error of the estimate)``."""
    s = wt.abs().max() / FP8_MAX
    q = (wt / s).to(torch.float8_e4m3fn).float() * s
    grid = StorageGrid.fp8(torch.float8_e4m3fn, s)
    lo, hi = grid.cells(q)
    d0 = q - ws
    est, info = separate_drift(d0, lo, hi, grid.noise_variance(q))
    return q, info, float((d0 - drift).norm() / drift.norm()), float((est - drift).norm() / drift.norm())


def test_low_rank_drift_is_separated_from_fp8_noise():
    ws = _weights(512, 512, seed=2)
    drift = _low_rank_drift(ws)
    wt = ws + drift
    q, info, raw_err, err = _separated_from_scaled_fp8(ws, wt, drift)
    assert raw_err > 1.2  # the stored difference is mostly noise ...
    assert err < 0.35 * raw_err, (err, raw_err, info)  # ... the estimate mostly drift
    noise = float((q - wt).norm())
    assert math.isclose(info["noise_norm"], noise, rel_tol=0.1)
    assert math.isclose(info["snr"], float(drift.norm()) / noise, rel_tol=0.25)
    assert info["method"] == "consistent low-rank" and 8 <= info["rank"] <= 40


def test_pure_noise_gives_almost_nothing_and_a_clear_drift_is_kept():
    ws = _weights(256, 256, seed=4)
    s = ws.abs().max() / FP8_MAX
    q = (ws / s).to(torch.float8_e4m3fn).float() * s
    grid = StorageGrid.fp8(torch.float8_e4m3fn, s)
    lo, hi = grid.cells(q)
    est, info = separate_drift(q - ws, lo, hi, grid.noise_variance(q))
    assert float(est.norm()) < 0.3 * float((q - ws).norm()), info
    assert info["snr"] < 0.3
    # a large full-rank drift (a heavy fine-tune) under bf16 rounding: essentially unchanged
    big = 0.2 * _weights(256, 256, seed=5)
    wt = (ws + big).bfloat16().float()
    grid = StorageGrid.of_dtype(torch.bfloat16)
    lo, hi = grid.cells(wt)
    est, info = separate_drift(wt - ws, lo, hi)
    assert float((est - (wt - ws)).norm() / (wt - ws).norm()) < 0.02, info
    assert info["snr"] > 10


def test_snr_is_an_amplitude_ratio():
    assert drift_snr(5.0, 1.0) == 2.0 and drift_snr(0.5, 1.0) == 0.0 and drift_snr(1.0, 0.0) == math.inf


def test_a_clean_target_is_projected_without_refinement():
    """bf16 rounding of a 1.5 % low-rank drift: amplitude SNR about 9, above PROJECT_SNR: the projection onto
    the components above the noise edge, closer to the drift than the stored difference."""
    from casa_core.quantnoise import PROJECT_SNR

    ws = _weights(256, 256, seed=6)
    drift = _low_rank_drift(ws)
    wt = (ws + drift).bfloat16().float()
    grid = StorageGrid.of_dtype(torch.bfloat16)
    lo, hi = grid.cells(wt)
    d0 = wt - ws
    est, info = separate_drift(d0, lo, hi, grid.noise_variance(wt))
    noise = float((d0 - drift).norm())  # the bf16 rounding itself
    assert info["snr"] >= PROJECT_SNR and math.isclose(info["snr"], float(drift.norm()) / noise, rel_tol=0.3)
    assert info["method"] == "low-rank projection" and info["rank"] == 16, info
    raw_err, err = float((d0 - drift).norm()), float((est - drift).norm())
    assert err < 0.5 * raw_err, (err, raw_err)
    # the projection of the stored difference onto its top-16 right singular vectors, computed plainly
    _, _, vh = torch.linalg.svd(d0.double())
    plain = d0.double() @ vh[:16].T @ vh[:16]
    assert float((est.double() - plain).norm() / plain.norm()) < 1e-3


def _power_law_layer(m, n, seed, rank=64, head=16, rel=0.015):
    """A bf16 weight with singular values ~ i^-0.5 (trained layers' shape of spectrum, element std 0.02) and a
    rank-``rank`` drift of ``rel`` of its norm, ``head`` of whose directions lie in the weight's leading ones."""
    g = torch.Generator().manual_seed(seed)

    def orthonormal(rows, cols):
        q, rr = torch.linalg.qr(torch.randn(rows, cols, generator=g))
        return q * torch.sign(torch.diagonal(rr))

    r = min(m, n)
    s = torch.arange(1, r + 1).float() ** -0.5
    s = s * (0.02 * math.sqrt(m * n) / float(s.norm()))
    u, v = orthonormal(m, r), orthonormal(n, r)
    ws = ((u * s) @ v.T).bfloat16().float()
    du, _ = torch.linalg.qr(torch.cat([u[:, :head] @ orthonormal(head, head), orthonormal(m, rank - head)], 1))
    dv, _ = torch.linalg.qr(torch.cat([v[:, :head] @ orthonormal(head, head), orthonormal(n, rank - head)], 1))
    d = (du * torch.arange(1, rank + 1).float() ** -0.5) @ dv.T
    return ws, d * (rel * float(ws.norm()) / float(d.norm()))


def test_the_consistency_refinement_converges_on_a_tall_scaled_fp8_layer():
    """A tall layer with a power-law spectrum, a rank-64 drift of 1.5 % and per-tensor scaled fp8: the refined
    estimate is nearly consistent with the cells and far closer to the drift than the stored difference (a
    momentum-accelerated iteration ran away here: its estimate was as far off as the raw difference)."""
    ws, drift = _power_law_layer(1728, 640, seed=0)
    _, info, raw_err, err = _separated_from_scaled_fp8(ws, (ws + drift).bfloat16().float(), drift)
    assert raw_err > 1.2
    assert info["method"] == "consistent low-rank"
    assert info["consistency"] < 0.25, info  # nearly in every cell (a run-away iteration ends at 1.0)
    assert err < 0.3 * raw_err, (err, raw_err, info)


def test_a_fine_grid_keeps_the_edge_rank_below_the_clear_snr():
    """bf16 rounding of a 0.2 % drift (SNR near 1, below CLEAR_SNR): no rank search on a fine grid, the rank
    is the count above the noise edge, and the estimate is still far closer to the drift than the stored
    difference; the coarse grids (fp8, GGUF) search."""
    from casa_core.quantnoise import CLEAR_SNR

    assert not StorageGrid.of_dtype(torch.bfloat16).coarse and not StorageGrid.of_dtype(torch.float16).coarse
    assert StorageGrid.fp8(torch.float8_e4m3fn).coarse and StorageGrid.gguf("Q8_0").coarse
    ws = _weights(384, 384, seed=8)
    drift = _low_rank_drift(ws, rel=0.002)
    wt = (ws + drift).bfloat16().float()
    grid = StorageGrid.of_dtype(torch.bfloat16)
    lo, hi, var = grid.cells_and_variance(wt)
    assert torch.equal(lo, grid.cells(wt)[0]) and torch.equal(var, grid.noise_variance(wt))
    d0 = wt - ws
    searched = separate_drift(d0, lo, hi, var)[1]
    est, info = separate_drift(d0, lo, hi, var, rank_search=False)
    assert info["snr"] < CLEAR_SNR and "trace" in searched and "trace" not in info
    assert info["method"] == "consistent low-rank" and info["rank"] == info["edge_rank"] > 0, info
    raw_err, err = float((d0 - drift).norm()), float((est - drift).norm())
    assert err < 0.25 * raw_err, (err, raw_err, info)


@pytest.mark.parametrize("scaled", [False, True], ids=["e4m3fn", "scaled-e4m3fn"])
def test_an_edge_margin_brings_a_coarse_grid_estimate_closer_to_the_drift(scaled):
    """fp8 storage of a 1.5 % rank-64 drift (noise about twice the drift): the consistent estimate kept
    EDGE_MARGIN times its expected per-entry error inside the cells is closer to the drift than the one that
    only touches them (measured 0.674 vs 0.646 plain, 0.420 vs 0.389 scaled), and the cells are handed back
    as they came."""
    from casa_core.quantnoise import EDGE_MARGIN, _pocs, edge_margin

    ws, drift = _power_law_layer(768, 768, seed=0)
    wt = (ws + drift).bfloat16().float()
    s = wt.abs().max() / FP8_MAX if scaled else None
    q = (wt / s).to(torch.float8_e4m3fn).float() * s if scaled else wt.to(torch.float8_e4m3fn).float()
    grid = StorageGrid.fp8(torch.float8_e4m3fn, s)
    lo, hi, var = grid.cells_and_variance(q)
    d0 = q - ws
    errs = [float((separate_drift(d0, lo, hi, var, margin=mg)[0] - drift).norm() / drift.norm())
            for mg in (0.0, EDGE_MARGIN)]
    assert errs[1] < 0.97 * errs[0], errs
    # the margin: the per-entry RMS of the noise's share in the rank-k tangent space, times the multiple
    noise = float(var.double().sum())
    k, (m, n) = 17, d0.shape
    assert math.isclose(edge_margin(noise, (m, n), k, 1.0),
                        math.sqrt(noise / (m * n)) * math.sqrt(k * (m + n - k) / (m * n)), rel_tol=1e-12)
    assert edge_margin(noise, (m, n), k, 0.0) == 0.0 and edge_margin(0.0, (m, n), k) == 0.0
    # narrowed while the projections run, restored after; an unconstrained (held-out) entry stays unconstrained
    lo_b, hi_b = d0 + lo, d0 + hi
    lo_b[0, 0], hi_b[0, 0] = -math.inf, math.inf
    before = lo_b.clone(), hi_b.clone()
    v = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(0)))[0]
    x, _ = _pocs(d0, lo_b, hi_b, v, 5, margin=edge_margin(noise, (m, n), k))
    assert torch.allclose(lo_b, before[0], rtol=0, atol=1e-9) and torch.allclose(hi_b, before[1], rtol=0, atol=1e-9)
    assert lo_b[0, 0] == -math.inf and hi_b[0, 0] == math.inf and torch.isfinite(x).all()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS"])
def test_gguf_cells_of_rows_stored_across_super_blocks(qtype):
    """Rows of 384 values are not whole 256-value super-blocks: city96's converter stores such a weight as
    rows of 256 of its flat values (the shape kept aside), so its blocks run across the logical rows. The
    cells of the weight in its own shape must hold the unrounded values (they crashed before)."""
    from helpers.gguf_files import dequantize, quantize

    w = _weights(64, 384, seed=8)
    flat = w.reshape(-1, 256)
    q = dequantize(quantize(flat, qtype), qtype, flat.shape).reshape(64, 384)
    lo, hi = StorageGrid.gguf(qtype).cells(q)
    err = w - q
    assert float(err.norm()) > 0
    assert bool(((err >= lo) & (err <= hi)).all())
