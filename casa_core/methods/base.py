"""What a method returns for one layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CoordUpdate:
    """A layer's update in routing coordinates: dense ``c`` (R x N) or ``left @ right``."""

    c: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    routing: object | None = None  # casa_core.routing.Routing, for reports and heatmaps
    summary: dict | None = None  # casa_core.routing_data.routing_summary, for heatmaps

    def dense(self) -> torch.Tensor:
        return self.c if self.c is not None else self.left @ self.right
