"""Pictures of what CASA saw and decided (numpy only; text from :mod:`casa_core.fonts`).

Modules: :mod:`.layer_figure` (one layer), :mod:`.overview` (the whole model), :mod:`.layout` (the
:class:`Figure`, sizes, cell grids, colour bars), :mod:`.ticks` (number formats, tick choice),
:mod:`.canvas` (raster canvas with text, colour maps) and :mod:`.png` (PNG files).

``layer_figure``: one layer at cluster level (its :class:`~casa_core.routing_data.RoutingSummary`),
four panels as in the CASA paper's Figures 5b, 6 and 7:

a. routing energy density of the distillation drift ``C_F`` and b. of the LoRA ``C_L`` (the RMS of
   the routing entries of each receiving x sending cluster-group block, one shared log colour scale);
c. directional alignment ``cos(C_L, C_F)`` of each block, diverging scale -1..1;
d. the CASA region map: every cell one flat colour, so the regions read as regions on every layer
   shape: restored (blue) where most of the cell's entries are outside the dominant region, else
   the dominant region's grey turning orange with the cell's share of arbitrated entries (full
   orange at the layer's most arbitrated cell); the exact shares are in the legend (the layer's)
   and in ``meta`` (each cell's, for the hover read-out).

The header gives a one-line verdict in plain words (:func:`layer_verdict`), the footer one line per
region saying what it means for the LoRA (:data:`REGION_MEANING`).

Strips along the axes mark the dominant clusters of the drift (receiving: left, sending: top).
Rows are receivers (output / left singular directions), columns senders (input / right singular
directions) of the layer as stored, ``out x in``: the routing data of a wide layer (``out < in``),
computed on its transpose, are transposed back when the layer's report record (its ``shape``) is
given.  Clusters are numbered from 1 in order of their leading singular value; ``>k`` is the group
of all directions beyond the leading subspace.

``overview_figure``: per block x projection, the share of dominant entries, the share of
arbitrated entries and the energy the injected update keeps (``1 - rel_error^2``), from a
report's per-layer records (:class:`~casa_core.report.LayerRecord`), to find the layers worth a closer look.

Both return a :class:`Figure`: the RGB picture and JSON-able ``meta`` (panel geometry, row and
column descriptions, the value of every cell, the colour bars, every string drawn) that the
ComfyUI widget uses for its hover read-out and tests use to check the picture's content.
"""
from __future__ import annotations

from .canvas import ORANGES, RDBU, VIRIDIS, Canvas, colormap, invert_colormap, text_h, text_w
from .layer_figure import (
    REGION_COLOURS,
    REGION_MEANING,
    VERDICTS,
    layer_data,
    layer_figure,
    layer_verdict,
    region_cell_colours,
    verdict_kind,
)
from .layout import Figure
from .overview import (
    PROJECTION_ORDER,
    auto_layer,
    interesting_layers,
    layer_index,
    layer_metrics,
    overview_figure,
    projection_key,
    split_layer_name,
)
from .png import decode_png, encode_png, read_png, write_png
from .ticks import fmt_sci, fmt_share, fmt_tick_share, log_range

__all__ = [
    "ORANGES", "PROJECTION_ORDER", "RDBU", "REGION_COLOURS", "REGION_MEANING", "VERDICTS", "VIRIDIS", "Canvas",
    "Figure", "auto_layer", "colormap", "decode_png", "encode_png", "fmt_sci", "fmt_share", "fmt_tick_share",
    "interesting_layers", "invert_colormap", "layer_data", "layer_figure", "layer_index", "layer_metrics",
    "layer_verdict", "log_range", "overview_figure", "projection_key", "read_png", "region_cell_colours",
    "split_layer_name", "text_h", "text_w", "verdict_kind", "write_png",
]
