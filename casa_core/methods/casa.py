"""CASA and its ablations on one layer (docs/algorithm.md, "CASA, step by step")."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..layer import Coordinates
from ..routing import CasaParams, RoutingStats, casa_update
from ..routing_data import routing_summary
from .base import CoordUpdate

VARIANTS = {
    "casa": dict(restore=True, arbitrate=True),
    "restoration_only": dict(restore=True, arbitrate=False),
    "arbitration_only": dict(restore=False, arbitrate=True),
}


def casa_layer(
    coords: Coordinates, params: CasaParams, variant: str = "casa", summary: bool = False
) -> CoordUpdate:
    """``C_new`` for one layer; with ``summary`` also the cluster-level routing data.

    Non-square layers: the complement rows are arbitrated as the expectation over random
    completions of ``U`` (``complement_dim = M - N``, see :mod:`casa_core.completion`); square
    layers exactly as the reference."""
    p = replace(params, **VARIANTS[variant])
    c_l, c_f = coords.c_l(), coords.c_f()
    b = coords.basis
    comp_dim = None if b.square else b.tall_shape[0] - b.tall_shape[1]
    c_new, routing = casa_update(c_l, c_f, b.S, b.square, p, complement_dim=comp_dim)
    upd = CoordUpdate(c=c_new, stats=routing.stats, routing=routing)
    if summary:
        upd.summary = routing_summary(c_l, c_f, routing)
    return upd


def casa_full_bases(
    up: torch.Tensor,
    down: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    c_f: torch.Tensor,
    params: CasaParams = CasaParams(),  # noqa: B008  (frozen dataclass: an immutable default)
    variant: str = "casa",
) -> tuple[torch.Tensor, RoutingStats]:
    """CASA with the reference code's inputs: full bases ``U (m x m)``, ``S``, ``Vh (n x n)``,
    the drift's routing ``C_F = U^T dF V`` and the LoRA factors (``up`` carrying any scale).

    Returns ``C_new`` (the routing update, ``dCASA = U C_new Vh``) and the layer's :class:`RoutingStats`.
    This is the parity path: no completion of our own is involved.
    """
    c_l = (u.T @ up) @ (down @ vh.T)
    square = c_l.shape[0] == c_l.shape[1]
    c_new, routing = casa_update(c_l, c_f, s, square, replace(params, **VARIANTS[variant]))
    return c_new, routing.stats
