"""The picture of the whole model: per block x projection, the share of dominant entries, the share of
arbitrated entries and the energy the injected update keeps, from a report's per-layer records
(:class:`casa_core.report.LayerRecord`), to find the layers worth a closer look; and the choice of
those layers."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..report import LayerRecord, layer_totals
from .canvas import GREY_TEXT, INK, MISSING, ORANGES, VIRIDIS, Canvas, colormap, text_h, text_w
from .layer_figure import layer_verdict
from .layout import Figure, Sizes, colorbar, edges, paint_cells, wrap
from .ticks import fmt_share, fmt_tick_share, grid_json, json_round, lin_ticks, nice_ceil, tick_step

PROJECTION_ORDER = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)
_BLOCK_RE = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``blocks.12.self_attn.q`` -> ``(12, "self_attn.q")``; other names -> ``(None, name)``."""
    m = _BLOCK_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def projection_key(p: str):
    return (PROJECTION_ORDER.index(p), "") if p in PROJECTION_ORDER else (len(PROJECTION_ORDER), p)


def layer_index(names) -> list[dict]:
    """``[{"name", "block", "projection"}]`` in block, then projection order (the widget's picker)."""
    rows = []
    for n in names:
        b, p = split_layer_name(n)
        rows.append({"name": n, "block": b, "projection": p})
    rows.sort(key=lambda r: (r["block"] is None, r["block"] if r["block"] is not None else 0,
                             projection_key(r["projection"]), r["name"]))
    return rows


def layer_metrics(record: LayerRecord | None) -> dict:
    """``dominant``, ``arbitrated`` (shares of entries, CASA methods only) and ``kept`` (1 - rel_error^2)
    of one layer; None where it has no such figure."""
    out = {"dominant": None, "arbitrated": None, "kept": None}
    if record is None:
        return out
    routed = record.routing
    if routed is not None and routed.entries:
        out["dominant"] = routed.dominant_entries / routed.entries
        out["arbitrated"] = routed.arbitrated_entries / routed.entries
    out["kept"] = max(0.0, 1.0 - float(record.rel_error) ** 2)
    return out


def interesting_layers(layers: dict[str, LayerRecord], n: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per metric, the ``n`` most telling layers: most arbitrated, largest dominant region, least energy kept."""
    met = {name: layer_metrics(s) for name, s in layers.items()}
    out = {}
    for key, reverse in (("arbitrated", True), ("dominant", True), ("kept", False)):
        vals = [(name, m[key]) for name, m in met.items() if m[key] is not None]
        vals.sort(key=lambda kv: (-kv[1] if reverse else kv[1]))
        out[key] = vals[:n]
    return out


def auto_layer(layers: dict[str, LayerRecord], candidates=None) -> str | None:
    """The layer a heatmap shows by default: the largest arbitrated share, then dominant share."""
    names = [n for n in (candidates if candidates is not None else layers) if n in layers] if layers else list(candidates or [])
    if not names:
        return None

    def key(name):
        m = layer_metrics(layers.get(name))
        return (m["arbitrated"] or 0.0, m["dominant"] or 0.0)

    return max(names, key=key)


def _totals(layers: dict[str, LayerRecord]) -> dict:
    t = layer_totals(layers)
    out = {"layers": t.layers, "kept": t.kept_energy}
    if t.dominant_share is not None:
        out["dominant"] = t.dominant_share
        out["arbitrated"] = t.arbitrated_share
    return out


OVERVIEW_PANELS = (
    ("dominant", "Protected (dominant) share"),
    ("arbitrated", "Arbitrated share"),
    ("kept", "Update kept by the patch"),
)


def _block_grid(layers: dict[str, LayerRecord]) -> tuple[list[str], list[str], list[list[str | None]]]:
    """Row labels (blocks, then ``other``), column labels (projections) and the layer in each cell."""
    index = layer_index(layers)
    blocks = sorted({r["block"] for r in index if r["block"] is not None})
    has_other = any(r["block"] is None for r in index)
    projs = sorted({r["projection"] for r in index}, key=projection_key)
    row_labels = [str(b) for b in blocks] + (["other"] if has_other else [])
    nr, nc = max(len(row_labels), 1), max(len(projs), 1)
    names = [[None] * nc for _ in range(nr)]
    for r in index:
        i = blocks.index(r["block"]) if r["block"] is not None else nr - 1
        names[i][projs.index(r["projection"])] = r["name"]
    return row_labels, projs, names


def _grid_metrics(layers: dict[str, LayerRecord], names: list[list[str | None]]) -> dict[str, np.ndarray]:
    nr, nc = len(names), len(names[0])
    metrics = {key: np.full((nr, nc), np.nan) for key in ("dominant", "arbitrated", "kept")}
    for i in range(nr):
        for j in range(nc):
            if names[i][j] is not None:
                for key, v in layer_metrics(layers[names[i][j]]).items():
                    if v is not None:
                        metrics[key][i, j] = v
    return metrics


def _subtitle(layers: dict[str, LayerRecord], tot: dict) -> str:
    sub_bits = [f"{len(layers)} layers"]
    if tot.get("dominant") is not None:
        sub_bits.append(f"protected (dominant) {fmt_share(tot['dominant'])} of the routing entries")
        sub_bits.append(f"arbitrated {fmt_share(tot['arbitrated'])}")
    if tot.get("kept") is not None:
        sub_bits.append(f"the low-rank patch keeps {fmt_share(tot['kept'])} of the update")
    return " \u00b7 ".join(sub_bits)


def _footnotes(picks: dict, selected: str | None) -> list[str]:
    lines = []
    labels = {"arbitrated": "most arbitrated", "dominant": "most protected", "kept": "least kept by the patch"}
    for key in ("arbitrated", "dominant", "kept"):
        if picks[key]:
            lines.append(f"{labels[key]}: " + ", ".join(f"{n} {fmt_share(v)}" for n, v in picks[key]))
    if selected:
        lines.append(f"outlined: {selected}")
    return lines


@dataclass
class _OverviewGrid:
    sz: Sizes
    row_labels: list[str]
    projs: list[str]
    ry: list[list[int]]
    cx: list[list[int]]
    H: int
    W: int
    row_ticks: list[int]
    left: int
    side_gap: int
    title_h: int
    PW: int
    PH: int
    gap: int


def _overview_grid(sz: Sizes, row_labels: list[str], projs: list[str], nr: int, nc: int) -> _OverviewGrid:
    scale = sz.s
    cw = int(max(10, min(22, math.floor(200 / nc))) * scale)
    ch = int(max(6, min(30, math.floor(520 / nr))) * scale)
    cx = edges(nc, cw, 0)
    ry = edges(nr, ch, 0)
    H, W = ry[-1][1], cx[-1][1]
    row_ticks = [i for i in range(nr) if nr <= 1 or tick_step(ch, text_h(sz.tick) * 0.9) == 1
                 or i % tick_step(ch, text_h(sz.tick) * 0.9) == 0 or row_labels[i] == "other"]
    ytick_w = max(text_w(lab, sz.tick) for lab in row_labels + ["00"]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    xlab_h = max(text_w(p, sz.tick) for p in projs) + sz.px(6) if projs else 0
    side_gap = sz.px(10)
    side_w = max(text_w(lab, sz.tick) for lab in ("100%", "12.5%")) + sz.px(12 + 10)
    left = ylab_w + ytick_w
    title_h = text_h(sz.panel_title) + sz.px(6)
    PW = max(left + W + side_gap + side_w, text_w(OVERVIEW_PANELS[2][1], sz.panel_title, True) + sz.px(8))
    PH = title_h + max(H + sz.px(4) + xlab_h, sz.px(150) + sz.px(4))
    return _OverviewGrid(sz, row_labels, projs, ry, cx, H, W, row_ticks, left, side_gap, title_h, PW, PH, sz.px(18))


def _draw_overview_panel(cv: Canvas, g: _OverviewGrid, px0: int, top: int, key: str, ptitle: str, anchors,
                         vlo: float, vhi: float, vals: np.ndarray, sel_cell, arb_top: float) -> tuple[dict, dict]:
    """One panel (cells, the outlined layer, ticks, colour bar); returns its ``meta`` panel and colour bar."""
    sz, ry, cx, H, W = g.sz, g.ry, g.cx, g.H, g.W
    hx, hy = px0 + g.left, top + g.title_h
    cv.text(px0, top, ptitle, sz.panel_title, INK, bold=True, tag=f"panel-title:{key}")
    col = colormap(anchors, (np.nan_to_num(vals, nan=0.0) - vlo) / (vhi - vlo))
    col[~np.isfinite(vals)] = MISSING
    cv.blit(hx, hy, paint_cells(col, ry, cx))
    if sel_cell is not None:
        a, b = ry[sel_cell[0]]
        c0, c1 = cx[sel_cell[1]]
        cv.frame(hx + c0, hy + a, c1 - c0, b - a, INK, max(1, sz.px(2)))
    for i in g.row_ticks:
        a, b = ry[i]
        cv.text(hx - sz.px(3), hy + (a + b) / 2, g.row_labels[i], sz.tick, INK, anchor="rm", tag="row-tick")
    for j, p in enumerate(g.projs):
        a, b = cx[j]
        cv.text(hx + (a + b) / 2, hy + H + sz.px(4), p, sz.tick, INK, anchor="mt", rotate=True, tag="col-tick")
    cv.text(px0, hy + H / 2, "block", sz.axis, INK, anchor="lm", rotate=True, tag="ylabel")
    sx = hx + W + g.side_gap
    if key == "arbitrated":
        ticks = [(f / arb_top, fmt_tick_share(f)) for f in lin_ticks(arb_top)]
    else:
        ticks = [(f, f"{int(round(f * 100))}%") for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    box = colorbar(cv, sx, hy, sz.px(12), max(H, sz.px(150)), anchors, ticks, sz)
    bar = {"panel": key, **box, "map": "oranges" if anchors is ORANGES else "viridis",
           "scale": "linear", "lo": vlo, "hi": vhi}
    panel = {"id": key, "title": ptitle, "x0": hx, "y0": hy, "w": W, "h": H,
             "x": [[hx + a, hx + b] for a, b in cx], "y": [[hy + a, hy + b] for a, b in ry]}
    return panel, bar


def overview_figure(layers: dict[str, LayerRecord], selected: str | None = None, title: str | None = None,
                    scale: float = 1.0) -> Figure:
    """Blocks x projections, three panels: dominant share, arbitrated share, energy kept."""
    sz = Sizes(scale)
    row_labels, projs, names = _block_grid(layers)
    nr, nc = len(names), len(names[0])
    metrics = _grid_metrics(layers, names)
    arb = metrics["arbitrated"]
    arb_hi = float(np.nanmax(arb)) if np.isfinite(arb).any() else 0.0
    arb_top = nice_ceil(arb_hi) if arb_hi > 0 else 0.01
    scales = {"dominant": (VIRIDIS, 0.0, 1.0), "arbitrated": (ORANGES, 0.0, arb_top), "kept": (VIRIDIS, 0.0, 1.0)}
    g = _overview_grid(sz, row_labels, projs, nr, nc)
    m = sz.margin
    FW = 2 * m + 3 * g.PW + 2 * g.gap
    tot = _totals(layers)
    sub = _subtitle(layers, tot)
    picks = interesting_layers(layers)
    foot = [ln for line in _footnotes(picks, selected) for ln in wrap(line, sz.note, FW - 2 * m)]
    header_h = text_h(sz.title) + sz.px(4) + text_h(sz.subtitle) + sz.px(14)
    footer_h = sz.px(8) + len(foot) * (text_h(sz.note) + sz.px(1))
    FH = m + header_h + g.PH + footer_h + m
    cv = Canvas(FW, FH)
    cv.text(m, m, title or "CASA transfer overview", sz.title, INK, bold=True, tag="title")
    cv.text(m, m + text_h(sz.title) + sz.px(4), sub, sz.subtitle, GREY_TEXT, tag="subtitle")
    top = m + header_h
    sel_cell = None
    if selected:
        for i in range(nr):
            for j in range(nc):
                if names[i][j] == selected:
                    sel_cell = (i, j)
    meta_panels, colorbars = [], []
    for pi, (key, ptitle) in enumerate(OVERVIEW_PANELS):
        anchors, vlo, vhi = scales[key]
        panel, bar = _draw_overview_panel(cv, g, m + pi * (g.PW + g.gap), top, key, ptitle, anchors, vlo, vhi,
                                          metrics[key], sel_cell, arb_top)
        colorbars.append(bar)
        meta_panels.append(panel)
    y = FH - m - len(foot) * (text_h(sz.note) + sz.px(1))
    for ln in foot:
        cv.text(m, y, ln, sz.note, GREY_TEXT, tag="note")
        y += text_h(sz.note) + sz.px(1)
    meta = {
        "kind": "overview", "layer": selected, "width": FW, "height": FH, "scale": scale,
        "panels": meta_panels, "colorbars": colorbars,
        "rows": [{"label": lab} for lab in row_labels], "cols": [{"label": p} for p in projs],
        "names": names, "values": {key: grid_json(v) for key, v in metrics.items()},
        "verdicts": [[layer_verdict(layers[n]) if n is not None else None for n in row] for row in names],
        "min_text_px": min(r["size"] for r in cv.texts),
        "totals": tot, "interesting": {k_: [[n, json_round(v)] for n, v in vs] for k_, vs in picks.items()},
        "texts": cv.texts,
    }
    return Figure(cv.rgb(), meta)
