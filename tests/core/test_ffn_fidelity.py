"""Non-square (FFN) layers: our compact default path against the reference's own spread over
random valid completions of ``U`` (plain full-basis code in tests/helpers/ffn.py).

The reference's result depends on which orthonormal completion of ``U`` it is handed; a
faithful compact path must sit inside that spread, with the arbitrated count in its range.  The
closed-form expectation of casa_core/completion.py is also checked against Monte-Carlo averages
over random rotations, and shown invariant to the basis of the complement rows.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.ffn import full_svd, make_ffn_layer, random_completion, reference_spread, reference_transfer, spread
from helpers.plain import plain_casa

from casa_core import layer as L
from casa_core.completion import ComplementColumns, mixture_threshold
from casa_core.methods import casa_layer
from casa_core.routing import CasaParams, casa_update

COMPLETIONS = 8
CASES = [  # (M, N) in out x in, seed, fixture settings
    ((384, 96), 1, {}),
    ((96, 384), 2, {}),
    ((448, 64), 3, {"rel_drift": 2e-2, "drift_spread": 0.5, "lora_generic": 2.0}),
]
DEFAULTS = CasaParams()


def ours(layer, variant="casa", params=DEFAULTS, compact_entrywise=False):
    basis = L.compute_basis("ffn", layer.ws.float())
    drift = L.compute_drift(basis, layer.df.float())
    co = L.coordinates(basis, drift, layer.up.float(), layer.down.float())
    if compact_entrywise:  # the previous default: entry-wise CASA on the compact rows
        c_new, routing = casa_update(co.c_l(), co.c_f(), basis.S, False, params)
        return co.to_dense(c_new).double(), routing.stats
    upd = casa_layer(co, params, variant)
    return co.to_dense(upd.c).double(), upd.stats


@pytest.fixture(scope="module", params=range(len(CASES)), ids=[f"{c[0][0]}x{c[0][1]}" for c in CASES])
def case(request):
    shape, seed, kw = CASES[request.param]
    layer = make_ffn_layer(*shape, seed, **kw)
    lapack, refs = reference_spread(layer, COMPLETIONS, seed=100 + seed)
    return layer, lapack, refs


def test_update_inside_the_reference_spread(case):
    layer, _, refs = case
    got, _ = ours(layer)
    sp = spread(got, refs)
    print(f"\nours->mean {sp.ours_to_mean:.4f}; references->mean of the others "
          f"{min(sp.refs_leave_one_out):.4f}..{max(sp.refs_leave_one_out):.4f}")
    assert min(sp.refs_to_mean) > 0.01, "the fixture must make the completion matter"
    # closer to the references' mean than any one of them is to the mean of the others
    assert sp.ours_to_mean < min(sp.refs_leave_one_out)
    # and about as close as the mean of COMPLETIONS samples is to the expectation itself
    assert sp.ours_to_mean < 0.6 * float(np.median(sp.refs_leave_one_out))


def test_arbitrated_count_within_the_reference_range(case):
    layer, lapack, refs = case
    _, stats = ours(layer)
    arb = [r.stats.arbitrated_entries for r in refs]
    cand = [r.stats.candidates for r in refs]
    print(f"\narbitrated ours {stats.arbitrated_entries} references {min(arb)}..{max(arb)}; "
          f"candidates ours {stats.candidates} references {min(cand)}..{max(cand)}")
    assert min(arb) <= stats.arbitrated_entries <= max(arb)
    assert min(cand) <= stats.candidates <= max(cand)
    # the dominant region does not depend on the completion: counted over all M x N entries
    assert stats.entries == refs[0].stats.entries == layer.ws.numel()
    assert all(stats.dominant_entries == r.stats.dominant_entries for r in refs)
    assert stats.dominant_entries == lapack.stats.dominant_entries


def test_previous_compact_path_is_outside_the_reference_range(case):
    """The harness tells the two apart: entry-wise CASA on the compact rows (QR-triangular
    drift block, at most N + r complement rows) arbitrates far fewer entries."""
    layer, _, refs = case
    _, stats = ours(layer, compact_entrywise=True)
    arb = [r.stats.arbitrated_entries for r in refs]
    assert stats.arbitrated_entries < 0.8 * min(arb)


def test_reference_harness_agrees_with_plain_code():
    """One random completion through plain.py's loops gives the harness's C_new."""
    layer = make_ffn_layer(160, 40, 7)
    u, s, v = full_svd(layer.ws)
    u_full = random_completion(u[:, :40], torch.Generator().manual_seed(0))
    cl = (u_full.T @ layer.up) @ (layer.down @ v)
    cf = u_full.T @ layer.df @ v
    exp, info = plain_casa(cl, cf, s, False, 0.5, 0.5, 0.85, 0.9)
    got = reference_transfer(layer, u_full, s, v)
    expect = u_full.numpy() @ exp @ v.numpy().T
    np.testing.assert_allclose(got.update.numpy(), expect, atol=2e-6 * float(got.update.abs().max()))
    assert got.stats.arbitrated_entries == int(info["arb"].sum())


@pytest.mark.parametrize("variant", ["restoration_only", "arbitration_only"])
def test_ablations_inside_the_reference_spread(variant):
    layer = make_ffn_layer(320, 80, 11)
    _, refs = reference_spread(layer, COMPLETIONS, seed=5, variant=variant)
    got, stats = ours(layer, variant)
    sp = spread(got, refs)
    if variant == "restoration_only":  # no entry-wise decision: every completion gives the same
        assert max(sp.refs_to_mean) < 1e-5 and sp.ours_to_mean < 1e-5
    else:
        assert sp.ours_to_mean < min(sp.refs_leave_one_out)
        arb = [r.stats.arbitrated_entries for r in refs]
        assert min(arb) <= stats.arbitrated_entries <= max(arb)


def test_complement_basis_does_not_matter():
    """Rotating the compact complement rows (another valid completion of the same subspace)
    leaves our update unchanged: the formulation is completion-invariant."""
    layer = make_ffn_layer(256, 64, 4)
    basis = L.compute_basis("ffn", layer.ws.float())
    drift = L.compute_drift(basis, layer.df.float())
    co = L.coordinates(basis, drift, layer.up.float(), layer.down.float())
    n = basis.S.numel()
    c_l, c_f = co.c_l().double(), co.c_f().double()
    p = c_l.shape[0] - n
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rot = torch.block_diag(torch.eye(n, dtype=torch.float64), q)
    dims = 256 - 64
    a, sa = casa_update(c_l.float(), c_f.float(), basis.S, False, CasaParams(), complement_dim=dims)
    b, sb = casa_update((rot @ c_l).float(), (rot @ c_f).float(), basis.S, False, CasaParams(), complement_dim=dims)
    torch.testing.assert_close(rot @ a.double(), b.double(), rtol=0, atol=1e-5 * float(a.abs().max()))
    assert sa.stats.arbitrated_entries == sb.stats.arbitrated_entries
    # while the previous entry-wise rule does depend on it
    a0, _ = casa_update(c_l.float(), c_f.float(), basis.S, False, CasaParams())
    b0, _ = casa_update((rot @ c_l).float(), (rot @ c_f).float(), basis.S, False, CasaParams())
    assert float((rot @ a0.double() - b0.double()).norm()) > 1e-3 * float(a0.norm())


# ------------------------------------------------- the closed form against Monte-Carlo ------
def _haar(batch: int, d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((batch, d, d)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


@pytest.mark.parametrize("d, rho, ratio, theta_share", [
    (12, 0.0, 1.0, 0.3), (12, 0.7, 0.5, 0.1), (40, -0.4, 2.0, 0.6), (3, 0.2, 1.0, 0.2), (30, 0.999, 1.3, 0.05),
    (20, 0.5, 1.0, 0.0),
])
def test_expectation_matches_monte_carlo(d, rho, ratio, theta_share):
    """Average over random orthonormal bases of the complement of the reference's entry-wise
    rule (candidates: same sign; arbitrated: |x y| > theta; then y - x where |y| > |x| else 0)."""
    rng = np.random.default_rng(d)
    e = rng.standard_normal(d)
    e /= np.linalg.norm(e)
    z = rng.standard_normal(d)
    z -= (z @ e) * e
    z /= np.linalg.norm(z)
    l = ratio * (rho * e + math.sqrt(1 - rho * rho) * z)
    e = 1.3 * e
    theta = theta_share * 2 * np.linalg.norm(e) * np.linalg.norm(l) / d
    cols = ComplementColumns.from_blocks(e[:, None], l[:, None], d, np.array([True]))
    alpha, beta, arb = cols.expected_update(theta)
    trials = 6000
    w = _haar(trials, d, rng)  # columns of w[t] are a random completion's complement basis
    x = np.einsum("tij,i->tj", w, e)
    y = np.einsum("tij,i->tj", w, l)
    match = np.sign(x) == np.sign(y)
    hit = match & (np.abs(x * y) > theta)
    g = np.where(hit, np.where(np.abs(y) > np.abs(x), y - x, 0.0), y)
    upd = np.einsum("tij,tj->ti", w, g)  # each trial's complement column of C_new, mapped back
    mean, sem = upd.mean(0), upd.std(0) / math.sqrt(trials)
    pred = alpha[0] * e + beta[0] * l
    assert np.all(np.abs(pred - mean) < 5 * sem + 1e-9), (pred - mean) / (sem + 1e-12)
    n_hit = hit.sum(1)
    assert abs(arb[0] - n_hit.mean()) < 5 * n_hit.std() / math.sqrt(trials) + 1e-9
    assert abs(cols.expected_above(theta)[0] - arb[0]) < 1e-6 * max(1.0, arb[0])
    n_match = match.sum(1)
    assert abs(cols.expected_candidates()[0] - n_match.mean()) < 5 * n_match.std() / math.sqrt(trials) + 1e-9


def test_mixture_threshold_is_the_quantile_of_all_candidates():
    """With many complement rows the threshold is the quantile of the pooled scores: compare
    with the exact quantile of one large random completion's scores."""
    rng = np.random.default_rng(3)
    d, n = 4000, 6
    e = rng.standard_normal((d, n))
    l = rng.standard_normal((d, n)) * 0.5 + 0.3 * e
    top = np.abs(rng.standard_normal(500)) * 0.2
    cols = ComplementColumns.from_blocks(e, l, d, np.ones(n, dtype=bool))
    theta = mixture_threshold(top, cols, 0.85)
    # e and l as they are: coordinates of one (the identity) random-enough completion
    match = np.sign(e) == np.sign(l)
    pooled = np.concatenate([top, np.abs(e * l)[match]])
    exact = np.quantile(pooled, 0.85)
    assert abs(theta - exact) < 0.02 * exact
    assert abs(cols.expected_candidates().sum() - match.sum()) < 4 * math.sqrt(match.size)
