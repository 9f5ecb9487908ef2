"""The CPU thread count of the per-layer kernels (casa_core.linalg.layer_threads, _lapack_threads)."""
from __future__ import annotations

import torch

from casa_core import linalg


def _inside(ctx) -> int:
    with ctx:
        return torch.get_num_threads()


def test_small_layer_on_a_small_machine_runs_on_one_thread_and_restores(monkeypatch):
    monkeypatch.setattr(linalg.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _inside(linalg.layer_threads(1536 * 1536)) == 1
        assert torch.get_num_threads() == 2
        # a 14B-sized layer, another device, a large machine: the pool is left alone
        assert _inside(linalg.layer_threads(5120 * 5120)) == 2
        assert _inside(linalg.layer_threads(1536 * 1536, "meta")) == 2
        monkeypatch.setattr(linalg.os, "cpu_count", lambda: 16)
        assert _inside(linalg.layer_threads(1536 * 1536)) == 2
    finally:
        torch.set_num_threads(before)


def test_thin_factorisations_run_on_one_thread_and_restore():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _inside(linalg._lapack_threads(torch.zeros(3000, 144))) == 1
        assert _inside(linalg._lapack_threads(torch.zeros(1024, 1024))) == 2
        assert torch.get_num_threads() == 2
        # the factorisations give what torch's do
        a = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
        q, r = linalg.qr(a)
        assert torch.allclose(q @ r, a, atol=1e-5)
        u, s, vh = linalg.svd(a)
        assert torch.allclose((u * s) @ vh, a, atol=1e-5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
