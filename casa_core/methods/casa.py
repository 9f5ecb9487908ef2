"""CASA and its ablations on one layer (algorithm.md, "CASA, step by step")."""
from __future__ import annotations

from dataclasses import replace

from ..layer import Coordinates
from ..routing import CasaParams, casa_update
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
    """``C_new`` for one layer; with ``summary`` also the cluster-level routing data."""
    p = replace(params, **VARIANTS[variant])
    c_l, c_f = coords.c_l(), coords.c_f()
    c_new, routing = casa_update(c_l, c_f, coords.basis.S, coords.basis.square, p)
    upd = CoordUpdate(c=c_new, stats=dict(routing.stats), routing=routing)
    if summary:
        upd.summary = routing_summary(c_l, c_f, routing)
    return upd
