"""How CASA's result moves when the drift moves by one unit in the last place (ulp).

CASA decides per entry (dominance quantile, sign agreement, arbitration quantile, the complement's
numerical rank), so a transfer is a piecewise-smooth function of the drift: it moves by a few ulps
while no decision flips, and by a whole entry where one does. The node (base + distillation LoRA
applied by ComfyUI) and the command line (the two files) must therefore compute the very same float32
drift (casa_core.drift.weight_difference on float64 targets; tests/comfy/test_drift_paths.py checks they
are equal). Here: a one-ulp move of every drift entry flips no decision on Wan-like layers and moves the
result by a few float32 ulps; the figure for the old float32 route (``float32(W_s + dF) - W_s``) is
printed beside it (on the tiny ComfyUI fixtures that route flipped entries: 1.4e-3 apart)."""
from __future__ import annotations

import pytest
import torch
from helpers.device import DEVICE

from casa_core import layer as L
from casa_core.drift import weight_difference
from casa_core.methods import casa_layer
from casa_core.routing import CasaParams
from casa_core.synth import spectral_weight


def _transfer(b, delta, up, down):
    d = L.compute_drift(b, delta)
    co = L.coordinates(b, d, up, down)
    upd = casa_layer(co, CasaParams())
    return co.to_dense(upd.c), upd.routing


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(128, 128), (256, 128), (128, 256)])
def test_one_ulp_of_drift_moves_the_transfer_by_ulps(shape):
    gen = torch.Generator().manual_seed(7)
    m, n = shape
    w, u, s, v = spectral_weight(m, n, gen)
    w = w.float()
    b = L.compute_basis("layer", w.to(DEVICE))
    # a distillation LoRA's drift: rank 8, 0.5 % of the weight, partly in the head directions
    h = 8
    d_up = torch.cat([u[:, :4], torch.randn(m, h - 4, generator=gen) / m**0.5], 1) @ torch.randn(h, h, generator=gen)
    d_dn = torch.randn(h, n, generator=gen)
    delta = d_up @ d_dn
    delta *= 5e-3 * float(w.norm() / delta.norm())
    up = torch.randn(m, 16, generator=gen)
    down = torch.randn(16, n, generator=gen)
    up *= 2e-2 * float(w.norm() / (up @ down).norm())
    delta, up, down = delta.to(DEVICE), up.to(DEVICE), down.to(DEVICE)

    ref, r0 = _transfer(b, delta, up, down)
    again, _ = _transfer(b, delta.clone(), up, down)
    assert torch.equal(ref, again)  # the same drift: the same bits

    nudged = torch.nextafter(delta, torch.full_like(delta, float("inf")))  # every entry one ulp up
    assert bool((nudged != delta).all())
    moved, r1 = _transfer(b, nudged, up, down)
    assert torch.equal(r0.dominance.mask(), r1.dominance.mask())
    assert torch.equal(r0.arbitrated_mask, r1.arbitrated_mask)
    assert r0.k == r1.k and r0.n_clusters == r1.n_clusters
    ulp_move = _rel(moved, ref)
    assert ulp_move < 1e-5, ulp_move

    # the old route: W_t = float32(W_s + dF), drift = W_t - W_s in float32 (what the node used to do)
    w = w.to(DEVICE)
    old = (w + delta) - w
    assert not torch.equal(old, delta)
    old_move = _rel(_transfer(b, old, up, down)[0], ref)
    # the same drift by one code path instead: exactly dF (W_s + dF formed in float64)
    same = weight_difference(w.double() + delta.double(), w)
    assert torch.equal(same, delta)
    print(f"{shape}: one ulp moves the transfer by {ulp_move:.2e}; the float32 sum route by {old_move:.2e}")
