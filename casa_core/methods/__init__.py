"""Transfer methods: each maps a layer's routing coordinates to an update.

``casa`` (restoration + arbitration), its ablations ``restoration_only`` and
``arbitration_only`` (paper Table 2), ``prolora`` (paper Table 3's baseline) and ``direct``
(the LoRA unchanged, what ComfyUI's loader does).
"""
from __future__ import annotations

from .base import CoordUpdate, ProLoRAStats
from .casa import casa_layer
from .prolora import prolora_layer

METHODS = ("casa", "restoration_only", "arbitration_only", "prolora", "direct")

METHOD_LABELS = {
    "casa": "CASA (restoration + arbitration)",
    "restoration_only": "CASA restoration only",
    "arbitration_only": "CASA arbitration only",
    "prolora": "ProLoRA",
    "direct": "Direct reuse",
}


def check_method(name: str) -> str:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown transfer method {name!r}; expected one of {', '.join(METHODS)}")
    return name


__all__ = ["CoordUpdate", "METHODS", "ProLoRAStats", "METHOD_LABELS", "casa_layer", "prolora_layer", "check_method"]
