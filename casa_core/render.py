"""Pictures of what CASA saw and decided (numpy only; text from :mod:`casa_core.fonts`).

``layer_figure``: one layer at cluster level (from :mod:`casa_core.routing_data`), four panels as in
the CASA paper's Figures 5b, 6 and 7:

a. routing energy density of the distillation drift ``C_F`` and b. of the LoRA ``C_L`` (the RMS of
   the routing entries of each receiving x sending cluster-group block, one shared log colour scale);
c. directional alignment ``cos(C_L, C_F)`` of each block, diverging scale -1..1;
d. the CASA region map: each cell filled bottom-up with its shares of arbitrated, preserved (the
   rest of the dominant region) and restored entries; the layer's shares are printed beside it.

Strips along the axes mark the dominant clusters of the drift (receiving: left, sending: top).
Rows are receivers (output / left singular directions), columns senders (input / right singular
directions) of the layer as stored, ``out x in``: the routing data of a wide layer (``out < in``),
computed on its transpose, are transposed back when the layer's report stats (its ``shape``) are
given.  Clusters are numbered from 1 in order of their leading singular value; ``>k`` is the group
of all directions beyond the leading subspace.

``overview_figure``: per block x projection, the share of dominant entries, the share of
arbitrated entries and the energy the injected update keeps (``1 - rel_error^2``), from a
report's per-layer stats, to find the layers worth a closer look.

Both return a :class:`Figure`: the RGB picture and JSON-able ``meta`` (panel geometry, row and
column descriptions, the value of every cell, the colour bars, every string drawn) that the
ComfyUI widget uses for its hover read-out and tests use to check the picture's content.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .draw import GREY_TEXT, INK, MISSING, ORANGES, RDBU, VIRIDIS, WHITE, Canvas, colormap, text_h, text_w

REGION_COLOURS = {
    "restored": (66, 133, 214),
    "preserved": (196, 196, 196),
    "arbitrated": (236, 112, 20),
}
REGION_ORDER = ("arbitrated", "preserved", "restored")  # bottom-up fill order inside a cell
DOM_LO, DOM_HI = np.array([236.0, 236.0, 236.0]), np.array([55.0, 55.0, 55.0])
LOG_DECADES = 5.0  # the shared energy scale spans at most this many decades below its maximum

PROJECTION_ORDER = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)
_BLOCK_RE = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(.+)$")


@dataclass
class Figure:
    rgb: np.ndarray  # H x W x 3 uint8
    meta: dict


# ------------------------------------------------------------------------------------------------
# numbers and labels
# ------------------------------------------------------------------------------------------------

def fmt_share(x: float | None) -> str:
    """A share as a percentage: three significant digits (two decimals near 0 and 100 %);
    never rounds a non-zero share to 0 % or a share below one to 100 %."""
    if x is None or not math.isfinite(x):
        return "n/a"
    p = 100.0 * x
    if p == 0.0:
        return "0%"
    if abs(p) < 0.005:
        return "<0.01%"
    if 99.995 <= p < 100.0:
        return ">99.99%"
    if abs(p) < 10.0 or (99.9 < p < 100.0):
        return f"{p:.2f}%"
    return f"{p:.1f}%"


def fmt_tick_share(x: float) -> str:
    """A round share for a colour bar tick: ``0%``, ``2.5%``, ``50%``."""
    p = round(100.0 * x, 6)
    return f"{p:.3f}".rstrip("0").rstrip(".") + "%"


def fmt_sci(v: float) -> str:
    """``1e-3``, ``2.5e-4``, ``0.3`` ... short labels for colour bar ticks."""
    if v == 0 or not math.isfinite(v):
        return "0"
    e = math.floor(math.log10(abs(v)) + 1e-9)
    m = v / 10 ** e
    if -2 <= e <= 2:
        s = f"{v:.{max(0, -e + (0 if abs(m - round(m)) < 1e-6 else 1))}f}"
        return s
    ms = f"{m:.0f}" if abs(m - round(m)) < 1e-6 else f"{m:.1f}"
    return f"{ms}e{e}" if ms != "1" else f"1e{e}"


def _round(x, digits: int = 4):
    """JSON-friendly value: a float with ``digits`` significant digits, None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _grid_json(a: np.ndarray, digits: int = 4) -> list:
    return [[_round(v, digits) for v in row] for row in a]


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


# ------------------------------------------------------------------------------------------------
# the data of one layer
# ------------------------------------------------------------------------------------------------

def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _transposed(stats: dict | None) -> bool:
    shape = (stats or {}).get("shape")
    return bool(shape) and len(shape) == 2 and shape[0] < shape[1]


def layer_data(summary: dict, stats: dict | None = None) -> dict:
    """Cell values and group descriptions of one layer, in the layer's own orientation.

    Returns ``rows``/``cols`` (one dict per displayed group: ``label``, ``clusters`` [first, last]
    (1-based, None for ``>k``), ``dirs`` [first, last] singular index, ``n`` directions,
    ``dominant`` share), per-cell arrays ``drift_rms``, ``lora_rms``, ``cos`` (NaN without energy),
    ``restored``, ``preserved``, ``arbitrated`` (shares of the cell's entries), ``entries``, and the
    layer's totals.  Empty groups (the ``>k`` side of a non-square layer) are left out.
    """
    mats = {key: _np(summary[key]) for key in ("drift_energy", "lora_energy", "dot", "count", "restored", "arbitrated")}
    labels = _np(summary["labels"]).astype(np.int64)
    cgroup = _np(summary["cluster_group"]).astype(np.int64)
    recv = _np(summary["recv_dominant"])
    send = _np(summary["send_dominant"])
    transposed = _transposed(stats)
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
    return {
        "k": k, "n_clusters": n_clusters, "n_groups": n_in, "merged": n_clusters > n_in,
        "transposed": transposed, "rows": rows, "cols": cols,
        "drift_rms": np.sqrt(de / cnt), "lora_rms": np.sqrt(le / cnt), "cos": cos,
        "restored": restored, "preserved": preserved, "arbitrated": arbitrated, "entries": sel["count"],
        "totals": {"entries": int(round(total)), "restored": tot_rest, "arbitrated": tot_arb,
                   "preserved": max(0.0, 1.0 - tot_rest - tot_arb), "dominant": 1.0 - tot_rest},
    }


def log_range(*arrays: np.ndarray) -> tuple[float, float]:
    """(log10 lo, log10 hi) of the positive values, at most ``LOG_DECADES`` apart."""
    vals = np.concatenate([np.ravel(a) for a in arrays])
    pos = vals[np.isfinite(vals) & (vals > 0)]
    if pos.size == 0:
        return -1.0, 0.0
    hi = math.log10(float(pos.max()))
    lo = max(math.log10(float(pos.min())), hi - LOG_DECADES)
    if hi - lo < 1e-6:
        lo, hi = hi - 0.5, hi + 0.5
    return lo, hi


def _log_t(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log10(np.where(x > 0, x, np.nan)) - lo) / (hi - lo)
    return np.clip(t, 0.0, 1.0)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) for a log colour bar from 10**lo to 10**hi."""
    decades = [10.0 ** e for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(decades) >= 2:
        step = max(1, math.ceil(len(decades) / 6))
        return decades[::step]
    ticks = []
    for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                ticks.append(v)
    if len(ticks) < 2:
        ticks = [10 ** lo, 10 ** hi]
    return ticks


# ------------------------------------------------------------------------------------------------
# panel painting
# ------------------------------------------------------------------------------------------------

def _edges(n: int, cell: int, gap_last: int) -> list[list[int]]:
    """[start, end) pixel offsets of ``n`` cells; a gap separates the last one when ``gap_last``."""
    out, x = [], 0
    for i in range(n):
        if i == n - 1 and gap_last:
            x += gap_last
        out.append([x, x + cell])
        x += cell
    return out


def _index_map(edges: list[list[int]], length: int) -> np.ndarray:
    idx = np.full(length, -1, dtype=np.int64)
    for i, (a, b) in enumerate(edges):
        idx[a:b] = i
    return idx


def _paint_cells(colors: np.ndarray, ry: list, cx: list, bg=WHITE) -> np.ndarray:
    """Picture of a cell grid (``colors``: rows x cols x 3) with the given cell edges."""
    h, w = ry[-1][1], cx[-1][1]
    iy, ix = _index_map(ry, h), _index_map(cx, w)
    out = colors[np.clip(iy, 0, None)][:, np.clip(ix, 0, None)].astype(np.float64)
    out[(iy < 0)[:, None] | (ix < 0)[None, :]] = bg
    return out


def _paint_regions(shares: dict[str, np.ndarray], ry: list, cx: list, bg=WHITE) -> np.ndarray:
    """Region map: every cell filled bottom-up by its shares (anti-aliased at the boundaries)."""
    h, w = ry[-1][1], cx[-1][1]
    iy, ix = _index_map(ry, h), _index_map(cx, w)
    out = np.zeros((h, w, 3), dtype=np.float64)
    r = np.clip(iy, 0, None)
    c = np.clip(ix, 0, None)
    # position of each pixel row inside its cell, in cell heights from the bottom
    cell_h = np.array([b - a for a, b in ry], dtype=np.float64)
    bottoms = np.array([b for _, b in ry], dtype=np.float64)
    y = np.arange(h, dtype=np.float64)
    u0 = (bottoms[r] - (y + 1)) / cell_h[r]  # lower edge of the pixel row
    u1 = (bottoms[r] - y) / cell_h[r]
    lo = np.zeros((h, w))
    for name in REGION_ORDER:
        s = shares[name][r][:, c]
        hi = lo + s
        ov = np.clip(np.minimum(u1[:, None], hi) - np.maximum(u0[:, None], lo), 0.0, None) * cell_h[r][:, None]
        out += ov[..., None] * np.asarray(REGION_COLOURS[name], dtype=np.float64)
        lo = hi
    out[(iy < 0)[:, None] | (ix < 0)[None, :]] = bg
    return out


def _tick_step(cell: float, need: float) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100):
        if step * cell >= need:
            return step
    return 100


def _ticks_shown(groups: list[dict], edges: list[list[int]], need: float) -> list[int]:
    """Indices of the groups that get a tick label: 1, then every ``step``-th, and ``>k``;
    labels closer than ``need`` pixels to the next one shown are dropped."""
    n_in = sum(1 for g in groups if g["label"] != ">k")
    cell = (edges[0][1] - edges[0][0]) if edges else 1
    step = _tick_step(cell, need)
    shown = [i for i in range(n_in) if i == 0 or (i + 1) % step == 0]
    if n_in < len(groups):
        shown.append(len(groups) - 1)
    centre = [(edges[i][0] + edges[i][1]) / 2 for i in shown]
    keep = []
    for j, i in enumerate(shown):
        nxt = centre[j + 1] if j + 1 < len(shown) else None
        if nxt is not None and nxt - centre[j] < need and (j + 1 == len(shown) - 1 or i != 0):
            continue  # too close to the next label (which wins: it is >k or the step's multiple)
        keep.append(i)
    return keep


class _Sizes:
    def __init__(self, s: float):
        self.s = s
        self.title = 20 * s
        self.subtitle = 13 * s
        self.panel_title = 14 * s
        self.axis = 12 * s
        self.tick = 11 * s
        self.note = 11 * s
        self.margin = int(round(22 * s))

    def px(self, v: float) -> int:
        return max(1, int(round(v * self.s)))


def _colorbar(cv: Canvas, x: int, y: int, w: int, h: int, anchors: np.ndarray, ticks: list[tuple[float, str]],
              sz: _Sizes, caption: str | None = None) -> dict:
    """Vertical colour bar (top = 1); ``ticks``: (t in 0..1, label)."""
    t = 1.0 - (np.arange(h) + 0.5) / h
    cv.blit(x, y, np.repeat(colormap(anchors, t)[:, None, :], w, axis=1))
    cv.frame(x, y, w, h, (120, 120, 120), 1)
    for tv, lab in ticks:
        yy = y + (1.0 - tv) * h
        cv.rect(x + w, int(round(yy)) - (0 if tv < 1 else 1), sz.px(4), 1, INK)
        cv.text(x + w + sz.px(6), yy, lab, sz.tick, INK, anchor="lm", tag="colorbar-tick")
    if caption:
        cv.text(x + w + sz.px(6), y + h + sz.px(4), caption, sz.tick, GREY_TEXT, anchor="lt")
    return {"x": x, "y": y, "w": w, "h": h}


def _wrap(text: str, size: float, width: int) -> list[str]:
    words, lines, cur = text.split(" "), [], ""
    for wd in words:
        cand = wd if not cur else cur + " " + wd
        if cur and text_w(cand, size) > width:
            lines.append(cur)
            cur = wd
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------

def layer_figure(summary: dict, name: str = "", stats: dict | None = None, config: dict | None = None,
                 scale: float = 1.0) -> Figure:
    """The four-panel picture of one layer (see the module doc) and its ``meta``."""
    d = layer_data(summary, stats)
    sz = _Sizes(scale)
    rows, cols = d["rows"], d["cols"]
    nr, nc = len(rows), len(cols)
    cell = int(max(3, min(40 * scale, math.floor(330 * scale / max(nr, nc, 1)))))
    gap = sz.px(3)
    ry = _edges(nr, cell, gap if rows and rows[-1]["label"] == ">k" and nr > 1 else 0)
    cx = _edges(nc, cell, gap if cols and cols[-1]["label"] == ">k" and nc > 1 else 0)
    H, W = ry[-1][1], cx[-1][1]

    # geometry of one panel block
    strip, strip_gap = sz.px(6), sz.px(2)
    row_ticks = _ticks_shown(rows, ry, text_h(sz.tick) * 1.2)
    col_ticks = _ticks_shown(cols, cx, max(text_w(">k", sz.tick), text_w(str(nc), sz.tick)) + sz.px(4))
    ytick_w = max([text_w(rows[i]["label"], sz.tick) for i in row_ticks] + [text_w("00", sz.tick)]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    side_gap, side_w = sz.px(14), sz.px(118)
    left = ylab_w + ytick_w + strip + strip_gap
    title_h = text_h(sz.panel_title) + sz.px(4)
    PW = left + W + side_gap + side_w
    PH = title_h + strip + strip_gap + H + sz.px(4) + text_h(sz.tick) + sz.px(2) + text_h(sz.axis)
    col_gap, row_gap = sz.px(26), sz.px(20)

    # header and footer text
    shape = (stats or {}).get("shape")
    t = d["totals"]
    head = [name or "layer"]
    bits = []
    if shape:
        bits.append(f"shape {shape[0]} x {shape[1]} (out x in)")
    lead = f"leading subspace k = {d['k']}"
    if shape and d["k"] == min(shape):
        lead += " (all directions: non-square layer)" if shape[0] != shape[1] else " (all directions)"
    bits.append(lead)
    cl = f"{d['n_clusters']} clusters"
    if d["merged"]:
        cl += f", shown as {d['n_groups']} groups of neighbouring clusters"
    bits.append(cl)
    sub1 = " \u00b7 ".join(bits)
    sub2_bits = [f"{t['entries']:,} routing entries: restored {fmt_share(t['restored'])}, "
                 f"preserved {fmt_share(t['preserved'])}, arbitrated {fmt_share(t['arbitrated'])}"]
    if stats and stats.get("rel_error") is not None:
        sub2_bits.append(f"injected update keeps {fmt_share(1.0 - float(stats['rel_error']) ** 2)} of its energy")
    if config:
        p = [f"{key} {config[key]:g}" for key in ("tau", "q_dom", "q_act", "energy") if isinstance(config.get(key), (int, float))]
        if p:
            sub2_bits.append(", ".join(p))
    sub2 = " \u00b7 ".join(sub2_bits)
    m = sz.margin
    FW = 2 * m + 2 * PW + col_gap
    notes = [
        "Cells: RMS of the routing entries C = U^T dW V (U, V: singular vectors of the base weight) of a block of "
        "receiving x sending clusters; '>k' gathers every direction beyond the leading subspace k. "
        "Strips along the axes: share of each row/column in dominant drift clusters (left: receiving, top: sending). "
        "Region cells fill bottom-up with their shares of arbitrated, preserved and restored entries.",
    ]
    note_lines = [ln for n in notes for ln in _wrap(n, sz.note, FW - 2 * m)]
    header_h = text_h(sz.title) + sz.px(4) + 2 * (text_h(sz.subtitle) + sz.px(2)) + sz.px(12)
    footer_h = sz.px(10) + len(note_lines) * (text_h(sz.note) + sz.px(1))
    FH = m + header_h + 2 * PH + row_gap + footer_h + m

    cv = Canvas(FW, FH)
    y = m
    cv.text(m, y, head[0], sz.title, INK, bold=True, tag="title")
    y += text_h(sz.title) + sz.px(4)
    cv.text(m, y, sub1, sz.subtitle, GREY_TEXT, tag="subtitle")
    y += text_h(sz.subtitle) + sz.px(2)
    cv.text(m, y, sub2, sz.subtitle, GREY_TEXT, tag="subtitle")
    top = m + header_h

    lo, hi = log_range(d["drift_rms"], d["lora_rms"])
    log_ticks = [((math.log10(v) - lo) / (hi - lo), fmt_sci(v)) for v in _log_ticks(lo, hi)]

    def colours_log(x):
        c = colormap(VIRIDIS, _log_t(x, lo, hi))
        c[~(x > 0)] = MISSING
        return c

    cos = d["cos"]
    cos_col = colormap(RDBU, (np.nan_to_num(cos, nan=0.0) + 1.0) / 2.0)
    cos_col[~np.isfinite(cos)] = MISSING
    panels_spec = [
        ("drift", "a  Distillation drift: routing energy", colours_log(d["drift_rms"])),
        ("lora", "b  LoRA: routing energy", colours_log(d["lora_rms"])),
        ("alignment", "c  Alignment of LoRA and drift: cosine", cos_col),
        ("regions", "d  CASA regions", None),
    ]
    meta_panels, colorbars = [], []
    for i, (pid, title, colors) in enumerate(panels_spec):
        px0 = m + (i % 2) * (PW + col_gap)
        py0 = top + (i // 2) * (PH + row_gap)
        hx, hy = px0 + left, py0 + title_h + strip + strip_gap
        cv.text(hx - strip - strip_gap, py0, title, sz.panel_title, INK, bold=True, tag=f"panel-title:{pid}")
        if colors is None:
            img = _paint_regions({"restored": d["restored"], "preserved": d["preserved"],
                                  "arbitrated": d["arbitrated"]}, ry, cx)
        else:
            img = _paint_cells(colors, ry, cx)
        cv.blit(hx, hy, img)
        # dominance strips
        rd = np.array([r["dominant"] for r in rows])[:, None]
        cd = np.array([c["dominant"] for c in cols])[:, None]
        cv.blit(hx - strip - strip_gap, hy, _paint_cells((DOM_LO + (DOM_HI - DOM_LO) * rd)[:, None, :],
                                                          ry, [[0, strip]]))
        cv.blit(hx, hy - strip - strip_gap, _paint_cells((DOM_LO + (DOM_HI - DOM_LO) * cd)[None, :, :],
                                                          [[0, strip]], cx))
        # ticks and axis labels
        for j in row_ticks:
            a, b = ry[j]
            cv.text(hx - strip - strip_gap - sz.px(3), hy + (a + b) / 2, rows[j]["label"], sz.tick, INK,
                    anchor="rm", tag="row-tick")
        for j in col_ticks:
            a, b = cx[j]
            cv.text(hx + (a + b) / 2, hy + H + sz.px(3), cols[j]["label"], sz.tick, INK, anchor="mt", tag="col-tick")
        cv.text(px0, hy + H / 2, "receiving clusters (output)", sz.axis, INK, anchor="lm", rotate=True, tag="ylabel")
        cv.text(hx + W / 2, hy + H + sz.px(4) + text_h(sz.tick) + sz.px(2), "sending clusters (input)", sz.axis,
                INK, anchor="mt", tag="xlabel")
        meta_panels.append({"id": pid, "title": title, "x0": hx, "y0": hy, "w": W, "h": H,
                            "x": [[hx + a, hx + b] for a, b in cx], "y": [[hy + a, hy + b] for a, b in ry]})
        # side: colour bar or legend
        sx = hx + W + side_gap
        bw = sz.px(14)
        if pid in ("drift", "lora"):
            box = _colorbar(cv, sx, hy, bw, H, VIRIDIS, log_ticks, sz, caption="RMS, log scale")
            colorbars.append({"panel": pid, **box, "map": "viridis", "scale": "log", "lo": 10 ** lo, "hi": 10 ** hi})
        elif pid == "alignment":
            ticks = [(0.0, "-1"), (0.25, "-0.5"), (0.5, "0"), (0.75, "+0.5"), (1.0, "+1")]
            box = _colorbar(cv, sx, hy, bw, H, RDBU, ticks, sz, caption="opposed / aligned")
            colorbars.append({"panel": pid, **box, "map": "rdbu", "scale": "linear", "lo": -1.0, "hi": 1.0})
            if not np.isfinite(cos).all():
                yy = hy + H + sz.px(4) + text_h(sz.tick) + sz.px(2)
                cv.rect(sx, yy, bw, bw, MISSING)
                cv.text(sx + bw + sz.px(6), yy + bw / 2, "no energy", sz.tick, GREY_TEXT, anchor="lm")
        else:
            yy = hy
            for region in ("restored", "preserved", "arbitrated"):
                cv.rect(sx, yy, bw, bw, REGION_COLOURS[region])
                cv.text(sx + bw + sz.px(6), yy + bw / 2, region, sz.axis, INK, anchor="lm", tag=f"legend:{region}")
                yy += bw + sz.px(3)
                cv.text(sx + bw + sz.px(6), yy, fmt_share(t[region]), sz.axis, INK, anchor="lt", bold=True,
                        tag=f"share:{region}")
                yy += text_h(sz.axis) + sz.px(8)
            cv.text(sx, yy, "of the layer's", sz.tick, GREY_TEXT, tag="legend-note")
            cv.text(sx, yy + text_h(sz.tick), "routing entries", sz.tick, GREY_TEXT, tag="legend-note")
    # the dominance strip legend and notes
    y = FH - m - len(note_lines) * (text_h(sz.note) + sz.px(1))
    for ln in note_lines:
        cv.text(m, y, ln, sz.note, GREY_TEXT, tag="note")
        y += text_h(sz.note) + sz.px(1)

    meta = {
        "kind": "layer", "layer": name, "width": FW, "height": FH, "scale": scale,
        "shape": list(shape) if shape else None, "k": d["k"], "clusters": d["n_clusters"],
        "groups": d["n_groups"], "merged": d["merged"], "transposed": d["transposed"],
        "panels": meta_panels, "colorbars": colorbars, "rows": rows, "cols": cols,
        "values": {key: _grid_json(d[key]) for key in ("drift_rms", "lora_rms", "cos", "restored", "preserved", "arbitrated")}
        | {"entries": [[int(v) for v in row] for row in d["entries"]]},
        "totals": t, "region_colours": {k_: list(v) for k_, v in REGION_COLOURS.items()},
        "texts": cv.texts,
    }
    return Figure(cv.rgb(), meta)


def layer_heatmap(summary: dict, name: str = "", stats: dict | None = None, scale: float = 1.0) -> np.ndarray:
    """RGB picture of :func:`layer_figure`."""
    return layer_figure(summary, name, stats, scale=scale).rgb


# ------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------

def layer_metrics(stats: dict) -> dict:
    """``dominant``, ``arbitrated`` (shares of entries) and ``kept`` (1 - rel_error^2) of one layer."""
    ent = stats.get("entries") or 0
    out = {"dominant": None, "arbitrated": None, "kept": None}
    if ent and stats.get("dominant_entries") is not None:
        out["dominant"] = stats["dominant_entries"] / ent
    if ent and stats.get("arbitrated_entries") is not None:
        out["arbitrated"] = stats["arbitrated_entries"] / ent
    if stats.get("rel_error") is not None:
        out["kept"] = max(0.0, 1.0 - float(stats["rel_error"]) ** 2)
    return out


def interesting_layers(layers: dict[str, dict], n: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per metric, the ``n`` most telling layers: most arbitrated, largest dominant region, least energy kept."""
    met = {name: layer_metrics(s) for name, s in layers.items()}
    out = {}
    for key, reverse in (("arbitrated", True), ("dominant", True), ("kept", False)):
        vals = [(name, m[key]) for name, m in met.items() if m[key] is not None]
        vals.sort(key=lambda kv: (-kv[1] if reverse else kv[1]))
        out[key] = vals[:n]
    return out


def auto_layer(layers: dict[str, dict], candidates=None) -> str | None:
    """The layer a heatmap shows by default: the largest arbitrated share, then dominant share."""
    names = [n for n in (candidates if candidates is not None else layers) if n in layers] if layers else list(candidates or [])
    if not names:
        return None

    def key(name):
        m = layer_metrics(layers.get(name, {}))
        return (m["arbitrated"] or 0.0, m["dominant"] or 0.0)

    return max(names, key=key)


def _totals(layers: dict[str, dict]) -> dict:
    reps = list(layers.values())
    sq = sum((r.get("update_norm") or 0.0) ** 2 for r in reps)
    lost = sum(((r.get("update_norm") or 0.0) * (r.get("rel_error") or 0.0)) ** 2 for r in reps)
    out = {"layers": len(reps), "kept": 1.0 - lost / sq if sq > 0 else None}
    ent = sum(r.get("entries", 0) or 0 for r in reps if r.get("dominant_entries") is not None)
    if ent:
        out["dominant"] = sum(r.get("dominant_entries", 0) for r in reps) / ent
        out["arbitrated"] = sum(r.get("arbitrated_entries", 0) for r in reps) / ent
    return out


def overview_figure(layers: dict[str, dict], selected: str | None = None, title: str | None = None,
                    scale: float = 1.0) -> Figure:
    """Blocks x projections, three panels: dominant share, arbitrated share, energy kept."""
    sz = _Sizes(scale)
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
    metrics = {key: np.full((nr, nc), np.nan) for key in ("dominant", "arbitrated", "kept")}
    for i in range(nr):
        for j in range(nc):
            if names[i][j] is not None:
                for key, v in layer_metrics(layers[names[i][j]]).items():
                    if v is not None:
                        metrics[key][i, j] = v
    arb = metrics["arbitrated"]
    arb_hi = float(np.nanmax(arb)) if np.isfinite(arb).any() else 0.0
    arb_top = _nice_ceil(arb_hi) if arb_hi > 0 else 0.01
    specs = [
        ("dominant", "Dominant region (share of entries)", VIRIDIS, 0.0, 1.0),
        ("arbitrated", "Arbitrated entries (share)", ORANGES, 0.0, arb_top),
        ("kept", "Energy kept by the injected update", VIRIDIS, 0.0, 1.0),
    ]
    cw = int(max(10, min(34, math.floor(330 / nc))) * scale)
    ch = int(max(6, min(36, math.floor(560 / nr))) * scale)
    cx = _edges(nc, cw, 0)
    ry = _edges(nr, ch, 0)
    H, W = ry[-1][1], cx[-1][1]
    row_ticks = [i for i in range(nr) if nr <= 1 or _tick_step(ch, text_h(sz.tick) * 0.9) == 1
                 or i % _tick_step(ch, text_h(sz.tick) * 0.9) == 0 or row_labels[i] == "other"]
    ytick_w = max(text_w(lab, sz.tick) for lab in row_labels + ["00"]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    xlab_h = max(text_w(p, sz.tick) for p in projs) + sz.px(6) if projs else 0
    side_gap, side_w = sz.px(12), sz.px(62)
    left = ylab_w + ytick_w
    title_h = text_h(sz.panel_title) + sz.px(6)
    PW = max(left + W + side_gap + side_w, text_w(specs[2][1], sz.panel_title, True) + sz.px(8))
    PH = title_h + max(H + sz.px(4) + xlab_h, sz.px(150) + sz.px(4))
    m = sz.margin
    gap = sz.px(22)
    FW = 2 * m + 3 * PW + 2 * gap
    tot = _totals(layers)
    sub_bits = [f"{len(layers)} layers"]
    if tot.get("dominant") is not None:
        sub_bits.append(f"dominant region {fmt_share(tot['dominant'])} of entries")
        sub_bits.append(f"arbitrated {fmt_share(tot['arbitrated'])}")
    if tot.get("kept") is not None:
        sub_bits.append(f"energy kept {fmt_share(tot['kept'])}")
    sub = " \u00b7 ".join(sub_bits)
    picks = interesting_layers(layers)
    lines = []
    labels = {"arbitrated": "most arbitrated", "dominant": "largest dominant region", "kept": "least energy kept"}
    for key in ("arbitrated", "dominant", "kept"):
        if picks[key]:
            lines.append(f"{labels[key]}: " + ", ".join(f"{n} {fmt_share(v)}" for n, v in picks[key]))
    if selected:
        lines.append(f"outlined: {selected}")
    foot = [ln for line in lines for ln in _wrap(line, sz.note, FW - 2 * m)]
    header_h = text_h(sz.title) + sz.px(4) + text_h(sz.subtitle) + sz.px(14)
    footer_h = sz.px(8) + len(foot) * (text_h(sz.note) + sz.px(1))
    FH = m + header_h + PH + footer_h + m
    cv = Canvas(FW, FH)
    cv.text(m, m, title or "CASA transfer overview", sz.title, INK, bold=True, tag="title")
    cv.text(m, m + text_h(sz.title) + sz.px(4), sub, sz.subtitle, GREY_TEXT, tag="subtitle")
    top = m + header_h
    meta_panels, colorbars = [], []
    sel_cell = None
    if selected:
        for i in range(nr):
            for j in range(nc):
                if names[i][j] == selected:
                    sel_cell = (i, j)
    for pi, (key, ptitle, anchors, vlo, vhi) in enumerate(specs):
        px0 = m + pi * (PW + gap)
        hx, hy = px0 + left, top + title_h
        cv.text(px0, top, ptitle, sz.panel_title, INK, bold=True, tag=f"panel-title:{key}")
        vals = metrics[key]
        col = colormap(anchors, (np.nan_to_num(vals, nan=0.0) - vlo) / (vhi - vlo))
        col[~np.isfinite(vals)] = MISSING
        cv.blit(hx, hy, _paint_cells(col, ry, cx))
        if sel_cell is not None:
            a, b = ry[sel_cell[0]]
            c0, c1 = cx[sel_cell[1]]
            cv.frame(hx + c0, hy + a, c1 - c0, b - a, INK, max(1, sz.px(2)))
        for i in row_ticks:
            a, b = ry[i]
            cv.text(hx - sz.px(3), hy + (a + b) / 2, row_labels[i], sz.tick, INK, anchor="rm", tag="row-tick")
        for j, p in enumerate(projs):
            a, b = cx[j]
            cv.text(hx + (a + b) / 2, hy + H + sz.px(4), p, sz.tick, INK, anchor="mt", rotate=True, tag="col-tick")
        cv.text(px0, hy + H / 2, "block", sz.axis, INK, anchor="lm", rotate=True, tag="ylabel")
        sx = hx + W + side_gap
        if key == "arbitrated":
            ticks = [(f / arb_top, fmt_tick_share(f)) for f in _lin_ticks(arb_top)]
        else:
            ticks = [(f, f"{int(round(f * 100))}%") for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        box = _colorbar(cv, sx, hy, sz.px(12), max(H, sz.px(150)), anchors, ticks, sz)
        colorbars.append({"panel": key, **box, "map": "oranges" if anchors is ORANGES else "viridis",
                          "scale": "linear", "lo": vlo, "hi": vhi})
        meta_panels.append({"id": key, "title": ptitle, "x0": hx, "y0": hy, "w": W, "h": H,
                            "x": [[hx + a, hx + b] for a, b in cx], "y": [[hy + a, hy + b] for a, b in ry]})
    y = FH - m - len(foot) * (text_h(sz.note) + sz.px(1))
    for ln in foot:
        cv.text(m, y, ln, sz.note, GREY_TEXT, tag="note")
        y += text_h(sz.note) + sz.px(1)
    meta = {
        "kind": "overview", "layer": selected, "width": FW, "height": FH, "scale": scale,
        "panels": meta_panels, "colorbars": colorbars,
        "rows": [{"label": lab} for lab in row_labels], "cols": [{"label": p} for p in projs],
        "names": names, "values": {key: _grid_json(v) for key, v in metrics.items()},
        "totals": tot, "interesting": {k_: [[n, _round(v)] for n, v in vs] for k_, vs in picks.items()},
        "texts": cv.texts,
    }
    return Figure(cv.rgb(), meta)


def _nice_ceil(x: float) -> float:
    e = math.floor(math.log10(x))
    for m_ in (1, 2, 2.5, 5, 10):
        if m_ * 10 ** e >= x * (1 - 1e-12):
            return m_ * 10 ** e
    return 10 ** (e + 1)


def _lin_ticks(top: float) -> list[float]:
    e = math.floor(math.log10(top))
    for step_m in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5):
        step = step_m * 10 ** e
        if top / step <= 5:
            return [i * step for i in range(int(round(top / step)) + 1)]
    return [0.0, top]
