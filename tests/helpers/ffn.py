"""FFN-shaped test layers and the reference's behaviour over random valid completions of ``U``.

Plain full-basis code: the reference code's inputs are full bases ``U (M x M)``, ``S``, ``V`` and
``C_F = U^T dF V``; here ``U``'s completion beyond ``span(W)`` is drawn uniformly at random
(Haar) instead of taking LAPACK's, and the routing runs on full ``M x N`` matrices through
``casa_full_bases`` (itself checked against ``plain.py`` in test_routing.py).  Nothing here uses
the compact completion of ``casa_core.layer``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from casa_core.methods.casa import casa_full_bases
from casa_core.routing import CasaParams, RoutingStats

DEFAULTS = CasaParams()


@dataclass
class FFNLayer:
    ws: torch.Tensor  # out x in, float64
    df: torch.Tensor  # W_t - W_s
    up: torch.Tensor  # LoRA up (scale included)
    down: torch.Tensor


def make_ffn_layer(m: int, n: int, seed: int, *, rel_drift: float = 1e-2, drift_spread: float = 0.8,
                   lora_rel: float = 0.02, lora_generic: float = 3.0, rank: int = 16, head: int = 16) -> FFNLayer:
    """A layer with a spectrum like trained weights: a Marchenko-Pastur bulk (a random matrix's
    singular values, so neighbouring values are close) under a slowly decaying envelope, a few
    spikes, and some pairs within 0.1 %.  The drift rotates the head directions and spreads
    ``drift_spread`` of itself over all directions (so it has a complement part); the LoRA has a
    head part and a generic part ``lora_generic`` times as large (a trained LoRA's ``B`` is a
    generic vector of the ``M``-dimensional output space, mostly outside ``span(W)``)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    bulk = torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)) / math.sqrt(max(m, n))
    s = bulk * torch.arange(1, r + 1, dtype=torch.float64) ** -0.3
    s[:4] += torch.tensor([3.0, 2.0, 1.5, 1.2], dtype=torch.float64) * float(s[0])
    s = torch.sort(s, descending=True).values
    for i in range(6, r - 1, max(r // 8, 2)):
        s[i + 1] = s[i] * (1 - 1e-3)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    ws = (u * s) @ v.T
    h = min(head, r)
    rot = u[:, :h] @ torch.randn(h, h, generator=g, dtype=torch.float64) @ v[:, :h].T
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    delta = (1 - drift_spread) * rot / rot.norm() + drift_spread * noise / noise.norm()
    df = rel_drift * float(ws.norm()) * delta / delta.norm()
    hh = min(rank // 2, r)
    b = u[:, :hh] @ torch.randn(hh, rank, generator=g, dtype=torch.float64)
    b = b / b.norm() + lora_generic * torch.randn(m, rank, generator=g, dtype=torch.float64) / math.sqrt(m * rank)
    a = torch.randn(rank, hh, generator=g, dtype=torch.float64) @ v[:, :hh].T
    a = a / a.norm() + lora_generic * torch.randn(rank, n, generator=g, dtype=torch.float64) / math.sqrt(n * rank)
    b = b * (lora_rel * float(s.norm()) / float((b @ a).norm()))
    return FFNLayer(ws, df, b, a)


def full_svd(w: torch.Tensor):
    """LAPACK's full SVD in tall orientation: ``U (M x M)``, ``S``, ``V (N x N)``."""
    u, s, vh = np.linalg.svd(w.numpy(), full_matrices=True)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh.T.copy())


def random_completion(u_thin: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[U | W]`` with ``W`` a uniformly random orthonormal basis of ``span(U)``'s complement."""
    m, n = u_thin.shape
    x = torch.randn(m, m - n, generator=gen, dtype=torch.float64)
    x = x - u_thin @ (u_thin.T @ x)
    x = x - u_thin @ (u_thin.T @ x)  # twice: orthogonal to U to rounding
    q, r = torch.linalg.qr(x)
    q = q * torch.sign(torch.diagonal(r))[None, :]  # Haar: fix QR's sign convention
    return torch.cat([u_thin, q], dim=1)


@dataclass
class Transfer:
    update: torch.Tensor  # dCASA, out x in, float64
    stats: RoutingStats


def reference_transfer(layer: FFNLayer, u_full: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                       params: CasaParams = DEFAULTS, variant: str = "casa") -> Transfer:
    """The reference's CASA with the full bases ``u_full``, ``s``, ``v`` (tall orientation)."""
    wide = layer.ws.shape[0] < layer.ws.shape[1]
    df = layer.df.T if wide else layer.df
    up, down = (layer.down.T, layer.up.T) if wide else (layer.up, layer.down)
    c_f = u_full.T @ df @ v
    c_new, stats = casa_full_bases(up.float(), down.float(), u_full.float(), s.float(), v.T.float(),
                                   c_f.float(), params, variant)
    upd = u_full @ c_new.double() @ v.T
    return Transfer(upd.T if wide else upd, stats)


def reference_spread(layer: FFNLayer, completions: int, seed: int, params: CasaParams = DEFAULTS,
                     variant: str = "casa") -> tuple[Transfer, list[Transfer]]:
    """The reference with LAPACK's completion, and with ``completions`` random valid ones."""
    wide = layer.ws.shape[0] < layer.ws.shape[1]
    u, s, v = full_svd(layer.ws.T if wide else layer.ws)
    lapack = reference_transfer(layer, u, s, v, params, variant)
    gen = torch.Generator().manual_seed(seed)
    n = s.numel()
    randoms = [reference_transfer(layer, random_completion(u[:, :n], gen), s, v, params, variant)
               for _ in range(completions)]
    return lapack, randoms


@dataclass
class Spread:
    """``ours`` against the random-completion references, distances relative to their mean's norm."""

    ours_to_mean: float
    refs_to_mean: list[float]
    refs_leave_one_out: list[float]  # each reference to the mean of the others
    arbitrated_refs: list[int]
    candidates_refs: list[int]


def spread(ours: torch.Tensor, refs: list[Transfer]) -> Spread:
    k = len(refs)
    total = sum(r.update for r in refs)
    mean = total / k
    norm = float(mean.norm())
    loo = [float((r.update - (total - r.update) / (k - 1)).norm()) / norm for r in refs]
    return Spread(
        float((ours - mean).norm()) / norm,
        [float((r.update - mean).norm()) / norm for r in refs],
        loo,
        [int(r.stats.arbitrated_entries) for r in refs],
        [int(r.stats.candidates) for r in refs],
    )
