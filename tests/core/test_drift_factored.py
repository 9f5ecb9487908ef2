"""A separated drift is exactly low rank: its coordinates from the factors equal those of the dense product."""
from __future__ import annotations

import pytest
import torch

from casa_core import layer as L
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.safetensors_io import write_file
from casa_core.quantnoise import EDGE_MARGIN, separate_drift, separate_drift_parts


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _basis(w, refine):
    b = L.compute_basis("x", w)
    if not refine:
        return b
    # as read back from a float16 cache: nearly orthonormal, coordinates refined
    return L.LayerBasis("x", b.shape, b.U.half().float(), b.S, b.V.half().float(), refine=True)


@pytest.mark.parametrize("shape", [(96, 96), (160, 96), (96, 160)])
@pytest.mark.parametrize("refine", [False, True])
def test_factored_drift_coordinates_equal_the_dense_ones(shape, refine):
    g = torch.Generator().manual_seed(11)
    m, n = shape
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    left = torch.randn(m, 6, generator=g, dtype=torch.float64) * 1e-3
    right = torch.randn(6, n, generator=g, dtype=torch.float64)
    b = _basis(w.float(), refine)
    dense = L.compute_drift(b, (left @ right).float())
    fact = L.compute_drift_factored(b, left.float(), right.float())
    assert _rel(fact.c_f, dense.c_f) < 1e-5
    # both rebuild the drift, and the product itself, to float32 rounding (float64 reference written out)
    truth = (left @ right).float()
    assert _rel(L.drift_dense(b, fact), truth) < (2e-3 if refine else 1e-5)
    assert _rel(L.drift_dense(b, fact), L.drift_dense(b, dense)) < 1e-5
    if m == n:
        assert fact.complement is None
    else:
        # the part outside span(U): rank 6 at most, the same matrix as the dense path's complement
        comp = fact.complement
        assert comp.size <= 6 and comp.q.shape == (max(m, n), comp.size)
        eye = torch.eye(comp.size)
        assert float((comp.q.T @ comp.q - eye).abs().max()) < 1e-5
        dc = dense.complement
        assert _rel(comp.q @ comp.c_f, dc.q @ dc.c_f) < 1e-4


@pytest.mark.parametrize("shape", [(384, 128), (128, 384)])
def test_a_separated_fp8_drift_is_stored_with_a_complement_of_its_rank(tmp_path, shape):
    """An fp8 target of a tall layer: the drift cache holds a complement of the separated drift's rank (not
    the layer's width), and its coordinates are those of the dense estimate."""
    g = torch.Generator().manual_seed(5)
    m, n = shape
    ws = (torch.randn(m, n, generator=g) * 0.02).bfloat16().float()
    d = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
    d *= 0.015 * float(ws.norm() / d.norm())
    wt = ws + d
    write_file(tmp_path / "base.safetensors", {"blocks.0.ffn.0.weight": ws.bfloat16()})
    write_file(tmp_path / "fp8.safetensors", {"blocks.0.ffn.0.weight": wt.to(torch.float8_e4m3fn)})
    src, tgt = Checkpoint(tmp_path / "base.safetensors"), Checkpoint(tmp_path / "fp8.safetensors")
    basis = load_or_build_basis(src, tmp_path / "cache")
    drift = load_or_build_drift(basis, WeightDifference(src, tgt), tmp_path / "cache")
    name = "blocks.0.ffn.0"
    layer = drift.layer(name, basis.layer(name))
    noise = drift.info[name]["noise"]
    assert noise["method"] == "consistent low-rank" and noise["residual_kept"] == 0.0, noise
    assert layer.complement is not None and layer.complement.size <= noise["rank"] < min(m, n)
    # the same estimate, dense, through the dense path
    q = wt.to(torch.float8_e4m3fn).float()
    from casa_core.quantnoise import StorageGrid

    grid = StorageGrid.fp8(torch.float8_e4m3fn)
    lo, hi, var = grid.cells_and_variance(q)
    # the margin the drift build uses on a coarse grid
    est, _ = separate_drift(q - ws, lo, hi, var, margin=EDGE_MARGIN)
    parts, _ = separate_drift_parts(q - ws, lo, hi, var, margin=EDGE_MARGIN)
    assert parts.residual is None and torch.allclose(parts.dense(), est)
    dense = L.compute_drift(basis.layer(name), est)
    b = basis.layer(name)
    assert _rel(L.drift_dense(b, layer), L.drift_dense(b, dense)) < 2e-3  # float16 basis and Q2 storage
