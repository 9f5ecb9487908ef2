"""Numbers as the pictures print them, and where colour bars and axes put their ticks."""
from __future__ import annotations

import math

import numpy as np


LOG_DECADES = 5.0  # the shared energy scale spans at most this many decades below its maximum


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


def json_round(x, digits: int = 4):
    """JSON-friendly value: a float with ``digits`` significant digits, None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def grid_json(a: np.ndarray, digits: int = 4) -> list:
    return [[json_round(v, digits) for v in row] for row in a]


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


def log_t(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log10(np.where(x > 0, x, np.nan)) - lo) / (hi - lo)
    return np.clip(t, 0.0, 1.0)


def log_ticks(lo: float, hi: float) -> list[float]:
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


def nice_ceil(x: float) -> float:
    e = math.floor(math.log10(x))
    for m_ in (1, 2, 2.5, 5, 10):
        if m_ * 10 ** e >= x * (1 - 1e-12):
            return m_ * 10 ** e
    return 10 ** (e + 1)


def lin_ticks(top: float) -> list[float]:
    e = math.floor(math.log10(top))
    for step_m in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5):
        step = step_m * 10 ** e
        if top / step <= 5:
            return [i * step for i in range(int(round(top / step)) + 1)]
    return [0.0, top]


def tick_step(cell: float, need: float) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100):
        if step * cell >= need:
            return step
    return 100


def ticks_shown(groups: list[dict], edges: list[list[int]], need: float) -> list[int]:
    """Indices of the groups that get a tick label: 1, then every ``step``-th, and ``>k``;
    labels closer than ``need`` pixels to the next one shown are dropped."""
    n_in = sum(1 for g in groups if g["label"] != ">k")
    cell = (edges[0][1] - edges[0][0]) if edges else 1
    step = tick_step(cell, need)
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
