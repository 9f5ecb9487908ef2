"""CASA and its ablations on one layer (algorithm.md, "CASA, step by step")."""
from __future__ import annotations

from dataclasses import replace

from ..layer import Coordinates
from ..routing import CasaParams, casa_update
from .base import CoordUpdate

VARIANTS = {
    "casa": dict(restore=True, arbitrate=True),
    "restoration_only": dict(restore=True, arbitrate=False),
    "arbitration_only": dict(restore=False, arbitrate=True),
}


def casa_layer(coords: Coordinates, params: CasaParams, variant: str = "casa") -> CoordUpdate:
    p = replace(params, **VARIANTS[variant])
    c_new, routing = casa_update(coords.c_l(), coords.c_f(), coords.basis.S, coords.basis.square, p)
    return CoordUpdate(c=c_new, stats=dict(routing.stats), routing=routing)
