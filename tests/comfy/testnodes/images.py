"""``CasaTestImageStats``: output node putting an IMAGE's shape, dtype, min, max, mean and finiteness into
its ui dict (``casa_image_stats``), so tests read an IMAGE output from /history without saving files."""
from __future__ import annotations

import torch

try:
    from comfy_api.v0_0_2 import io
except ImportError:  # pragma: no cover - older ComfyUI
    from comfy_api.latest import io


class CasaTestImageStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestImageStats",
            display_name="CASA test: image stats",
            category="testing/casa",
            inputs=[io.Image.Input("image")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        t = image.float()
        stats = {
            "shape": list(image.shape),
            "dtype": str(image.dtype).replace("torch.", ""),
            "min": float(t.min()),
            "max": float(t.max()),
            "mean": float(t.mean()),
            "finite": bool(torch.isfinite(t).all()),
        }
        return io.NodeOutput(ui={"casa_image_stats": [stats]})
