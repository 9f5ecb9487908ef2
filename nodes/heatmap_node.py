"""CASARoutingHeatmap: what CASA saw and decided on one layer, as a picture."""
from __future__ import annotations

import numpy as np
import torch

from comfy_api.latest import io, ui

from ..casa_core.render import layer_heatmap
from .common import CATEGORY, ReportType


def pick_layer(report, layer: str) -> str:
    summaries = report.summaries
    if not summaries:
        raise ValueError("this report has no routing data: heatmaps exist for the CASA methods only")
    layer = (layer or "auto").strip()
    if layer == "auto":
        return max(summaries, key=lambda k: float(summaries[k]["arbitrated"].sum() / summaries[k]["count"].sum()))
    if layer not in summaries:
        raise ValueError(f"layer {layer!r} is not in the report; e.g. {next(iter(summaries))}")
    return layer


class CASARoutingHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASARoutingHeatmap",
            display_name="CASA Routing Heatmap",
            category=CATEGORY,
            description="Shows, for one layer, where the distilled model and the LoRA route energy, how "
                        "aligned they are, and which regions CASA restored, preserved or arbitrated.",
            inputs=[
                ReportType.Input("report", tooltip="From CASA Transfer LoRA (a CASA method)."),
                io.String.Input("layer", default="auto",
                                tooltip="Layer to show, e.g. blocks.0.self_attn.q; 'auto' picks the layer "
                                "with the most arbitration."),
            ],
            outputs=[io.Image.Output(display_name="image")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, layer) -> io.NodeOutput:
        name = pick_layer(report, layer)
        rgb = layer_heatmap(report.summaries[name])
        img = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255.0)[None]
        return io.NodeOutput(img, ui=ui.PreviewImage(img, cls=cls))
