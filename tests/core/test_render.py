"""The heatmap pictures: their CONTENT (cell colours, region shares, colour bars, text), not only
that a picture exists.  Constructed cases with known values, plus a real tiny transfer."""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from casa_core import LayerRecord, RoutingStats, RoutingSummary, fonts, synth
from casa_core.pictures import ORANGES, RDBU, VIRIDIS, Canvas, colormap, invert_colormap
from casa_core.pictures import decode_png, encode_png, read_png
from casa_core.pictures import (
    REGION_COLOURS, auto_layer, fmt_share, interesting_layers, layer_figure, layer_index,
    log_range, overview_figure, split_layer_name,
)
from casa_core.routing_data import cluster_groups

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def panel(fig, pid):
    return next(p for p in fig.meta["panels"] if p["id"] == pid)


def cell_pixels(fig, pid, r, c, inset=0):
    p = panel(fig, pid)
    (x0, x1), (y0, y1) = p["x"][c], p["y"][r]
    return fig.rgb[y0 + inset:y1 - inset, x0 + inset:x1 - inset].astype(np.float64)


def centre(fig, pid, r, c):
    p = panel(fig, pid)
    (x0, x1), (y0, y1) = p["x"][c], p["y"][r]
    return fig.rgb[(y0 + y1) // 2, (x0 + x1) // 2].astype(np.float64)


def region_cell(pixels: np.ndarray) -> tuple[str, float]:
    """A region cell's reading: ("restored", 0) for blue, else ("dominant", t) where t in 0..1 is how far
    its one flat colour has moved from the preserved grey towards the arbitrated orange."""
    assert np.ptp(pixels, axis=(0, 1)).max() <= 1, "a region cell is one flat colour"
    px = pixels[0, 0]
    if np.abs(px - REGION_COLOURS["restored"]).max() <= 1:
        return "restored", 0.0
    grey = np.asarray(REGION_COLOURS["preserved"], dtype=np.float64)
    d = np.asarray(REGION_COLOURS["arbitrated"], dtype=np.float64) - grey
    t = float((px - grey) @ d / (d @ d))
    assert np.abs(grey + t * d - px).max() <= 1.5, f"{px} is neither blue nor on the grey-orange line"
    return "dominant", t


def arbitrated_full(restored: np.ndarray, arbitrated: np.ndarray) -> float:
    """Where the orange is full, restated: the 90th percentile (numpy's linear rule) of the non-zero
    arbitrated shares of the cells that are not mostly restored (the maximum below 5 such cells)."""
    vals = sorted(float(a) for r, a in zip(restored.ravel(), arbitrated.ravel()) if r < 0.5 and a > 0)
    if not vals:
        return 0.0
    if len(vals) < 5:
        return vals[-1]
    pos = 0.9 * (len(vals) - 1)
    lo = math.floor(pos)
    return vals[lo] + (vals[min(lo + 1, len(vals) - 1)] - vals[lo]) * (pos - lo)


def expected_text_pixels(rec, bg=(255, 255, 255)):
    m = fonts.text_mask(rec["text"], rec["size"], rec["bold"])
    if rec["rotate"]:
        m = np.rot90(m)
    m = m[..., None].astype(np.float64)
    return np.round(np.asarray(bg, float) * (1 - m) + np.asarray(rec["color"], float) * m)


def assert_text_drawn(fig, text=None, tag=None, min_ink=20):
    """Some recorded string (by text or tag) is really in the picture, glyph for glyph."""
    recs = [t for t in fig.meta["texts"] if (text is None or t["text"] == text) and (tag is None or t["tag"] == tag)]
    assert recs, f"no text {text!r} (tag {tag}) in {[t['text'] for t in fig.meta['texts']][:40]}"
    for rec in recs:
        got = fig.rgb[rec["y"]:rec["y"] + rec["h"], rec["x"]:rec["x"] + rec["w"]].astype(np.float64)
        exp = expected_text_pixels(rec)
        assert got.shape == exp.shape
        assert np.abs(got - exp).max() <= 1.0, f"text {rec['text']!r} is not intact in the picture"
        assert (exp.min(axis=2) < 128).sum() >= min_ink, f"text {rec['text']!r} has almost no ink"
    return recs


def record(shape, rel_error: float = 0.0, routing: RoutingStats | None = None) -> LayerRecord:
    """A layer's report record as the pictures read it: its shape, the patch's error and CASA's counts
    (no drift size: the generic verdict)."""
    return LayerRecord(tuple(shape), lora_rank=8, lora_norm=1.0, update_norm=1.0, rel_error=rel_error, out_rank=8,
                       kind="lowrank", stats=routing)


def counts(entries: int, dominant: int, arbitrated: int, k: int = 0, clusters: int = 0) -> RoutingStats:
    return RoutingStats(k=k, clusters=clusters, dominant_recv_clusters=0, dominant_send_clusters=0, dominant_rows=0,
                        dominant_cols=0, entries=entries, dominant_entries=dominant, candidates=0,
                        arbitrated_entries=arbitrated, arbitration_threshold=None)


def make_summary(rows_sizes, cols_beyond, drift_e, lora_e, dot, restored, arbitrated, clusters_per_group=None,
                 rows_beyond=None, recv_dom=None, send_dom=None):
    """A routing summary's tensors (:class:`RoutingSummary` fields) from group-level values: square top-k block with
    groups of ``rows_sizes`` directions, plus a beyond-k group of ``rows_beyond`` rows and
    ``cols_beyond`` columns (working orientation, rows >= cols)."""
    sizes = list(rows_sizes)
    n = len(sizes)
    g = n + 1
    cpg = clusters_per_group or [1] * n
    cluster_group = np.repeat(np.arange(n), cpg)
    n_clusters = len(cluster_group)
    # each group's directions spread over its clusters
    labels = []
    c0 = 0
    for a, (sz, nc) in enumerate(zip(sizes, cpg)):
        per = np.array_split(np.arange(sz), nc)
        for j, part in enumerate(per):
            labels += [c0 + j] * len(part)
        c0 += nc
    k = sum(sizes)
    rb = rows_beyond if rows_beyond is not None else cols_beyond
    r = np.array(sizes + [rb], dtype=np.float64)
    c = np.array(sizes + [cols_beyond], dtype=np.float64)
    count = np.outer(r, c)
    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)
    return {
        "drift_energy": t(drift_e), "lora_energy": t(lora_e), "dot": t(dot), "count": t(count),
        "restored": t(restored), "arbitrated": t(arbitrated),
        "labels": torch.tensor(labels, dtype=torch.int32),
        "cluster_group": torch.tensor(cluster_group, dtype=torch.int32),
        "recv_dominant": torch.tensor(recv_dom if recv_dom is not None else [0] * n_clusters, dtype=torch.uint8),
        "send_dominant": torch.tensor(send_dom if send_dom is not None else [0] * n_clusters, dtype=torch.uint8),
        "rho_recv": torch.zeros(n_clusters), "rho_send": torch.zeros(n_clusters),
        "cosine_groups": t(np.zeros((g, g))),
    }, k, count


@pytest.fixture(scope="module")
def constructed():
    """4 groups (sizes 3, 5, 2, 6) + beyond-k (10 rows and columns) with known per-cell values."""
    rng = np.random.default_rng(0)
    sizes = [3, 5, 2, 6]
    g = 5
    s, k, count = make_summary(sizes, 10, np.zeros((g, g)), np.zeros((g, g)), np.zeros((g, g)),
                               np.zeros((g, g)), np.zeros((g, g)), rows_beyond=10)
    cos = rng.uniform(-1, 1, size=(g, g))
    cos[0, 0], cos[0, 1], cos[1, 0], cos[2, 2] = 1.0, -1.0, 0.0, 0.5
    drift_rms = 10 ** rng.uniform(-5, -2, size=(g, g))
    lora_rms = 10 ** rng.uniform(-4, -1, size=(g, g))
    drift_rms[3, 4] = 0.0  # no drift energy: undefined alignment
    de, le = drift_rms ** 2 * count, lora_rms ** 2 * count
    dot = cos * np.sqrt(de * le)
    rest = np.floor(rng.uniform(0, 1, size=(g, g)) * count)
    arb = np.floor(rng.uniform(0, 1, size=(g, g)) * (count - rest))
    rest[1, 1], arb[1, 1] = 0, count[1, 1]          # all arbitrated
    rest[2, 3], arb[2, 3] = count[2, 3], 0          # all restored
    rest[0, 2], arb[0, 2] = 0, 0                    # all preserved
    s.update({
        "drift_energy": torch.tensor(de, dtype=torch.float32), "lora_energy": torch.tensor(le, dtype=torch.float32),
        "dot": torch.tensor(dot, dtype=torch.float32), "restored": torch.tensor(rest, dtype=torch.float32),
        "arbitrated": torch.tensor(arb, dtype=torch.float32),
    })
    s["recv_dominant"] = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    s["send_dominant"] = torch.tensor([0, 1, 0, 0], dtype=torch.uint8)
    truth = {"cos": cos, "drift_rms": drift_rms, "lora_rms": lora_rms, "restored": rest / count,
             "arbitrated": arb / count, "count": count}
    return RoutingSummary.from_tensors(s), truth


# ------------------------------------------------------------------------------------------------
# text and colour maps
# ------------------------------------------------------------------------------------------------


def test_text_masks_have_ink_grow_with_the_string_and_differ_between_strings():
    a = fonts.text_mask("receiving clusters", 12)
    b = fonts.text_mask("receiving clusters (output)", 12)
    c = fonts.text_mask("sending clusters", 12)
    assert a.shape[0] == fonts.line_height(12) and a.shape[1] == fonts.text_width("receiving clusters", 12)
    assert b.shape[1] > a.shape[1]
    assert a.max() > 0.9 and 0.1 < a.mean() < 0.5
    assert not np.array_equal(a[:, :c.shape[1]], c[:, :a.shape[1]])
    # bigger sizes scale the line height; bold adds ink
    assert fonts.line_height(24) >= 2 * fonts.line_height(12) - 1
    assert fonts.text_mask("x", 20, bold=True).sum() > fonts.text_mask("x", 20).sum()
    # unknown characters fall back to '?', minus and times to '-' and 'x'
    assert np.array_equal(fonts.text_mask("\u2212", 12), fonts.text_mask("-", 12))
    assert np.array_equal(fonts.text_mask("\u4e2d", 12), fonts.text_mask("?", 12))


def test_canvas_records_text_that_is_really_drawn():
    cv = Canvas(300, 60)
    cv.text(10, 10, "blocks.3.ffn.0", 14, (20, 20, 20), tag="t")
    cv.text(200, 55, "sending", 11, (0, 0, 0), anchor="mb", rotate=True, tag="r")
    fig = type("F", (), {"rgb": cv.rgb(), "meta": {"texts": cv.texts}})
    assert_text_drawn(fig, "blocks.3.ffn.0")
    rec = assert_text_drawn(fig, "sending")[0]
    assert rec["h"] > rec["w"]  # rotated


def test_colormaps_are_invertible_and_viridis_lightness_rises():
    t = np.linspace(0, 1, 101)
    for anchors in (VIRIDIS, RDBU, ORANGES):
        back = invert_colormap(anchors, np.round(colormap(anchors, t)))
        assert np.abs(back - t).max() < 0.02
    lum = colormap(VIRIDIS, t) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lum) > 0)
    assert np.allclose(colormap(RDBU, 0.5), [247, 247, 247])  # cosine 0 is white


def test_share_formatting():
    assert fmt_share(0.5) == "50.0%"
    assert fmt_share(0.0351) == "3.51%"
    assert fmt_share(0.0) == "0%"
    assert fmt_share(1e-6) == "<0.01%"
    assert fmt_share(0.9996) == "99.96%" and fmt_share(0.99999) == ">99.99%" and fmt_share(1.0) == "100.0%"
    assert fmt_share(None) == "n/a"


# ------------------------------------------------------------------------------------------------
# one layer, constructed
# ------------------------------------------------------------------------------------------------


def test_alignment_map_colours_match_the_known_cosines(constructed):
    s, truth = constructed
    fig = layer_figure(s, "blocks.7.self_attn.q", record((26, 26)))
    g = truth["cos"].shape[0]
    for r in range(g):
        for c in range(g):
            px = cell_pixels(fig, "alignment", r, c)
            assert np.ptp(px, axis=(0, 1)).max() == 0, "an alignment cell is one flat colour"
            if truth["drift_rms"][r, c] == 0:
                assert np.allclose(px[0, 0], (215, 215, 215)), "undefined alignment is grey, not white"
                continue
            got = 2 * invert_colormap(RDBU, px[0, 0]) - 1
            assert abs(got - truth["cos"][r, c]) < 0.02, (r, c, got, truth["cos"][r, c])
    # the read-out values are the same numbers
    vals = np.array(fig.meta["values"]["cos"], dtype=np.float64)
    ok = truth["drift_rms"] > 0
    assert np.allclose(vals[ok], truth["cos"][ok], atol=1e-3)
    assert fig.meta["values"]["cos"][3][4] is None
    assert_text_drawn(fig, "no energy")


def test_energy_maps_share_one_log_scale_and_match_the_rms(constructed):
    s, truth = constructed
    fig = layer_figure(s, "L", record((26, 26)))
    bars = {b["panel"]: b for b in fig.meta["colorbars"]}
    assert bars["drift"]["lo"] == bars["lora"]["lo"] and bars["drift"]["hi"] == bars["lora"]["hi"]
    lo, hi = math.log10(bars["drift"]["lo"]), math.log10(bars["drift"]["hi"])
    assert (lo, hi) == pytest.approx(log_range(truth["drift_rms"], truth["lora_rms"]))
    for pid, key in (("drift", "drift_rms"), ("lora", "lora_rms")):
        for (r, c), v in np.ndenumerate(truth[key]):
            px = centre(fig, pid, r, c)
            if v == 0:
                assert np.allclose(px, (215, 215, 215))
                continue
            t = invert_colormap(VIRIDIS, px)
            want = min(max((math.log10(v) - lo) / (hi - lo), 0.0), 1.0)
            assert abs(t - want) < 0.02, (pid, r, c)
    # the same cell is brighter in the panel with more energy (shared scale)
    ratio = np.where(truth["drift_rms"] > 0, truth["lora_rms"] / np.maximum(truth["drift_rms"], 1e-30), 0)
    r, c = np.unravel_index(np.argmax(ratio), ratio.shape)
    assert invert_colormap(VIRIDIS, centre(fig, "lora", r, c)) > invert_colormap(VIRIDIS, centre(fig, "drift", r, c))


def test_region_map_colours_each_cell_by_its_region_and_the_legend_gives_the_shares(constructed):
    """Whole cells, one colour each: blue where most entries are restored, else the dominant region's
    grey deepening to orange with the cell's arbitrated share; the exact shares are in the legend."""
    s, truth = constructed
    fig = layer_figure(s, "L", record((26, 26)))
    g = truth["cos"].shape[0]
    top = arbitrated_full(truth["restored"], truth["arbitrated"])
    assert top > 0 and fig.meta["arbitrated_full"] == pytest.approx(top)
    for r in range(g):
        for c in range(g):
            kind, t = region_cell(cell_pixels(fig, "regions", r, c))
            if truth["restored"][r, c] >= 0.5:
                assert kind == "restored", (r, c)
            else:
                assert kind == "dominant", (r, c)
                assert t == pytest.approx(min(truth["arbitrated"][r, c] / top, 1.0), abs=0.01), (r, c)
    # the known pure cells
    assert region_cell(cell_pixels(fig, "regions", 1, 1)) == ("dominant", pytest.approx(1.0, abs=0.01))  # all arbitrated
    assert region_cell(cell_pixels(fig, "regions", 2, 3))[0] == "restored"                               # all restored
    assert region_cell(cell_pixels(fig, "regions", 0, 2)) == ("dominant", pytest.approx(0.0, abs=0.01))  # all preserved
    cell_h = panel(fig, "regions")["y"][0][1] - panel(fig, "regions")["y"][0][0]
    assert cell_h >= 6
    # the printed shares are the layer's shares (entry-weighted, computed here from the known counts)
    total = truth["count"].sum()
    rest = (truth["restored"] * truth["count"]).sum() / total
    arb = (truth["arbitrated"] * truth["count"]).sum() / total
    assert_text_drawn(fig, fmt_share(rest), tag="share:restored")
    assert_text_drawn(fig, fmt_share(arb), tag="share:arbitrated")
    assert_text_drawn(fig, fmt_share(1 - rest - arb), tag="share:preserved")
    assert fig.meta["totals"]["restored"] == pytest.approx(rest) and fig.meta["totals"]["arbitrated"] == pytest.approx(arb)
    # the cells' own shares go to the hover read-out
    assert np.allclose(np.array(fig.meta["values"]["arbitrated"], float), truth["arbitrated"], atol=1e-3)
    # one line per region says what it means for the LoRA
    for region in ("restored", "preserved", "arbitrated"):
        recs = assert_text_drawn(fig, tag=f"meaning:{region}")
        assert recs[0]["text"].startswith(f"{region}: ")
    assert "LoRA" in " ".join(t["text"] for t in fig.meta["texts"] if t["tag"] == "meaning:restored")


def test_colour_bars_are_monotonic_and_ticks_sit_at_their_values(constructed):
    s, _ = constructed
    fig = layer_figure(s, "L", record((26, 26)))
    maps = {"viridis": VIRIDIS, "rdbu": RDBU}
    for bar in fig.meta["colorbars"]:
        col = fig.rgb[bar["y"]:bar["y"] + bar["h"], bar["x"] + bar["w"] // 2].astype(np.float64)
        t = invert_colormap(maps[bar["map"]], col)
        assert np.all(np.diff(t) <= 1e-9), f"{bar['panel']} colour bar is not monotonic"
        assert t[0] > 0.98 and t[-1] < 0.02
    ticks = [t for t in fig.meta["texts"] if t["tag"] == "colorbar-tick"]
    align = next(b for b in fig.meta["colorbars"] if b["panel"] == "alignment")
    zero = next(t for t in ticks if t["text"] == "0 unrelated" and t["x"] > align["x"])
    assert zero["y"] + zero["h"] / 2 == pytest.approx(align["y"] + align["h"] / 2, abs=1.5)
    drift = next(b for b in fig.meta["colorbars"] if b["panel"] == "drift")
    lo, hi = math.log10(drift["lo"]), math.log10(drift["hi"])
    decade_ticks = [t for t in ticks if t["text"].startswith("1e") and drift["x"] < t["x"] < drift["x"] + 80]
    assert len(decade_ticks) >= 2
    for t in decade_ticks:
        v = float(t["text"])
        y_want = drift["y"] + (1 - (math.log10(v) - lo) / (hi - lo)) * drift["h"]
        assert t["y"] + t["h"] / 2 == pytest.approx(y_want, abs=1.5)


def test_layer_picture_names_the_layer_and_labels_its_axes(constructed):
    s, _ = constructed
    fig = layer_figure(s, "blocks.7.self_attn.q", record((26, 26), rel_error=0.1),
                       {"tau": 0.5, "q_dom": 0.5, "q_act": 0.85, "energy": 0.9})
    assert_text_drawn(fig, "blocks.7.self_attn.q", tag="title")
    ylabels, xlabels = assert_text_drawn(fig, tag="ylabel"), assert_text_drawn(fig, tag="xlabel")
    assert len(ylabels) == len(xlabels) == 4
    assert all(t["text"].startswith("output clusters") for t in ylabels)
    assert all(t["text"].startswith("input clusters") for t in xlabels)
    # a one-line verdict in plain words (the record carries no drift size here: the generic one)
    verdict = " ".join(t["text"] for t in assert_text_drawn(fig, tag="verdict"))
    assert verdict == fig.meta["verdict"] and "LoRA" in verdict
    for pid in ("drift", "lora", "alignment", "regions"):
        assert_text_drawn(fig, tag=f"panel-title:{pid}")
    sub = " ".join(t["text"] for t in fig.meta["texts"] if t["tag"] == "subtitle")
    assert "k = 16" in sub and "4 clusters" in sub and "26 x 26" in sub
    assert "keeps 99.0%" in sub and "q_act 0.85" in sub
    assert [r["label"] for r in fig.meta["rows"]] == ["1", "2", "3", "4", ">k"]
    assert_text_drawn(fig, ">k", tag="row-tick")
    # dominance strips: receiving groups 1 and 3 dark on the left, sending group 2 on top
    p = panel(fig, "drift")
    strip_x = p["x0"] - 5
    dark = [fig.rgb[(a + b) // 2, strip_x].mean() < 100 for a, b in p["y"]]
    assert dark == [True, False, True, False, False]
    strip_y = p["y0"] - 5
    dark = [fig.rgb[strip_y, (a + b) // 2].mean() < 100 for a, b in p["x"]]
    assert dark == [False, True, False, False, False]
    json.dumps(fig.meta, allow_nan=False)


def test_a_wide_layer_is_shown_out_x_in_with_the_beyond_k_group_on_the_senders():
    """Routing data of an out < in layer come from its transpose; the picture turns them back."""
    g = 3
    rng = np.random.default_rng(1)
    de = rng.uniform(1, 2, size=(g, g))
    de[2, :] = 100.0  # working rows beyond k (the layer's inputs) carry a lot of drift
    s, k, count = make_summary([4, 4], 0, de, de, de, np.zeros((g, g)), np.zeros((g, g)), rows_beyond=24)
    s["drift_energy"] = torch.tensor(de * count, dtype=torch.float32)
    s["lora_energy"] = torch.tensor(np.ones((g, g)) * count, dtype=torch.float32)
    s["dot"] = torch.zeros(g, g)
    s["recv_dominant"] = torch.tensor([1, 0], dtype=torch.uint8)
    s = RoutingSummary.from_tensors(s)
    tall = layer_figure(s, "blocks.0.ffn.0", record((32, 8)))
    wide = layer_figure(s, "blocks.0.ffn.2", record((8, 32)))
    assert [r["label"] for r in tall.meta["rows"]] == ["1", "2", ">k"]
    assert [c["label"] for c in tall.meta["cols"]] == ["1", "2"]
    assert [r["label"] for r in wide.meta["rows"]] == ["1", "2"]
    assert [c["label"] for c in wide.meta["cols"]] == ["1", "2", ">k"]
    assert wide.meta["cols"][-1]["n"] == 24 and wide.meta["transposed"]
    assert np.array(wide.meta["values"]["drift_rms"]) == pytest.approx(np.array(tall.meta["values"]["drift_rms"]).T, rel=1e-3)
    # receiving dominance of the working orientation marks the wide layer's SENDING clusters
    assert wide.meta["cols"][0]["dominant"] == 1.0 and wide.meta["rows"][0]["dominant"] == 0.0
    # the bright beyond-k drift is a column of the wide picture
    assert invert_colormap(VIRIDIS, centre(wide, "drift", 0, 2)) > 0.9


@pytest.mark.parametrize("width, k", [(1536, 700), (5120, 2300)])
def test_pictures_stay_legible_for_full_size_wan_layers(width, k):
    """Hundreds of clusters are merged into at most 48 groups + '>k': cells of several pixels,
    tick labels that do not collide, text of at least 11 px."""
    rng = np.random.default_rng(width)
    n_clusters = k * 3 // 4
    labels = np.sort(rng.integers(0, n_clusters, size=k))
    labels = np.unique(labels, return_inverse=True)[1]  # clusters 0..M-1 in order
    n_clusters = int(labels.max()) + 1
    cg = cluster_groups(torch.tensor(labels), n_clusters).numpy()
    n = int(cg.max()) + 1
    sizes = np.bincount(cg[labels], minlength=n)
    r = np.append(sizes, width - k).astype(np.float64)
    count = np.outer(r, r)
    e = rng.uniform(0.5, 2, size=count.shape) * count
    s = {
        "drift_energy": torch.tensor(e), "lora_energy": torch.tensor(e[::-1].copy()), "dot": torch.tensor(0.3 * e),
        "count": torch.tensor(count), "restored": torch.tensor(np.floor(count / 2)), "arbitrated": torch.tensor(np.floor(count / 20)),
        "labels": torch.tensor(labels, dtype=torch.int32), "cluster_group": torch.tensor(cg, dtype=torch.int32),
        "recv_dominant": torch.tensor(rng.integers(0, 2, n_clusters), dtype=torch.uint8),
        "send_dominant": torch.tensor(rng.integers(0, 2, n_clusters), dtype=torch.uint8),
        "rho_recv": torch.zeros(n_clusters), "rho_send": torch.zeros(n_clusters), "cosine_groups": torch.zeros(count.shape),
    }
    s = RoutingSummary.from_tensors(s)
    fig = layer_figure(s, "blocks.39.self_attn.o", record((width, width)))
    h, w, _ = fig.rgb.shape
    assert w <= 1300 and h <= 1100, "the picture must fit a node preview"
    p = panel(fig, "regions")
    assert len(p["x"]) <= 49 and min(b - a for a, b in p["x"]) >= 6
    assert f"{n_clusters} clusters, shown as {n} groups" in " ".join(t["text"] for t in fig.meta["texts"])
    d = panel(fig, "drift")
    inside = {  # the tick labels of one panel
        "row-tick": lambda t: t["x"] < d["x0"] and d["y0"] - 10 <= t["y"] <= d["y0"] + d["h"],
        "col-tick": lambda t: d["y0"] + d["h"] < t["y"] < d["y0"] + d["h"] + 30 and d["x0"] - 10 <= t["x"] <= d["x0"] + d["w"],
    }
    for tag, axis in (("row-tick", "y"), ("col-tick", "x")):
        boxes = sorted((t[axis], t[axis] + (t["h"] if axis == "y" else t["w"]))
                       for t in fig.meta["texts"] if t["tag"] == tag and inside[tag](t))
        assert len(boxes) >= 6
        assert all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:])), f"{tag} labels overlap: {boxes}"
    assert min(t["size"] for t in fig.meta["texts"]) >= 11
    # print resolution for the CLI
    big = layer_figure(s, "blocks.39.self_attn.o", record((width, width)), scale=2)
    assert big.rgb.shape[1] >= 2 * w - 4


# ------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------

PROJS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
         "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


@pytest.fixture(scope="module")
def model_stats():
    rng = np.random.default_rng(3)
    layers = {}
    for b in range(30):
        for p in PROJS:
            ent = 1536 * 1536
            dom, arb = int(rng.uniform(0.3, 0.7) * ent), int(rng.uniform(0.0, 0.04) * ent)
            rel_error = float(rng.uniform(0.0, 0.8))
            if (b, p) == (17, "cross_attn.v"):
                arb = int(0.09 * ent)
            layers[f"blocks.{b}.{p}"] = record((1536, 1536), rel_error, counts(ent, dom, arb, k=700, clusters=500))
    return layers


def test_overview_cells_show_each_layers_shares(model_stats):
    fig = overview_figure(model_stats, selected="blocks.3.ffn.0")
    assert [c["label"] for c in fig.meta["cols"]] == PROJS
    assert [r["label"] for r in fig.meta["rows"]] == [str(b) for b in range(30)]
    arb_bar = next(b for b in fig.meta["colorbars"] if b["panel"] == "arbitrated")
    assert arb_bar["hi"] == pytest.approx(0.1)  # a round top above the largest share (9 %)
    for name in ("blocks.0.self_attn.q", "blocks.17.cross_attn.v", "blocks.29.ffn.2"):
        b, p = split_layer_name(name)
        r, c = b, PROJS.index(p)
        s = model_stats[name]
        assert fig.meta["names"][r][c] == name
        dom = invert_colormap(VIRIDIS, centre(fig, "dominant", r, c))
        assert dom == pytest.approx(s.stats.dominant_entries / s.stats.entries, abs=0.02)
        arb = invert_colormap(ORANGES, centre(fig, "arbitrated", r, c)) * arb_bar["hi"]
        assert arb == pytest.approx(s.stats.arbitrated_entries / s.stats.entries, abs=0.003)
        kept = invert_colormap(VIRIDIS, centre(fig, "kept", r, c))
        assert kept == pytest.approx(1 - s.rel_error ** 2, abs=0.02)
    # the selected layer is outlined in black in every panel
    for pid in ("dominant", "arbitrated", "kept"):
        p = panel(fig, pid)
        (x0, x1), (y0, y1) = p["x"][PROJS.index("ffn.0")], p["y"][3]
        assert fig.rgb[y0 - 1, (x0 + x1) // 2].max() < 40 and fig.rgb[(y0 + y1) // 2, x0 - 1].max() < 40
    text = " ".join(t["text"] for t in fig.meta["texts"])
    assert "most arbitrated: blocks.17.cross_attn.v 9.00%" in text
    assert_text_drawn(fig, "self_attn.q", tag="col-tick")
    assert_text_drawn(fig, "CASA transfer overview", tag="title")
    assert fig.rgb.shape[1] <= 1500 and fig.rgb.shape[0] <= 900


def test_overview_marks_layers_without_routing_statistics(model_stats):
    stats = {n: record((1536, 1536), rel_error=0.5) for n in list(model_stats)[:20]}
    fig = overview_figure(stats)
    assert np.allclose(centre(fig, "dominant", 0, 0), (215, 215, 215))
    assert invert_colormap(VIRIDIS, centre(fig, "kept", 0, 0)) == pytest.approx(0.75, abs=0.02)
    assert fig.meta["values"]["dominant"][0][0] is None


def test_picking_layers(model_stats):
    assert auto_layer(model_stats) == "blocks.17.cross_attn.v"
    picks = interesting_layers(model_stats)
    assert picks["arbitrated"][0][0] == "blocks.17.cross_attn.v"
    assert picks["kept"][0][1] == min(1 - s.rel_error ** 2 for s in model_stats.values())
    idx = layer_index(["blocks.10.ffn.2", "blocks.2.self_attn.q", "head.head", "blocks.2.ffn.0", "blocks.10.cross_attn.k_img"])
    assert [r["name"] for r in idx] == ["blocks.2.self_attn.q", "blocks.2.ffn.0", "blocks.10.cross_attn.k_img",
                                        "blocks.10.ffn.2", "head.head"]
    assert idx[0]["block"] == 2 and idx[0]["projection"] == "self_attn.q" and idx[-1]["block"] is None


# ------------------------------------------------------------------------------------------------
# a real transfer: the pictures agree with the transfer report
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from casa_core.basis import load_or_build_basis
    from casa_core.drift import WeightDifference, load_or_build_drift
    from casa_core.factorize import OutputSpec
    from casa_core.formats.checkpoint import Checkpoint
    from casa_core.formats.lora import read_lora
    from casa_core.formats.safetensors_io import write_file
    from casa_core.transfer import TransferConfig, TransferReport, config_dict, iter_transfer

    d = tmp_path_factory.mktemp("render_trio")
    shape = synth.WanShape(dim=128, ffn_dim=256, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    write_file(str(d / "base.safetensors"), base)
    write_file(str(d / "distilled.safetensors"), synth.distill(base, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(d / "lora.safetensors"), synth.style_lora(svd, rank=8, alpha=4.0))
    cache = d / "cache"
    src, tgt = Checkpoint(d / "base.safetensors", memo_dir=cache), Checkpoint(d / "distilled.safetensors", memo_dir=cache)
    basis = load_or_build_basis(src, cache, storage="float32")
    drift = load_or_build_drift(basis, WeightDifference(src, tgt), cache)
    lora = read_lora(d / "lora.safetensors", basis.layers)
    cfg = TransferConfig(output=OutputSpec(mode="lowrank", rank=4))
    report = TransferReport(cfg.method, config_dict(cfg, 1.0))
    summaries = {r.layer: r.summary for r in iter_transfer(lora, basis, drift, cfg, report)}
    return d, report, summaries


@pytest.mark.parametrize("layer", ["blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.0.ffn.2"])
def test_region_map_of_a_real_transfer_matches_the_report(real_run, layer):
    _, report, summaries = real_run
    st = report.layers[layer]
    fig = layer_figure(summaries[layer], layer, st, report.config)
    dominant = st.routing.dominant_entries / st.routing.entries
    arbitrated = st.routing.arbitrated_entries / st.routing.entries
    assert fig.meta["totals"]["dominant"] == pytest.approx(dominant, abs=1e-6)
    assert fig.meta["totals"]["arbitrated"] == pytest.approx(arbitrated, abs=1e-6)
    assert fig.meta["totals"]["entries"] == st.routing.entries
    # the regions are whole cells, each in its majority region (blue: mostly restored): the blue cells
    # hold the restored entries up to the minority entries of mixed cells (groups of clusters of
    # different dominance, e.g. on FFN layers with more dominance runs than groups)
    rows, cols = fig.meta["rows"], fig.meta["cols"]
    entries = np.array(fig.meta["values"]["entries"], dtype=np.float64)
    restored = np.array(fig.meta["values"]["restored"], dtype=np.float64)
    arb_cells = np.array(fig.meta["values"]["arbitrated"], dtype=np.float64)
    top = arbitrated_full(restored, arb_cells)
    minority = (np.minimum(restored, 1 - restored) * entries).sum() / entries.sum()
    blue = 0.0
    for r in range(len(rows)):
        for c in range(len(cols)):
            kind, t = region_cell(cell_pixels(fig, "regions", r, c))
            if kind == "restored":
                blue += entries[r, c]
            else:
                assert t == pytest.approx(min(arb_cells[r, c] / top, 1.0) if top else 0.0, abs=0.015), (r, c)
            assert (kind == "restored") == (restored[r, c] >= 0.5), (r, c)
    assert abs(blue / entries.sum() - (1 - dominant)) <= minority + 2e-3
    assert_text_drawn(fig, fmt_share(arbitrated), tag="share:arbitrated")
    assert_text_drawn(fig, fmt_share(1 - dominant), tag="share:restored")
    # out x in orientation: the beyond-k group sits where the layer has more directions
    out_dim, in_dim = st.shape
    assert (rows[-1]["label"] == ">k") == (out_dim > st.routing.k)
    assert (cols[-1]["label"] == ">k") == (in_dim > st.routing.k)
    # (beyond k, a non-square layer keeps only the complement directions its drift or LoRA reach)
    assert sum(r["n"] for r in rows) * sum(c["n"] for c in cols) == st.routing.entries
    assert min(out_dim, in_dim) == (sum(r["n"] for r in rows) if out_dim < in_dim else sum(c["n"] for c in cols))


def test_cli_writes_the_overview_and_the_interesting_layers(real_run, tmp_path):
    from casa_core.cli import _write_heatmaps

    _, report, summaries = real_run
    paths = _write_heatmaps(tmp_path, summaries, report, scale=1.0)
    names = [p.name for p in paths]
    assert names[0] == "heatmap_overview.png"
    best = auto_layer(report.layers, summaries)
    assert f"heatmap_{best.replace('.', '_')}.png" in names
    assert 2 <= len(paths) <= 4
    for p in paths[1:]:
        layer = next(n for n in summaries if p.name == f"heatmap_{n.replace('.', '_')}.png")
        want = layer_figure(summaries[layer], layer, report.layers[layer], report.config).rgb
        assert np.array_equal(read_png(p), want)
    over = read_png(paths[0])
    assert np.array_equal(over, overview_figure(report.layers, selected=best).rgb)


def test_cli_reads_the_demo_report_when_not_given_one(real_run, tmp_path):
    from casa_core.cli import _write_heatmaps

    _, report, summaries = real_run
    (tmp_path / "report.json").write_text(json.dumps({"methods": {"casa": report.to_json()}}))
    paths = _write_heatmaps(tmp_path, summaries, scale=1.0)
    assert paths[0].name == "heatmap_overview.png" and len(paths) >= 2


# ------------------------------------------------------------------------------------------------
# PNG
# ------------------------------------------------------------------------------------------------


def _png_with_filters(rgb: np.ndarray) -> bytes:
    """A PNG whose rows use filter types 0..4 in turn (what other encoders write)."""
    h, w, _ = rgb.shape
    bpp, raw, prev = 3, b"", np.zeros(w * 3, dtype=np.int64)
    for y in range(h):
        line = rgb[y].reshape(-1).astype(np.int64)
        ft = y % 5
        out = np.zeros_like(line)
        for x in range(len(line)):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ft == 0:
                pred = 0
            elif ft == 1:
                pred = a
            elif ft == 2:
                pred = b
            elif ft == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[x] = (line[x] - pred) & 255
        raw += bytes([ft]) + out.astype(np.uint8).tobytes()
        prev = line

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_png_round_trip_and_filtered_rows():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(11, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(img, {"Title": "t"})), img)
    assert np.array_equal(decode_png(_png_with_filters(img)), img)
    with pytest.raises(ValueError):
        decode_png(b"not a png")


def test_write_png_files(tmp_path):
    from casa_core.pictures import write_png

    img = np.zeros((4, 5, 3), dtype=np.uint8)
    img[1, 2] = (255, 10, 20)
    write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_png(Path(tmp_path / "x.png")), img)
