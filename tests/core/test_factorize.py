"""The low-rank factoriser against the optimal rank-r update (an exact float64 SVD), per layer.

"Gap to optimal", printed for every layer: ``dist`` = ||B'A' - C_r|| / ||C_r|| with ``C_r`` the
best rank-r approximation, ``energy`` = (||C - B'A'||^2 - ||C - C_r||^2) / ||C||^2, beside what
LAPACK's own float32 SVD achieves (float32 rounding, given how close singular values r and r+1
are).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from casa_core import layer as L
from casa_core import linalg, synth
from casa_core.factorize import OutputSpec, realize
from casa_core.methods import casa_layer
from casa_core.routing import CasaParams


@functools.lru_cache(maxsize=2)
def spectrum_matrix(rows, cols, rank, decay, gap, seed, floor=None):
    """``U diag(s) V^T`` (float64) with ``s_i ~ i^-decay``, ``s_{rank+1} = (1 - gap) s_rank``; with ``floor``,
    everything after the first ``2 rank`` values sits in a flat tail at ``floor * s_1`` (a
    drift's restoration floor under a LoRA)."""
    g = torch.Generator().manual_seed(seed)
    n = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=torch.float64))
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    if floor is not None:
        s[2 * rank:] = floor * (1 + 1e-3 * torch.rand(n - 2 * rank, generator=g, dtype=torch.float64))
    s[rank] = s[rank - 1] * (1 - gap)
    s = torch.sort(s, descending=True).values
    return (u * s) @ v.T


def gap_to_optimal(c64: torch.Tensor, left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[float, float]:
    u, s, vh = torch.linalg.svd(c64, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = left.double() @ right.double()
    dist = float((got - best).norm() / best.norm())
    energy = (float((c64 - got).norm()) ** 2 - float((s[rank:] ** 2).sum())) / float((s**2).sum())
    return dist, energy


def lapack_float32(c64: torch.Tensor, rank: int) -> tuple[float, float]:
    u, s, vh = torch.linalg.svd(c64.float(), full_matrices=False)
    return gap_to_optimal(c64, u[:, :rank] * s[:rank], vh[:rank], rank)


def ours(c64: torch.Tensor, rank: int) -> tuple[float, float]:
    u, s, vh = linalg.top_singular(c64.float(), rank)
    return gap_to_optimal(c64, u * s, vh, rank)


# (label, matrix, rank): separated or near-degenerate singular values r / r+1
RESOLVABLE = [
    ("near-degenerate 16/17 within 0.25 %, 640x640", lambda: spectrum_matrix(640, 640, 16, 0.5, 0.0025, 1), 16),
    ("near-degenerate 16/17 within 0.25 %, tall 1024x576", lambda: spectrum_matrix(1024, 576, 16, 0.5, 0.0025, 2), 16),
    ("near-degenerate 32/33 within 0.1 %, 384x384 (exact where cheap)",
     lambda: spectrum_matrix(384, 384, 32, 0.3, 0.001, 3), 32),
    ("LoRA-like: 32 strong directions over a flat floor, rank 16, 640x640",
     lambda: spectrum_matrix(640, 640, 16, 0.5, 0.01, 4, floor=0.004), 16),
    ("LoRA-like: 64 strong directions over a flat floor, rank 64 (at the edge), 640x640",
     lambda: spectrum_matrix(640, 640, 32, 0.5, 0.003, 5, floor=0.004), 64),
]


@pytest.mark.parametrize("label, make, rank", RESOLVABLE, ids=[r[0] for r in RESOLVABLE])
def test_optimal_to_float32_rounding(label, make, rank):
    c64 = make()
    dist, energy = ours(c64, rank)
    ref_dist, ref_energy = lapack_float32(c64, rank)
    print(f"\n{label}: gap to optimal dist {dist:.2e} energy {energy:.1e}; LAPACK float32 dist "
          f"{ref_dist:.2e} energy {ref_energy:.1e}")
    # as close to the optimum as float32 LAPACK gets (within a small factor) and energy-exact
    assert dist <= 10 * max(ref_dist, 1e-6)
    assert energy <= 1e-10


SLOW = [  # singular values r / r+1 inside a flat or slowly decaying stretch of the spectrum
    ("flat tail (drift's restoration floor), rank 128, 640x640",
     lambda: spectrum_matrix(640, 640, 32, 0.5, 0.003, 5, floor=0.004), 128),
    ("slowly decaying (1/i) spectrum, rank 64, 640x640", lambda: spectrum_matrix(640, 640, 64, 1.0, 0.2, 6), 64),
]


@pytest.mark.parametrize("label, make, rank", SLOW, ids=[r[0] for r in SLOW])
def test_slow_spectra_energy_within_documented_bound(label, make, rank):
    """Where the leading pairs cannot converge within the iteration budget (the previous fixed
    cost), the result is not optimal; on a flat tail (CASA's restoration floor) and a 1/i decay
    the energy stays within 1e-5 of the optimum (documented in linalg.top_singular).  A slower
    i^-1/2 decay is worse (up to 5e-4 at rank 64 of 1536, printed by the benchmark) and not claimed."""
    c64 = make()
    dist, energy = ours(c64, rank)
    ref_dist, _ = lapack_float32(c64, rank)
    print(f"\n{label}: gap to optimal dist {dist:.2e} energy {energy:.1e}; LAPACK float32 dist "
          f"{ref_dist:.2e}")
    assert energy <= 1e-5


def test_transfer_layers_report_gap_to_optimal(tmp_path):
    """A CASA transfer of tiny Wan-shaped layers at rank 16: per layer, the injected update's
    relative error against the optimal rank-16 error (exact float64 SVD of the update)."""
    shape = synth.WanShape(dim=256, ffn_dim=640, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=3, dtype=torch.float32)
    layers = [n for n in svd if n.startswith("blocks.0.")]
    target = synth.distill(base, svd, rel_drift=5e-3, layers=layers, dtype=torch.float32)
    lora = synth.style_lora(svd, rank=32, alpha=16.0, layers=layers)
    spec = OutputSpec(mode="lowrank", rank=16)
    worst = 0.0
    for name in layers:
        key = "lora_unet_" + name.replace(".", "_")
        up = lora[key + ".lora_up.weight"].float() * 0.5
        down = lora[key + ".lora_down.weight"].float()
        w = base[name + ".weight"]
        b = L.compute_basis(name, w)
        d = L.compute_drift(b, target[name + ".weight"] - w)
        co = L.coordinates(b, d, up, down)
        upd = casa_layer(co, CasaParams())
        out = realize(co, upd, spec)
        exact = co.to_dense(upd.c).double()
        injected = out.tensors[0].double() @ out.tensors[1].double()
        s = torch.linalg.svdvals(exact)
        total = float((s**2).sum())
        optimal = float((s[16:] ** 2).sum()) / total
        gap = float((exact - injected).norm()) ** 2 / total - optimal
        print(f"\n{name} {tuple(w.shape)}: kept energy {1 - optimal - gap:.6f}, optimal {1 - optimal:.6f}, "
              f"gap {gap:.1e}; reported rel_error {out.rel_error:.6f} (optimal {math.sqrt(optimal):.6f})")
        assert abs(out.rel_error - math.sqrt(optimal + gap)) < 1e-5
        worst = max(worst, gap)
    assert worst <= 1e-9


def test_a_flat_spectrum_stops_after_one_step_in_float32_and_deterministically(monkeypatch):
    """On a flat tail around the rank (CASA's restoration floor) more steps only exchange near-equal
    directions: one power step and its Rayleigh-Ritz step, four products in all (no residual product: the
    iteration stops there whatever the residuals say), every one float32; the result is the same bytes on
    every call, and a resolvable spectrum still iterates on to convergence."""
    c = torch.from_numpy(spectrum_matrix(1024, 1024, 32, 0.5, 0.003, 5, floor=0.004).float().numpy())
    resolvable = torch.from_numpy(spectrum_matrix(1024, 1024, 16, 0.5, 0.0025, 1).float().numpy())
    dtypes = []
    real_mm = torch.Tensor.__matmul__
    def mm(a, b):  # the products with the whole matrix (not the small Rayleigh-Ritz ones)
        if a.numel() == c.numel():
            dtypes.append(a.dtype)
        return real_mm(a, b)
    monkeypatch.setattr(torch.Tensor, "__matmul__", mm)
    first = linalg.top_singular(c, 128)
    assert len(dtypes) == 4 and set(dtypes) == {torch.float32}, dtypes
    again = linalg.top_singular(c, 128)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    dtypes.clear()
    linalg.top_singular(resolvable, 16)
    assert len(dtypes) > 8, len(dtypes)
