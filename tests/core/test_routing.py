"""CASA's routing rules checked against plainly written, independent implementations
(tests/helpers/plain.py: algorithm.md line by line with numpy and Python loops)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from casa_core import layer as L
from casa_core.methods import casa_layer, prolora_layer
from casa_core.routing import CasaParams, casa_update, clusters, connected_components, leading_k
from helpers.plain import plain_casa, plain_components, plain_k


# ---------------------------------------------------------------- fixtures ---------------
def make_layer(m, n, seed, drift=0.05, lora_rank=3, lora_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    # A spectrum with a few close singular values so that clusters form.
    ws = torch.randn(m, n, generator=g, dtype=torch.float64) / np.sqrt(n)
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    s = torch.linspace(3.0, 0.2, s.numel(), dtype=torch.float64)
    s[1:4] = s[1] + torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64)
    ws = u @ torch.diag(s) @ vh
    df = drift * torch.randn(m, n, generator=g, dtype=torch.float64) / np.sqrt(n)
    df += drift * 3 * torch.outer(u[:, 0], vh[0])  # drift concentrated on the head direction
    b = torch.randn(m, lora_rank, generator=g, dtype=torch.float64) * lora_scale / np.sqrt(lora_rank)
    a = torch.randn(lora_rank, n, generator=g, dtype=torch.float64) / np.sqrt(n)
    return ws, df, b, a


def full_bases(w):
    u, s, vh = np.linalg.svd(w.numpy(), full_matrices=True)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh.T)


# ---------------------------------------------------------------- tests ------------------
def test_leading_k_matches_plain_definition():
    g = torch.Generator().manual_seed(1)
    s = torch.sort(torch.rand(50, generator=g), descending=True).values
    for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
        assert leading_k(s, True, energy) == plain_k(s.tolist(), True, energy)
    assert leading_k(s, False, 0.9) == 50


def test_connected_components_against_bfs():
    g = torch.Generator().manual_seed(2)
    for n, p in [(1, 0.0), (7, 0.0), (30, 0.05), (60, 0.02), (40, 0.5)]:
        adj = torch.rand(n, n, generator=g) < p
        adj = adj | adj.T
        adj.fill_diagonal_(False)
        ei, ej = torch.nonzero(torch.triu(adj, 1), as_tuple=True)
        labels = connected_components(ei, ej, n)
        expect, _ = plain_components(adj.tolist())
        assert labels.tolist() == expect.tolist()


def test_long_chain_component():
    n = 500
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    ei, ej = perm[:-1], perm[1:]
    labels = connected_components(ei, ej, n)
    assert labels.unique().tolist() == [0]


def test_clusters_join_close_singular_values():
    s = torch.tensor([5.0, 4.0, 3.9999, 2.0, 1.0])
    c = torch.full((5, 5), 1e-3)
    labels, m = clusters(c, s, tau=0.5)
    # 1e-3 / (1e-4 + 1e-6) ~ 9.9 > 0.5 joins directions 1 and 2 only.
    assert labels.tolist() == [0, 1, 1, 2, 3] and m == 4


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
@pytest.mark.parametrize("variant", ["casa", "restoration_only", "arbitration_only"])
def test_casa_matches_plain_reference_with_full_bases(shape, variant):
    m, n = shape
    ws, df, b, a = make_layer(m, n, seed=m + n)
    u, s, v = full_bases(ws)
    cl = (u.T @ b) @ (a @ v)
    cf = u.T @ df @ v
    params = CasaParams(tau=0.5, q_dom=0.5, q_act=0.85, energy=0.9)
    flags = dict(casa=(True, True), restoration_only=(True, False), arbitration_only=(False, True))[variant]
    from dataclasses import replace

    got, routing = casa_update(cl.float(), cf.float(), s.float(), m == n, replace(params, restore=flags[0], arbitrate=flags[1]))
    exp, info = plain_casa(cl, cf, s, m == n, 0.5, 0.5, 0.85, 0.9, *flags)
    assert routing.k == info["k"]
    assert routing.labels.tolist() == info["labels"].tolist()
    assert torch.equal(routing.dominance.mask(), torch.from_numpy(info["D"]))
    if flags[1]:
        assert torch.equal(routing.arbitrated_mask, torch.from_numpy(info["arb"]))
        assert info["arb"].any(), "the case must exercise arbitration"
    np.testing.assert_allclose(got.double().numpy(), exp, rtol=1e-4, atol=1e-6)


def test_restoration_and_arbitration_properties_in_weight_space():
    """W_t + dCASA seen in the source's coordinates: source + LoRA outside D, stronger inside."""
    m = n = 32
    ws, df, b, a = make_layer(m, n, seed=7)
    wt = ws + df
    basis = L.compute_basis("x", ws.float())
    drift = L.compute_drift(basis, df.float())
    coords = L.coordinates(basis, drift, b.float(), a.float())
    upd = casa_layer(coords, CasaParams())
    dcasa = coords.to_dense(upd.c).double()
    u, v = basis.U.double(), basis.V.double()
    eff = u.T @ (wt + dcasa - ws) @ v  # target's effective routing relative to the source
    cl = u.T @ (b @ a) @ v
    cf = u.T @ df @ v
    d = upd.routing.dominance.mask()
    arb = upd.routing.arbitrated_mask
    assert (~d).any() and arb.any()
    torch.testing.assert_close(eff[~d], cl[~d], rtol=0, atol=2e-5)
    stronger = torch.where(cl.abs() > cf.abs(), cl, cf)
    torch.testing.assert_close(eff[arb], stronger[arb], rtol=0, atol=2e-5)
    keep = d & ~arb  # inside D and not arbitrated: the LoRA is added on top of the target
    torch.testing.assert_close(eff[keep], (cl + cf)[keep], rtol=0, atol=2e-5)


def test_sign_flip_invariance():
    m, n = 28, 28
    ws, df, b, a = make_layer(m, n, seed=11)
    basis = L.compute_basis("x", ws.float())
    flipped = L.LayerBasis("x", basis.shape, basis.U.clone(), basis.S, basis.V.clone())
    for i in (0, 3, 5, 17):
        flipped.U[:, i] *= -1
        flipped.V[:, i] *= -1
    outs = []
    for bs in (basis, flipped):
        dr = L.compute_drift(bs, df.float())
        co = L.coordinates(bs, dr, b.float(), a.float())
        outs.append(co.to_dense(casa_layer(co, CasaParams()).c))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_compact_completion_equals_full_bases_for_restoration(shape):
    """Without arbitration the completion does not matter: compact == reference full bases."""
    m, n = shape
    ws, df, b, a = make_layer(m, n, seed=5)
    p = CasaParams(arbitrate=False)
    basis = L.compute_basis("x", ws.float())
    drift = L.compute_drift(basis, df.float())
    co = L.coordinates(basis, drift, b.float(), a.float())
    compact = co.to_dense(casa_layer(co, p, "restoration_only").c).double()
    u, s, v = full_bases(ws)
    cl = (u.T @ b) @ (a @ v)
    cf = u.T @ df @ v
    new, _ = casa_update(cl, cf, s, False, p)
    full = u @ new @ v.T
    torch.testing.assert_close(compact, full, rtol=0, atol=1e-5)


def test_compact_coordinates_represent_lora_and_drift_exactly():
    m, n = 60, 20
    ws, df, b, a = make_layer(m, n, seed=9, lora_rank=4)
    basis = L.compute_basis("x", ws.float())
    drift = L.compute_drift(basis, df.float())
    co = L.coordinates(basis, drift, b.float(), a.float())
    torch.testing.assert_close(co.to_dense(co.c_l()).double(), b @ a, rtol=0, atol=1e-5)
    torch.testing.assert_close(co.to_dense(co.c_f()).double(), df, rtol=0, atol=1e-5)
    # the complement rows are orthogonal to U
    assert co.rows == n + drift.complement.size + co.q3.shape[1]


def test_rank_deficient_drift_uses_explicit_complement():
    m, n = 50, 20
    ws, _, b, a = make_layer(m, n, seed=4)
    g = torch.Generator().manual_seed(0)
    df = torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64) * 0.01
    basis = L.compute_basis("x", ws.float())
    drift = L.compute_drift(basis, df.float())
    assert drift.complement.size <= 2  # the rank-revealing path, not a full QR
    co = L.coordinates(basis, drift, b.float(), a.float())
    torch.testing.assert_close(co.to_dense(co.c_f()).double(), df, rtol=0, atol=1e-6)
    torch.testing.assert_close(co.to_dense(co.c_l()).double(), b @ a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(20, 20), (30, 12)])
def test_prolora_against_explicit_projectors(shape):
    m, n = shape
    ws, df, b, a = make_layer(m, n, seed=21)
    wt = ws + df
    energy = 0.9
    dl = b @ a
    us, ss, vsh = np.linalg.svd(ws.numpy(), full_matrices=True)
    ut, st, vth = np.linalg.svd(wt.numpy(), full_matrices=True)
    k = plain_k(ss, True, energy)

    def proj(x):
        return x @ x.T

    Pus, Put = proj(us[:, :k]), proj(ut[:, :k])
    Pvs, Pvt = proj(vsh[:k].T), proj(vth[:k].T)
    Im, In = np.eye(m), np.eye(n)
    expect = Put @ Pus @ dl.numpy() @ Pvs @ Pvt + (Im - Put) @ (Im - Pus) @ dl.numpy() @ (In - Pvs) @ (In - Pvt)
    basis = L.compute_basis("x", ws.float())
    drift = L.compute_drift(basis, df.float())
    co = L.coordinates(basis, drift, b.float(), a.float())
    upd = prolora_layer(co, CasaParams(energy=energy))
    got = co.to_dense(upd.dense()).double().numpy()
    np.testing.assert_allclose(got, expect, atol=2e-5)
    phi = np.linalg.norm(us[:, :k].T @ ut[:, :k]) ** 2 / k
    assert abs(upd.stats.phi_left - phi) < 1e-4


def test_routing_summary_group_sums_match_plain_sums():
    from casa_core.routing_data import routing_summary

    m = n = 40
    ws, df, b, a = make_layer(m, n, seed=13)
    u, s, v = full_bases(ws)
    cl, cf = ((u.T @ b) @ (a @ v)).float(), (u.T @ df @ v).float()
    _, routing = casa_update(cl, cf, s.float(), True, CasaParams())
    summ = routing_summary(cl, cf, routing, max_groups=4)
    g = summ.count.shape[0]
    assert g <= 5  # at most 4 groups + the one beyond k
    assert float(summ.count.sum()) == m * n
    assert abs(float(summ.drift_energy.sum()) - float((cf.double() ** 2).sum())) < 1e-6 * float((cf.double() ** 2).sum())
    assert float(summ.restored.sum()) == float((~routing.dominance.mask()).sum())
    assert float(summ.arbitrated.sum()) == float(routing.arbitrated_mask.sum())
    # the beyond-k group holds exactly the rows and columns at or after k
    k = routing.k
    assert float(summ.count[-1, -1]) == (m - k) * (n - k)


@pytest.mark.parametrize("shape", [(30, 30), (36, 12)])
def test_parity_entry_point_with_reference_inputs(shape):
    """casa_full_bases takes the reference code's inputs (B, A, U, S, Vh, C_F)."""
    from casa_core.methods.casa import casa_full_bases

    m, n = shape
    ws, df, b, a = make_layer(m, n, seed=17)
    u, s, v = full_bases(ws)
    cf = u.T @ df @ v
    got, stats = casa_full_bases(b.float(), a.float(), u.float(), s.float(), v.T.float(), cf.float())
    exp, info = plain_casa((u.T @ b) @ (a @ v), cf, s, m == n, 0.5, 0.5, 0.85, 0.9)
    assert stats.k == info["k"] and stats.arbitrated_entries == int(info["arb"].sum())
    np.testing.assert_allclose(got.double().numpy(), exp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["spread", "ties", "heavy tail", "sample misleads"])
def test_arbitration_threshold_order_statistics_are_exact_at_any_size(kind):
    """``exact_quantile`` (the ``q_act`` threshold) against numpy's sort and quantile, on sizes where
    the windowed selection runs (above ``SELECT_DIRECT``) and below it; "sample misleads": every value
    the strided sample sees is an outlier, so the window misses and the plain selection must take over."""
    from casa_core import linalg

    g = torch.Generator().manual_seed(7)
    for n in (5, 1000, linalg.SELECT_DIRECT + 1, 3 * linalg.SELECT_DIRECT + 17):
        if kind == "spread":
            x = torch.randn(n, generator=g)
        elif kind == "ties":
            x = torch.randint(0, 5, (n,), generator=g).float()
        elif kind == "heavy tail":
            x = torch.randn(n, generator=g).abs() ** 8
        else:
            x = torch.rand(n, generator=g)
            if n > linalg.SELECT_DIRECT:
                x[:: n // linalg.SELECT_SAMPLE] = 1e6
        xs = np.sort(x.numpy())
        for rank in sorted({0, 1, n // 3, (17 * n) // 20, n - 2, n - 1} - {-1}):
            got = linalg.order_statistic(x, rank)
            assert float(got) == float(xs[rank]), (n, kind, rank)
        for q in (0.0, 0.5, 0.85, 0.999, 1.0):
            want = np.quantile(x.numpy().astype(np.float64), q)
            got = float(linalg.exact_quantile(x, q))
            assert got == pytest.approx(want, rel=1e-6, abs=1e-30), (n, kind, q)


@pytest.mark.parametrize("n_rows, n_cols", [(40, 6), (5, 50)])  # few dominant columns / few other rows
def test_dominant_blocks_are_read_and_written_as_by_advanced_indexing(n_rows, n_cols):
    """Either way round (columns first or rows first), the blocks read are ``c[r][:, j]`` and writing them
    back changes exactly those entries."""
    from casa_core.routing import _dominant_blocks, _put_blocks

    g = torch.Generator().manual_seed(3)
    c = torch.randn(64, 60, generator=g)
    r = torch.sort(torch.randperm(64, generator=g)[:n_rows]).values
    j = torch.sort(torch.randperm(60, generator=g)[:n_cols]).values
    dom = torch.sort(torch.randperm(64, generator=g)[:7]).values
    blocks = [(dom, None), (r, j)]
    got = _dominant_blocks(c, blocks)
    assert torch.equal(got[0], c[dom]) and torch.equal(got[1], c[r][:, j])
    target = c.clone()
    values = [torch.full_like(got[0], 7.0), -torch.arange(got[1].numel(), dtype=c.dtype).reshape(got[1].shape)]
    _put_blocks(target, blocks, values)
    want = c.clone()
    want[dom] = values[0]
    want[r[:, None], j[None, :]] = values[1]
    assert torch.equal(target, want)
