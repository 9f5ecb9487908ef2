"""ComfyUI nodes (V3 API): thin adapters between ComfyUI types and ``casa_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .basis_node import CASALoadSourceBasis
from .drift_node import CASAComputeDrift
from .heatmap_node import CASARoutingHeatmap
from .save_node import CASASaveLoRA
from .transfer_node import CASATransferLoRA

NODES: list[type[io.ComfyNode]] = [
    CASALoadSourceBasis,
    CASAComputeDrift,
    CASATransferLoRA,
    CASASaveLoRA,
    CASARoutingHeatmap,
]


class CasaLoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CasaLoraExtension:
    return CasaLoraExtension()
