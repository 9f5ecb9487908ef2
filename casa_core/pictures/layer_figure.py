"""The picture of one layer: what CASA saw and decided, at cluster level (data from
:mod:`casa_core.routing_data`), four panels as in the CASA paper's Figures 5b, 6 and 7 (see the package doc)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .canvas import GREY_TEXT, INK, MISSING, RDBU, VIRIDIS, Canvas, colormap, text_h, text_w
from .layout import Figure, Sizes, colorbar, edges, fit_label, paint_cells, wrap
from .ticks import fmt_sci, fmt_share, grid_json, log_range, log_t, log_ticks, ticks_shown

if TYPE_CHECKING:  # pragma: no cover
    from ..report import LayerRecord
    from ..routing_data import RoutingSummary

REGION_COLOURS = {
    "restored": (66, 133, 214),
    "preserved": (196, 196, 196),
    "arbitrated": (236, 112, 20),
}

#: what each region means for the user's LoRA, one line each (picture legend, widget, help pages)
REGION_MEANING = {
    "restored": "outside the distilled model's strong directions: its small changes there are undone "
                "and your LoRA applies as trained",
    "preserved": "inside its strong directions: the distilled model's change is kept and your LoRA is added on top",
    "arbitrated": "where your LoRA and the distillation push the same way hard: only the stronger of the two is kept",
}

DOM_LO, DOM_HI = np.array([236.0, 236.0, 236.0]), np.array([55.0, 55.0, 55.0])


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _transposed(record: LayerRecord | None) -> bool:
    return record is not None and record.shape[0] < record.shape[1]


def layer_data(summary: RoutingSummary, record: LayerRecord | None = None) -> dict:
    """Cell values and group descriptions of one layer, in the layer's own orientation (its report
    ``record`` gives the orientation and the layer's shares; without it the working orientation).

    Returns ``rows``/``cols`` (one dict per displayed group: ``label``, ``clusters`` [first, last]
    (1-based, None for ``>k``), ``dirs`` [first, last] singular index, ``n`` directions,
    ``dominant`` share), per-cell arrays ``drift_rms``, ``lora_rms``, ``cos`` (NaN without energy),
    ``restored``, ``preserved``, ``arbitrated`` (shares of the cell's entries), ``entries``, and the
    layer's totals.  Empty groups (the ``>k`` side of a non-square layer) are left out.
    """
    mats = {key: _np(getattr(summary, key))
            for key in ("drift_energy", "lora_energy", "dot", "count", "restored", "arbitrated")}
    labels = _np(summary.labels).astype(np.int64)
    cgroup = _np(summary.cluster_group).astype(np.int64)
    recv = _np(summary.recv_dominant)
    send = _np(summary.send_dominant)
    transposed = _transposed(record)
    if transposed:
        mats = {key: v.T.copy() for key, v in mats.items()}
        recv, send = send, recv
    k = int(labels.shape[0])
    n_clusters = int(cgroup.shape[0])
    g = mats["count"].shape[0]
    n_in = g - 1  # groups inside the leading subspace
    dir_group = cgroup[labels] if k else np.zeros(0, dtype=np.int64)
    sizes = np.bincount(dir_group, minlength=n_in).astype(np.float64)[:n_in]
    count = mats["count"]
    ref = int(np.argmax(sizes)) if n_in else None
    rows_beyond = int(round(count[g - 1, ref] / sizes[ref])) if ref is not None and sizes[ref] > 0 else int(count[g - 1].sum() > 0)
    cols_beyond = int(round(count[ref, g - 1] / sizes[ref])) if ref is not None and sizes[ref] > 0 else int(count[:, g - 1].sum() > 0)

    def groups(dominant: np.ndarray, beyond: int) -> tuple[list[dict], list[int]]:
        dom_dir = dominant[labels] if k else np.zeros(0)
        out, keep = [], []
        for a in range(n_in):
            members = np.nonzero(dir_group == a)[0]
            if members.size == 0:
                continue
            cl = np.nonzero(cgroup == a)[0]
            out.append({"label": str(len(out) + 1), "clusters": [int(cl.min()) + 1, int(cl.max()) + 1],
                        "n_clusters": int(cl.size), "dirs": [int(members.min()), int(members.max())],
                        "n": int(members.size), "dominant": float(dom_dir[members].mean())})
            keep.append(a)
        if beyond > 0:
            out.append({"label": ">k", "clusters": None, "n_clusters": 0, "dirs": [k, k + beyond - 1],
                        "n": beyond, "dominant": 0.0})
            keep.append(g - 1)
        return out, keep

    rows, rk = groups(recv, rows_beyond)
    cols, ck = groups(send, cols_beyond)
    sel = {key: v[np.ix_(rk, ck)] for key, v in mats.items()}
    cnt = np.maximum(sel["count"], 1.0)
    de, le, dot = sel["drift_energy"], sel["lora_energy"], sel["dot"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((de > 0) & (le > 0), dot / np.sqrt(np.maximum(de * le, 1e-300)), np.nan)
    cos = np.clip(cos, -1.0, 1.0)
    restored = sel["restored"] / cnt
    arbitrated = sel["arbitrated"] / cnt
    preserved = np.clip(1.0 - restored - arbitrated, 0.0, 1.0)
    total = float(mats["count"].sum())
    tot_rest = float(mats["restored"].sum()) / total if total else 0.0
    tot_arb = float(mats["arbitrated"].sum()) / total if total else 0.0
    routed = record.routing if record is not None else None
    if routed is not None and routed.entries:
        # the report's counts are the layer's figures (a non-square layer's complement is arbitrated in
        # expectation, and the report counts whole entries): the picture states the same shares
        tot_arb = routed.arbitrated_entries / routed.entries
        tot_rest = 1.0 - routed.dominant_entries / routed.entries
    return {
        "k": k, "n_clusters": n_clusters, "n_groups": n_in, "merged": n_clusters > n_in,
        "transposed": transposed, "rows": rows, "cols": cols,
        "drift_rms": np.sqrt(de / cnt), "lora_rms": np.sqrt(le / cnt), "cos": cos,
        "restored": restored, "preserved": preserved, "arbitrated": arbitrated, "entries": sel["count"],
        "totals": {"entries": int(round(total)), "restored": tot_rest, "arbitrated": tot_arb,
                   "preserved": max(0.0, 1.0 - tot_rest - tot_arb), "dominant": 1.0 - tot_rest},
    }


def region_cell_colours(restored: np.ndarray, arbitrated: np.ndarray) -> tuple[np.ndarray, float]:
    """One colour per cell (rows x cols x 3) and the arbitrated share that is full orange.

    A cell is restored (blue) when at least half of its entries are restored; otherwise it belongs
    to the dominant region: grey, mixed towards orange in proportion to its arbitrated share, full
    orange from the 90th percentile of the dominant cells' non-zero arbitrated shares (so that one
    tiny fully arbitrated cell does not wash out the others).
    """
    rest = restored >= 0.5
    arb = arbitrated[~rest]
    arb = arb[arb > 0]
    arb_top = float(np.quantile(arb, 0.9)) if arb.size >= 5 else float(arb.max()) if arb.size else 0.0
    t = np.clip(arbitrated / arb_top, 0.0, 1.0) if arb_top > 0 else np.zeros_like(arbitrated)
    grey = np.asarray(REGION_COLOURS["preserved"], dtype=np.float64)
    orange = np.asarray(REGION_COLOURS["arbitrated"], dtype=np.float64)
    out = grey + (orange - grey) * t[..., None]
    out[rest] = REGION_COLOURS["restored"]
    return out, arb_top


#: the first sentence of a layer's verdict, by :func:`verdict_kind`
VERDICTS = {
    "no_lora": "Your LoRA does not change this layer.",
    "unchanged": "Distillation left this layer unchanged: your LoRA applies exactly as trained.",
    "little": "Distillation moved little here: your LoRA is kept nearly as trained.",
    "similar": "Distillation and your LoRA are of similar size here: CASA balanced the two.",
    "larger": "Distillation changed this layer far more than your LoRA: its strong directions are protected.",
    "unknown": "CASA kept the distilled model's strong directions and applied your LoRA around them.",
}


def verdict_kind(record: LayerRecord | None) -> str:
    """``no_lora``, ``unchanged`` (no drift), ``little`` (drift < 0.1 x the LoRA), ``larger`` (drift > 3 x
    the LoRA), ``similar`` or ``unknown``: the size of the distillation's change (``drift_norm``) against
    the LoRA's (``lora_norm``), both Frobenius norms of weight differences."""
    drift, lora = (record.drift_norm, record.lora_norm) if record is not None else (None, None)
    if lora is not None and lora <= 0:
        return "no_lora"
    if drift is not None and drift <= 0:
        return "unchanged"
    if drift is None or lora is None:
        return "unknown"
    if drift < 0.1 * lora:
        return "little"
    if drift > 3 * lora:
        return "larger"
    return "similar"


def layer_verdict(record: LayerRecord | None, totals: dict | None = None, config: dict | None = None) -> str:
    """One line in plain words: what CASA made of this layer for the user's LoRA.

    From the layer's report record: the size of the distillation's change (``drift_norm``) against the
    LoRA's (``lora_norm``, both Frobenius norms of weight differences), the arbitrated share (else the
    picture's ``totals``) and the energy the injected patch keeps.
    """
    lora = record.lora_norm if record is not None else None
    line = VERDICTS[verdict_kind(record)]
    routed = record.routing if record is not None else None
    arb = None
    if routed is not None and routed.entries:
        arb = routed.arbitrated_entries / routed.entries
    elif totals is not None:
        arb = totals.get("arbitrated")
    if arb is not None and arb >= 0.01 and not (lora is not None and lora <= 0):
        line += f" The stronger of the two was kept on {fmt_share(arb)} of the entries."
    if record is not None:
        kept = max(0.0, 1.0 - float(record.rel_error) ** 2)
        if kept < 0.9:
            line += f" The low-rank patch keeps only {fmt_share(kept)} of the update: raise rank."
    return line


PANELS = (
    ("drift", "a  Distillation: how much it changed"),
    ("lora", "b  Your LoRA: how much it changes"),
    ("alignment", "c  Same direction or opposite?"),
    ("regions", "d  What CASA did"),
)


@dataclass
class _Grid:
    """The geometry of the four panels (all the same size) and of the figure around them."""

    sz: Sizes
    rows: list[dict]
    cols: list[dict]
    ry: list[list[int]]  # cell edges, rows
    cx: list[list[int]]  # cell edges, columns
    H: int  # cell grid height
    W: int  # cell grid width
    strip: int
    strip_gap: int
    row_ticks: list[int]
    col_ticks: list[int]
    ytick_w: int
    left: int  # panel origin to the cell grid
    bw: int  # colour bar / legend swatch width
    side_gap: int
    PW: int  # panel width
    PH: int  # panel height
    title_h: int
    col_gap: int
    row_gap: int
    m: int  # margin
    FW: int  # figure width
    inner: int  # text width


def _grid(d: dict, sz: Sizes) -> _Grid:
    rows, cols = d["rows"], d["cols"]
    nr, nc = len(rows), len(cols)
    s = sz.s
    cell = int(max(3, min(32 * s, math.floor(300 * s / max(nr, nc, 1)))))
    gap = sz.px(3)
    ry = edges(nr, cell, gap if rows and rows[-1]["label"] == ">k" and nr > 1 else 0)
    cx = edges(nc, cell, gap if cols and cols[-1]["label"] == ">k" and nc > 1 else 0)
    H, W = ry[-1][1], cx[-1][1]
    strip, strip_gap = sz.px(6), sz.px(2)
    row_ticks = ticks_shown(rows, ry, text_h(sz.tick) * 1.2)
    col_ticks = ticks_shown(cols, cx, max(text_w(">k", sz.tick), text_w(str(nc), sz.tick)) + sz.px(4))
    ytick_w = max([text_w(rows[i]["label"], sz.tick) for i in row_ticks] + [text_w("00", sz.tick)]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    left = ylab_w + ytick_w + strip + strip_gap
    bw = sz.px(14)
    bar_labels = ["1e-10", "-1 opposite", "+1 same", "0 unrelated", "log scale"]
    legend_w = max(text_w(r, sz.axis) for r in REGION_COLOURS) + bw + sz.px(6)
    side_w = max(max(text_w(b, sz.tick) for b in bar_labels) + bw + sz.px(10), legend_w)
    side_gap = sz.px(12)
    title_need = max(text_w(ti, sz.panel_title, True) for _, ti in PANELS) + sz.px(8)
    PW = max(left + W + side_gap + side_w, title_need)
    title_h = text_h(sz.panel_title) + sz.px(4)
    PH = title_h + strip + strip_gap + H + sz.px(3) + text_h(sz.tick) + sz.px(2) + text_h(sz.axis)
    col_gap, row_gap = sz.px(22), sz.px(16)
    m = sz.margin
    FW = 2 * m + 2 * PW + col_gap
    return _Grid(sz, rows, cols, ry, cx, H, W, strip, strip_gap, row_ticks, col_ticks, ytick_w, left, bw, side_gap,
                 PW, PH, title_h, col_gap, row_gap, m, FW, FW - 2 * m)


def _facts(d: dict, record: LayerRecord | None, config: dict | None) -> list[str]:
    """The header's facts: shape, leading part, clusters, the routing entries' regions, the patch, the settings."""
    t = d["totals"]
    shape = record.shape if record is not None else None
    facts = []
    if shape:
        facts.append(f"shape {shape[0]} x {shape[1]} (out x in)")
    lead = f"leading part k = {d['k']} directions"
    if shape and d["k"] == min(shape):
        lead += " (all of them: non-square layer)" if shape[0] != shape[1] else " (all of them)"
    facts.append(lead)
    cl = f"{d['n_clusters']} clusters"
    if d["merged"]:
        cl += f", shown as {d['n_groups']} groups of neighbouring clusters"
    facts.append(cl)
    facts.append(f"{t['entries']:,} routing entries: restored {fmt_share(t['restored'])}, "
                 f"preserved {fmt_share(t['preserved'])}, arbitrated {fmt_share(t['arbitrated'])}")
    if record is not None:
        facts.append(f"the low-rank patch keeps {fmt_share(1.0 - float(record.rel_error) ** 2)} of the update")
    if config:
        p = [f"{key} {config[key]:g}" for key in ("tau", "q_dom", "q_act", "energy") if isinstance(config.get(key), (int, float))]
        if p:
            facts.append(", ".join(p))
    return facts


def _footer(g: _Grid, arb_top: float) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """One entry per region (its lines: what it means for the LoRA), then the caption's lines."""
    sz = g.sz
    sw = sz.px(12)
    legend = []
    for region in ("restored", "preserved", "arbitrated"):
        lines = wrap(f"{region}: {REGION_MEANING[region]}", sz.note, g.inner - sw - sz.px(6))
        legend.append((region, lines))
    caption = ("Rows: output directions, columns: input directions of the base weight, in clusters numbered "
               "from the strongest (1); >k: all weaker directions together. Strips along the axes: dark where "
               "the distillation's strong (dominant) clusters are. d: orange deepens with the cell's arbitrated "
               f"share (full from {fmt_share(arb_top)}); hover a cell for its numbers.")
    return legend, wrap(caption, sz.note, g.inner)


def _panel_colours(d: dict, region_rgb: np.ndarray, lo: float, hi: float) -> dict[str, np.ndarray]:
    def colours_log(x):
        c = colormap(VIRIDIS, log_t(x, lo, hi))
        c[~(x > 0)] = MISSING
        return c

    cos = d["cos"]
    cos_col = colormap(RDBU, (np.nan_to_num(cos, nan=0.0) + 1.0) / 2.0)
    cos_col[~np.isfinite(cos)] = MISSING
    return {"drift": colours_log(d["drift_rms"]), "lora": colours_log(d["lora_rms"]), "alignment": cos_col,
            "regions": region_rgb}


def _draw_panel(cv: Canvas, g: _Grid, px0: int, py0: int, pid: str, title: str, colours: np.ndarray,
                ylabel: str, xlabel: str) -> dict:
    """One panel: its title, cells, dominance strips, ticks and axis labels; returns its ``meta`` entry."""
    sz, rows, cols, ry, cx = g.sz, g.rows, g.cols, g.ry, g.cx
    strip, strip_gap, H, W = g.strip, g.strip_gap, g.H, g.W
    hx, hy = px0 + g.left, py0 + g.title_h + strip + strip_gap
    cv.text(px0, py0, title, sz.panel_title, INK, bold=True, tag=f"panel-title:{pid}")
    cv.blit(hx, hy, paint_cells(colours, ry, cx))
    # dominance strips
    rd = np.array([r["dominant"] for r in rows])[:, None]
    cd = np.array([c["dominant"] for c in cols])[:, None]
    cv.blit(hx - strip - strip_gap, hy, paint_cells((DOM_LO + (DOM_HI - DOM_LO) * rd)[:, None, :], ry, [[0, strip]]))
    cv.blit(hx, hy - strip - strip_gap, paint_cells((DOM_LO + (DOM_HI - DOM_LO) * cd)[None, :, :], [[0, strip]], cx))
    # ticks and axis labels
    for j in g.row_ticks:
        a, b = ry[j]
        cv.text(hx - strip - strip_gap - sz.px(3), hy + (a + b) / 2, rows[j]["label"], sz.tick, INK,
                anchor="rm", tag="row-tick")
    for j in g.col_ticks:
        a, b = cx[j]
        cv.text(hx + (a + b) / 2, hy + H + sz.px(3), cols[j]["label"], sz.tick, INK, anchor="mt", tag="col-tick")
    cv.text(px0, hy + H / 2, ylabel, sz.axis, INK, anchor="lm", rotate=True, tag="ylabel")
    cv.text(hx + W / 2, hy + H + sz.px(3) + text_h(sz.tick) + sz.px(2), xlabel, sz.axis,
            INK, anchor="mt", tag="xlabel")
    return {"id": pid, "title": title, "x0": hx, "y0": hy, "w": W, "h": H,
            "x": [[hx + a, hx + b] for a, b in cx], "y": [[hy + a, hy + b] for a, b in ry]}


def _draw_region_legend(cv: Canvas, g: _Grid, sx: int, hy: int, totals: dict) -> None:
    sz, bw = g.sz, g.bw
    yy = hy
    for region in ("restored", "preserved", "arbitrated"):
        cv.rect(sx, yy, bw, bw, REGION_COLOURS[region])
        cv.text(sx + bw + sz.px(6), yy + bw / 2, region, sz.axis, INK, anchor="lm", tag=f"legend:{region}")
        yy += bw + sz.px(3)
        cv.text(sx + bw + sz.px(6), yy, fmt_share(totals[region]), sz.axis, INK, anchor="lt", bold=True,
                tag=f"share:{region}")
        yy += text_h(sz.axis) + sz.px(8)
    cv.text(sx, yy, "of the layer's", sz.tick, GREY_TEXT, tag="legend-note")
    cv.text(sx, yy + text_h(sz.tick), "entries", sz.tick, GREY_TEXT, tag="legend-note")


def _draw_side(cv: Canvas, g: _Grid, pid: str, meta_panel: dict, d: dict, lo: float, hi: float) -> dict | None:
    """Beside a panel: its colour bar (returned, for ``meta``) or the region legend (None)."""
    sz, bw, H = g.sz, g.bw, g.H
    hx, hy = meta_panel["x0"], meta_panel["y0"]
    sx = hx + g.W + g.side_gap
    if pid in ("drift", "lora"):
        log_ticks_ = [((math.log10(v) - lo) / (hi - lo), fmt_sci(v)) for v in log_ticks(lo, hi)]
        box = colorbar(cv, sx, hy, bw, H, VIRIDIS, log_ticks_, sz, caption="log scale")
        return {"panel": pid, **box, "map": "viridis", "scale": "log", "lo": 10 ** lo, "hi": 10 ** hi}
    if pid == "alignment":
        ticks = [(0.0, "-1 opposite"), (0.25, "-0.5"), (0.5, "0 unrelated"), (0.75, "+0.5"), (1.0, "+1 same")]
        box = colorbar(cv, sx, hy, bw, H, RDBU, ticks, sz)
        if not np.isfinite(d["cos"]).all():  # below the bottom tick label
            yy = hy + H + text_h(sz.tick) / 2 + sz.px(3)
            cv.rect(sx, yy, bw, bw, MISSING)
            cv.text(sx + bw + sz.px(6), yy + bw / 2, "no energy", sz.tick, GREY_TEXT, anchor="lm")
        return {"panel": pid, **box, "map": "rdbu", "scale": "linear", "lo": -1.0, "hi": 1.0}
    _draw_region_legend(cv, g, sx, hy, d["totals"])
    return None


def _draw_lines(cv: Canvas, x: int, y: float, lines: list[str], size: float, colour, step: float, tag: str) -> float:
    """Lines of text one under the other from ``y``; returns the ``y`` below them."""
    for ln in lines:
        cv.text(x, y, ln, size, colour, tag=tag)
        y += step
    return y


def layer_figure(summary: RoutingSummary, name: str = "", record: LayerRecord | None = None,
                 config: dict | None = None, scale: float = 1.0) -> Figure:
    """The four-panel picture of one layer (see the package doc) and its ``meta``; ``record``: the layer's
    report record (its shape, shares and patch), ``config``: the report's settings."""
    d = layer_data(summary, record)
    sz = Sizes(scale)
    g = _grid(d, sz)
    t = d["totals"]
    region_rgb, arb_top = region_cell_colours(d["restored"], d["arbitrated"])
    m = g.m

    # header: the layer, the verdict, the facts; footer: the regions' meanings, then how to read the axes
    verdict = layer_verdict(record, t, config)
    verdict_lines = wrap(verdict, sz.verdict, g.inner)
    fact_lines = wrap(" \u00b7 ".join(_facts(d, record, config)), sz.subtitle, g.inner)
    header_h = (text_h(sz.title) + sz.px(4) + len(verdict_lines) * (text_h(sz.verdict) + sz.px(1)) + sz.px(3)
                + len(fact_lines) * (text_h(sz.subtitle) + sz.px(1)) + sz.px(10))
    legend, cap_lines = _footer(g, arb_top)
    note_h = text_h(sz.note) + sz.px(1)
    footer_h = sz.px(8) + sum(len(lines) for _, lines in legend) * note_h + sz.px(4) + len(cap_lines) * note_h
    FH = m + header_h + 2 * g.PH + g.row_gap + footer_h + m

    cv = Canvas(g.FW, FH)
    cv.text(m, m, name or "layer", sz.title, INK, bold=True, tag="title")
    y = _draw_lines(cv, m, m + text_h(sz.title) + sz.px(4), verdict_lines, sz.verdict, INK,
                    text_h(sz.verdict) + sz.px(1), "verdict")
    _draw_lines(cv, m, y + sz.px(3), fact_lines, sz.subtitle, GREY_TEXT, text_h(sz.subtitle) + sz.px(1), "subtitle")
    top = m + header_h

    lo, hi = log_range(d["drift_rms"], d["lora_rms"])
    colours = _panel_colours(d, region_rgb, lo, hi)
    ylabel = fit_label(["output clusters (strongest first)", "output clusters", "output"], sz.axis, g.H + g.strip)
    xlabel = fit_label(["input clusters (strongest first)", "input clusters", "input"], sz.axis, g.W + 2 * g.ytick_w)
    meta_panels, colorbars = [], []
    for i, (pid, title) in enumerate(PANELS):
        px0 = m + (i % 2) * (g.PW + g.col_gap)
        py0 = top + (i // 2) * (g.PH + g.row_gap)
        meta_panels.append(_draw_panel(cv, g, px0, py0, pid, title, colours[pid], ylabel, xlabel))
        bar = _draw_side(cv, g, pid, meta_panels[-1], d, lo, hi)
        if bar is not None:
            colorbars.append(bar)

    y = top + 2 * g.PH + g.row_gap + sz.px(8)
    sw = sz.px(12)
    for region, lines in legend:
        cv.rect(m, y + (text_h(sz.note) - sw) / 2, sw, sw, REGION_COLOURS[region])
        y = _draw_lines(cv, m + sw + sz.px(6), y, lines, sz.note, INK, note_h, f"meaning:{region}")
    _draw_lines(cv, m, y + sz.px(4), cap_lines, sz.note, GREY_TEXT, note_h, "note")

    shape = record.shape if record is not None else None
    meta = {
        "kind": "layer", "layer": name, "width": g.FW, "height": FH, "scale": scale,
        "shape": list(shape) if shape else None, "k": d["k"], "clusters": d["n_clusters"],
        "groups": d["n_groups"], "merged": d["merged"], "transposed": d["transposed"],
        "panels": meta_panels, "colorbars": colorbars, "rows": g.rows, "cols": g.cols,
        "values": {key: grid_json(d[key]) for key in ("drift_rms", "lora_rms", "cos", "restored", "preserved", "arbitrated")}
        | {"entries": [[int(v) for v in row] for row in d["entries"]]},
        "totals": t, "region_colours": {k_: list(v) for k_, v in REGION_COLOURS.items()},
        "arbitrated_full": arb_top, "verdict": verdict, "meaning": dict(REGION_MEANING),
        "min_text_px": min(r["size"] for r in cv.texts),
        "texts": cv.texts,
    }
    return Figure(cv.rgb(), meta)
