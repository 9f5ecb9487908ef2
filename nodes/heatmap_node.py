"""CASARoutingHeatmap: what CASA saw and decided on one layer (or the whole model), as a picture.

The picture is the node's IMAGE output and its preview.  The ``ui`` output also carries, under
``casa_heatmap``, what the web extension (``web/casa_heatmap.js``) needs: the report's layers
(block, projection) for its layer picker, the layer shown, and the picture's geometry and cell
values for its hover read-out.  Picking a layer there sets the ``layer`` widget and queues only
this node (ComfyUI's partial execution): the transfer upstream is cached, so only the picture is
redrawn.
"""
from __future__ import annotations

import numpy as np
import torch

from comfy_api.latest import io, ui

from ..casa_core.formats.keys import layer_of_model_key
from ..casa_core.pictures import auto_layer, fmt_share, layer_figure, layer_index, overview_figure
from .common import CATEGORY, ReportType, summary_ui

VIEWS = ["layer", "overview"]
UI_KEY = "casa_heatmap"
PAYLOAD_VERSION = 1


def _layer_stats(report) -> dict:
    """The report's layer -> casa_core LayerRecord (empty without a report)."""
    rep = getattr(report, "report", None)
    return dict(getattr(rep, "layers", {}) or {})


def pick_layer(report, layer: str) -> str:
    """The layer to show: ``auto`` (the most arbitrated one) or a name from the report."""
    summaries = report.summaries
    if not summaries:
        method = getattr(getattr(report, "report", None), "method", "?")
        raise ValueError(f"this report (method {method}) has no routing data: layer heatmaps exist for the CASA "
                         "methods only; set view to 'overview' for the per-layer statistics")
    layer = (layer or "").strip() or "auto"
    if layer == "auto":
        return auto_layer(_layer_stats(report), list(summaries)) or next(iter(summaries))
    if layer not in summaries:  # ComfyUI's key form: diffusion_model.<layer>.weight
        bare = layer_of_model_key(layer)
        if bare in summaries:
            layer = bare
    if layer not in summaries:
        names = list(summaries)
        close = [n for n in names if layer and layer in n][:3]
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {names[0]}"
        raise ValueError(f"layer {layer!r} is not in the report ({len(names)} layers with routing data); {hint}")
    return layer


def render(report, layer: str = "auto", view: str = "layer"):
    """(Figure, payload for the web extension)."""
    stats = _layer_stats(report)
    rep = getattr(report, "report", None)
    config = getattr(rep, "config", None)
    if view == "overview":
        if not stats:
            raise ValueError("this report has no per-layer statistics")
        selected = None
        if report.summaries:
            try:
                selected = pick_layer(report, layer)
            except ValueError:
                selected = None
        fig = overview_figure(stats, selected=selected,
                              title=f"CASA transfer overview: {getattr(report, 'lora_name', '')}".rstrip(": "))
        name = selected
    else:
        name = pick_layer(report, layer)
        fig = layer_figure(report.summaries[name], name, stats.get(name), config)
    meta = {key: v for key, v in fig.meta.items() if key != "texts"}
    layers = layer_index(stats or report.summaries)
    for row in layers:
        row["routing"] = row["name"] in report.summaries
    payload = {
        "version": PAYLOAD_VERSION,
        "summary": summary_text(fig.meta, view, name),
        "view": view,
        "layer": name,
        "requested": layer,
        "method": getattr(rep, "method", None),
        "lora": getattr(report, "lora_name", None),
        "layers": layers,
        "figure": meta,
    }
    return fig, payload


def summary_text(meta: dict, view: str, name: str | None) -> str:
    """What the picture says, in one or two lines (the node's summary)."""
    if view == "overview":
        t = meta.get("totals") or {}
        bits = [f"Overview of {t.get('layers', 0)} layers"]
        if t.get("arbitrated") is not None:
            bits.append(f"protected {fmt_share(t['dominant'])}, arbitrated {fmt_share(t['arbitrated'])} of the entries")
        most = (meta.get("interesting") or {}).get("arbitrated") or []
        if most:
            bits.append(f"most arbitrated: {most[0][0]}")
        return "; ".join(bits)
    t = meta["totals"]
    return (f"{name}: restored {fmt_share(t['restored'])}, preserved {fmt_share(t['preserved'])}, "
            f"arbitrated {fmt_share(t['arbitrated'])}\n{meta['verdict']}")


class CASARoutingHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASARoutingHeatmap",
            display_name="CASA Routing Heatmap",
            category=CATEGORY,
            description="Shows, for one layer, where the distilled model and the LoRA route energy, how "
                        "aligned they are, and which regions CASA restored, preserved or arbitrated; or, "
                        "for the whole model, which layers CASA intervened on most.",
            inputs=[
                ReportType.Input("report", tooltip="From CASA Transfer LoRA (layer view: a CASA method)."),
                io.String.Input("layer", default="auto",
                                tooltip="Layer to show, e.g. blocks.0.self_attn.q. Leave at 'auto' (the layer "
                                "where CASA settled the most overlaps between the LoRA and the distillation) and use "
                                "the pickers on the node: they set it for you."),
                io.Combo.Input("view", options=VIEWS, default="layer", optional=True,
                               tooltip="layer: the four routing maps of one layer. overview: per block and "
                               "projection, how much of the layer CASA protected, how many overlaps it settled and "
                               "how much of the update the patch keeps."),
            ],
            outputs=[io.Image.Output(display_name="image")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, layer, view="layer") -> io.NodeOutput:
        fig, payload = render(report, layer, view if view in VIEWS else "layer")
        img = torch.from_numpy(np.ascontiguousarray(fig.rgb)).float().div(255.0)[None]
        shown = ui.PreviewImage(img, cls=cls).as_dict()
        text = summary_ui("CASA Routing Heatmap", payload["summary"])
        return io.NodeOutput(img, ui={**shown, **text, UI_KEY: [payload]})
