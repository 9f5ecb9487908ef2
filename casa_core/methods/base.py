"""What a method returns for one layer."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..routing import Routing, RoutingStats
    from ..routing_data import RoutingSummary


@dataclass(frozen=True)
class ProLoRAStats:
    """ProLoRA's figures on one layer: ``k`` (the leading subspace, by the energy threshold) and the
    subspace similarities ``Phi`` of the source's and the target's leading left / right directions."""

    k: int
    phi_left: float
    phi_right: float

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "ProLoRAStats":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class CoordUpdate:
    """A layer's update in routing coordinates: dense ``c`` (R x N) or ``left @ right``."""

    c: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    stats: RoutingStats | ProLoRAStats | None = None
    routing: Routing | None = None  # for reports and heatmaps
    summary: RoutingSummary | None = None  # for heatmaps

    def dense(self) -> torch.Tensor:
        return self.c if self.c is not None else self.left @ self.right
