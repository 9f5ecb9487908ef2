"""Pictures of what CASA saw and decided (numpy only; text from :mod:`casa_core.fonts`).

``layer_figure``: one layer at cluster level (from :mod:`casa_core.routing_data`), four panels as in
the CASA paper's Figures 5b, 6 and 7:

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
from .report import layer_totals

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
    if stats and stats.get("entries") and stats.get("arbitrated_entries") is not None:
        # the report's counts are the layer's figures (a non-square layer's complement is arbitrated in
        # expectation, and the report counts whole entries): the picture states the same shares
        tot_arb = stats["arbitrated_entries"] / stats["entries"]
        if stats.get("dominant_entries") is not None:
            tot_rest = 1.0 - stats["dominant_entries"] / stats["entries"]
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
        # at scale 1 no text is below 12 px: legible at 0.83x (10 px), the widget's default size
        self.title = 18 * s
        self.verdict = 14 * s
        self.subtitle = 12 * s
        self.panel_title = 14 * s
        self.axis = 13 * s
        self.tick = 12 * s
        self.note = 12 * s
        self.margin = int(round(18 * s))

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

#: the first sentence of a layer's verdict, by :func:`verdict_kind`
VERDICTS = {
    "no_lora": "Your LoRA does not change this layer.",
    "unchanged": "Distillation left this layer unchanged: your LoRA applies exactly as trained.",
    "little": "Distillation moved little here: your LoRA is kept nearly as trained.",
    "similar": "Distillation and your LoRA are of similar size here: CASA balanced the two.",
    "larger": "Distillation changed this layer far more than your LoRA: its strong directions are protected.",
    "unknown": "CASA kept the distilled model's strong directions and applied your LoRA around them.",
}


def verdict_kind(stats: dict | None) -> str:
    """``no_lora``, ``unchanged`` (no drift), ``little`` (drift < 0.1 x the LoRA), ``larger`` (drift > 3 x
    the LoRA), ``similar`` or ``unknown``: the size of the distillation's change (``drift_norm``) against
    the LoRA's (``lora_norm``), both Frobenius norms of weight differences."""
    st = stats or {}
    drift, lora = st.get("drift_norm"), st.get("lora_norm")
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


def layer_verdict(stats: dict | None, totals: dict | None = None, config: dict | None = None) -> str:
    """One line in plain words: what CASA made of this layer for the user's LoRA.

    From the layer's report stats: the size of the distillation's change (``drift_norm``) against the
    LoRA's (``lora_norm``, both Frobenius norms of weight differences), the arbitrated share and the
    energy the injected patch keeps.
    """
    st = stats or {}
    lora = st.get("lora_norm")
    line = VERDICTS[verdict_kind(st)]
    ent = st.get("entries") or (totals or {}).get("entries")
    arb = None
    if ent and st.get("arbitrated_entries") is not None:
        arb = st["arbitrated_entries"] / ent
    elif totals is not None:
        arb = totals.get("arbitrated")
    if arb is not None and arb >= 0.01 and not (lora is not None and lora <= 0):
        line += f" The stronger of the two was kept on {fmt_share(arb)} of the entries."
    if st.get("rel_error") is not None:
        kept = max(0.0, 1.0 - float(st["rel_error"]) ** 2)
        if kept < 0.9:
            line += f" The low-rank patch keeps only {fmt_share(kept)} of the update: raise rank."
    return line


def _fit_label(options: list[str], size: float, room: float) -> str:
    """The first (longest) label that fits ``room`` pixels, else the last."""
    for o in options:
        if text_w(o, size) <= room:
            return o
    return options[-1]


def layer_figure(summary: dict, name: str = "", stats: dict | None = None, config: dict | None = None,
                 scale: float = 1.0) -> Figure:
    """The four-panel picture of one layer (see the module doc) and its ``meta``."""
    d = layer_data(summary, stats)
    sz = _Sizes(scale)
    rows, cols = d["rows"], d["cols"]
    nr, nc = len(rows), len(cols)
    cell = int(max(3, min(32 * scale, math.floor(300 * scale / max(nr, nc, 1)))))
    gap = sz.px(3)
    ry = _edges(nr, cell, gap if rows and rows[-1]["label"] == ">k" and nr > 1 else 0)
    cx = _edges(nc, cell, gap if cols and cols[-1]["label"] == ">k" and nc > 1 else 0)
    H, W = ry[-1][1], cx[-1][1]
    t = d["totals"]
    region_rgb, arb_top = region_cell_colours(d["restored"], d["arbitrated"])

    # geometry of one panel
    strip, strip_gap = sz.px(6), sz.px(2)
    row_ticks = _ticks_shown(rows, ry, text_h(sz.tick) * 1.2)
    col_ticks = _ticks_shown(cols, cx, max(text_w(">k", sz.tick), text_w(str(nc), sz.tick)) + sz.px(4))
    ytick_w = max([text_w(rows[i]["label"], sz.tick) for i in row_ticks] + [text_w("00", sz.tick)]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    left = ylab_w + ytick_w + strip + strip_gap
    bw = sz.px(14)
    bar_labels = ["1e-10", "-1 opposite", "+1 same", "0 unrelated", "log scale"]
    legend_w = max(text_w(r, sz.axis) for r in REGION_COLOURS) + bw + sz.px(6)
    side_w = max(max(text_w(b, sz.tick) for b in bar_labels) + bw + sz.px(10), legend_w)
    side_gap = sz.px(12)
    panels_spec = [
        ("drift", "a  Distillation: how much it changed"),
        ("lora", "b  Your LoRA: how much it changes"),
        ("alignment", "c  Same direction or opposite?"),
        ("regions", "d  What CASA did"),
    ]
    title_need = max(text_w(ti, sz.panel_title, True) for _, ti in panels_spec) + sz.px(8)
    PW = max(left + W + side_gap + side_w, title_need)
    title_h = text_h(sz.panel_title) + sz.px(4)
    PH = title_h + strip + strip_gap + H + sz.px(3) + text_h(sz.tick) + sz.px(2) + text_h(sz.axis)
    col_gap, row_gap = sz.px(22), sz.px(16)
    m = sz.margin
    FW = 2 * m + 2 * PW + col_gap
    inner = FW - 2 * m

    # header: the layer, the verdict, the facts
    shape = (stats or {}).get("shape")
    verdict = layer_verdict(stats, t, config)
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
    if stats and stats.get("rel_error") is not None:
        facts.append(f"the low-rank patch keeps {fmt_share(1.0 - float(stats['rel_error']) ** 2)} of the update")
    if config:
        p = [f"{key} {config[key]:g}" for key in ("tau", "q_dom", "q_act", "energy") if isinstance(config.get(key), (int, float))]
        if p:
            facts.append(", ".join(p))
    verdict_lines = _wrap(verdict, sz.verdict, inner)
    fact_lines = _wrap(" \u00b7 ".join(facts), sz.subtitle, inner)
    header_h = (text_h(sz.title) + sz.px(4) + len(verdict_lines) * (text_h(sz.verdict) + sz.px(1)) + sz.px(3)
                + len(fact_lines) * (text_h(sz.subtitle) + sz.px(1)) + sz.px(10))

    # footer: one line per region, what it means for the LoRA; then how to read the axes
    sw = sz.px(12)
    legend = []
    for region in ("restored", "preserved", "arbitrated"):
        lines = _wrap(f"{region}: {REGION_MEANING[region]}", sz.note, inner - sw - sz.px(6))
        legend.append((region, lines))
    caption = ("Rows: output directions, columns: input directions of the base weight, in clusters numbered "
               "from the strongest (1); >k: all weaker directions together. Strips along the axes: dark where "
               "the distillation's strong (dominant) clusters are. d: orange deepens with the cell's arbitrated "
               f"share (full from {fmt_share(arb_top)}); hover a cell for its numbers.")
    cap_lines = _wrap(caption, sz.note, inner)
    note_h = text_h(sz.note) + sz.px(1)
    footer_h = sz.px(8) + sum(len(lines) for _, lines in legend) * note_h + sz.px(4) + len(cap_lines) * note_h
    FH = m + header_h + 2 * PH + row_gap + footer_h + m

    cv = Canvas(FW, FH)
    y = m
    cv.text(m, y, name or "layer", sz.title, INK, bold=True, tag="title")
    y += text_h(sz.title) + sz.px(4)
    for ln in verdict_lines:
        cv.text(m, y, ln, sz.verdict, INK, tag="verdict")
        y += text_h(sz.verdict) + sz.px(1)
    y += sz.px(3)
    for ln in fact_lines:
        cv.text(m, y, ln, sz.subtitle, GREY_TEXT, tag="subtitle")
        y += text_h(sz.subtitle) + sz.px(1)
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
    colours = {"drift": colours_log(d["drift_rms"]), "lora": colours_log(d["lora_rms"]), "alignment": cos_col,
               "regions": region_rgb}
    ylabel = _fit_label(["output clusters (strongest first)", "output clusters", "output"], sz.axis, H + strip)
    xlabel = _fit_label(["input clusters (strongest first)", "input clusters", "input"], sz.axis, W + 2 * ytick_w)
    meta_panels, colorbars = [], []
    for i, (pid, title) in enumerate(panels_spec):
        px0 = m + (i % 2) * (PW + col_gap)
        py0 = top + (i // 2) * (PH + row_gap)
        hx, hy = px0 + left, py0 + title_h + strip + strip_gap
        cv.text(px0, py0, title, sz.panel_title, INK, bold=True, tag=f"panel-title:{pid}")
        cv.blit(hx, hy, _paint_cells(colours[pid], ry, cx))
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
        cv.text(px0, hy + H / 2, ylabel, sz.axis, INK, anchor="lm", rotate=True, tag="ylabel")
        cv.text(hx + W / 2, hy + H + sz.px(3) + text_h(sz.tick) + sz.px(2), xlabel, sz.axis,
                INK, anchor="mt", tag="xlabel")
        meta_panels.append({"id": pid, "title": title, "x0": hx, "y0": hy, "w": W, "h": H,
                            "x": [[hx + a, hx + b] for a, b in cx], "y": [[hy + a, hy + b] for a, b in ry]})
        # side: colour bar or legend
        sx = hx + W + side_gap
        if pid in ("drift", "lora"):
            box = _colorbar(cv, sx, hy, bw, H, VIRIDIS, log_ticks, sz, caption="log scale")
            colorbars.append({"panel": pid, **box, "map": "viridis", "scale": "log", "lo": 10 ** lo, "hi": 10 ** hi})
        elif pid == "alignment":
            ticks = [(0.0, "-1 opposite"), (0.25, "-0.5"), (0.5, "0 unrelated"), (0.75, "+0.5"), (1.0, "+1 same")]
            box = _colorbar(cv, sx, hy, bw, H, RDBU, ticks, sz)
            colorbars.append({"panel": pid, **box, "map": "rdbu", "scale": "linear", "lo": -1.0, "hi": 1.0})
            if not np.isfinite(cos).all():  # below the bottom tick label
                yy = hy + H + text_h(sz.tick) / 2 + sz.px(3)
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
            cv.text(sx, yy + text_h(sz.tick), "entries", sz.tick, GREY_TEXT, tag="legend-note")
    # footer: the region legend, then the caption
    y = top + 2 * PH + row_gap + sz.px(8)
    for region, lines in legend:
        cv.rect(m, y + (text_h(sz.note) - sw) / 2, sw, sw, REGION_COLOURS[region])
        for ln in lines:
            cv.text(m + sw + sz.px(6), y, ln, sz.note, INK, tag=f"meaning:{region}")
            y += note_h
    y += sz.px(4)
    for ln in cap_lines:
        cv.text(m, y, ln, sz.note, GREY_TEXT, tag="note")
        y += note_h

    meta = {
        "kind": "layer", "layer": name, "width": FW, "height": FH, "scale": scale,
        "shape": list(shape) if shape else None, "k": d["k"], "clusters": d["n_clusters"],
        "groups": d["n_groups"], "merged": d["merged"], "transposed": d["transposed"],
        "panels": meta_panels, "colorbars": colorbars, "rows": rows, "cols": cols,
        "values": {key: _grid_json(d[key]) for key in ("drift_rms", "lora_rms", "cos", "restored", "preserved", "arbitrated")}
        | {"entries": [[int(v) for v in row] for row in d["entries"]]},
        "totals": t, "region_colours": {k_: list(v) for k_, v in REGION_COLOURS.items()},
        "arbitrated_full": arb_top, "verdict": verdict, "meaning": dict(REGION_MEANING),
        "min_text_px": min(r["size"] for r in cv.texts),
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
    t = layer_totals(layers)
    out = {"layers": t.layers, "kept": t.kept_energy}
    if t.dominant_share is not None:
        out["dominant"] = t.dominant_share
        out["arbitrated"] = t.arbitrated_share
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
        ("dominant", "Protected (dominant) share", VIRIDIS, 0.0, 1.0),
        ("arbitrated", "Arbitrated share", ORANGES, 0.0, arb_top),
        ("kept", "Update kept by the patch", VIRIDIS, 0.0, 1.0),
    ]
    cw = int(max(10, min(22, math.floor(200 / nc))) * scale)
    ch = int(max(6, min(30, math.floor(520 / nr))) * scale)
    cx = _edges(nc, cw, 0)
    ry = _edges(nr, ch, 0)
    H, W = ry[-1][1], cx[-1][1]
    row_ticks = [i for i in range(nr) if nr <= 1 or _tick_step(ch, text_h(sz.tick) * 0.9) == 1
                 or i % _tick_step(ch, text_h(sz.tick) * 0.9) == 0 or row_labels[i] == "other"]
    ytick_w = max(text_w(lab, sz.tick) for lab in row_labels + ["00"]) + sz.px(4)
    ylab_w = text_h(sz.axis) + sz.px(4)
    xlab_h = max(text_w(p, sz.tick) for p in projs) + sz.px(6) if projs else 0
    side_gap = sz.px(10)
    side_w = max(text_w(lab, sz.tick) for lab in ("100%", "12.5%")) + sz.px(12 + 10)
    left = ylab_w + ytick_w
    title_h = text_h(sz.panel_title) + sz.px(6)
    PW = max(left + W + side_gap + side_w, text_w(specs[2][1], sz.panel_title, True) + sz.px(8))
    PH = title_h + max(H + sz.px(4) + xlab_h, sz.px(150) + sz.px(4))
    m = sz.margin
    gap = sz.px(18)
    FW = 2 * m + 3 * PW + 2 * gap
    tot = _totals(layers)
    sub_bits = [f"{len(layers)} layers"]
    if tot.get("dominant") is not None:
        sub_bits.append(f"protected (dominant) {fmt_share(tot['dominant'])} of the routing entries")
        sub_bits.append(f"arbitrated {fmt_share(tot['arbitrated'])}")
    if tot.get("kept") is not None:
        sub_bits.append(f"the low-rank patch keeps {fmt_share(tot['kept'])} of the update")
    sub = " \u00b7 ".join(sub_bits)
    picks = interesting_layers(layers)
    lines = []
    labels = {"arbitrated": "most arbitrated", "dominant": "most protected", "kept": "least kept by the patch"}
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
        "verdicts": [[layer_verdict(layers[n]) if n is not None else None for n in row] for row in names],
        "min_text_px": min(r["size"] for r in cv.texts),
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
