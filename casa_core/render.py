"""Pictures of a layer's routing at cluster level (from :mod:`casa_core.routing_data`).

Four panels side by side: drift routing energy density, LoRA routing energy density (both on
a shared log scale), directional alignment (diverging, -1..1) and the CASA region map
(restored / preserved / arbitrated, blended by their share in each cell).
"""
from __future__ import annotations

import numpy as np

from .png import diverging, sequential

REGION_COLOURS = {
    "restored": np.array([70, 130, 220], dtype=np.float64),
    "preserved": np.array([190, 190, 190], dtype=np.float64),
    "arbitrated": np.array([240, 140, 30], dtype=np.float64),
}


def _np(summary: dict, key: str) -> np.ndarray:
    return summary[key].double().numpy() if hasattr(summary[key], "double") else np.asarray(summary[key], dtype=np.float64)


def densities(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    count = np.maximum(_np(summary, "count"), 1.0)
    return _np(summary, "drift_energy") / count, _np(summary, "lora_energy") / count


def region_shares(summary: dict) -> dict[str, np.ndarray]:
    count = np.maximum(_np(summary, "count"), 1.0)
    restored = _np(summary, "restored") / count
    arbitrated = _np(summary, "arbitrated") / count
    return {"restored": restored, "arbitrated": arbitrated, "preserved": 1.0 - restored - arbitrated}


def _upscale(rgb: np.ndarray, px: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, px, axis=0), px, axis=1)


def layer_panels(summary: dict, cell_px: int | None = None) -> list[np.ndarray]:
    drift_d, lora_d = densities(summary)
    g = drift_d.shape[0]
    px = cell_px or max(4, 240 // max(g, 1))
    both = np.concatenate([drift_d.ravel(), lora_d.ravel()])
    pos = both[both > 0]
    lo, hi = (np.log10(pos.min()), np.log10(pos.max())) if pos.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0

    def logmap(x):
        with np.errstate(divide="ignore"):
            return np.where(x > 0, (np.log10(np.where(x > 0, x, 1.0)) - lo) / span, 0.0)

    cos = _np(summary, "cosine_groups")
    shares = region_shares(summary)
    region = sum(shares[name][..., None] * colour for name, colour in REGION_COLOURS.items())
    panels = [sequential(logmap(drift_d)), sequential(logmap(lora_d)), diverging(cos), region.round().astype(np.uint8)]
    return [_upscale(p, px) for p in panels]


def layer_heatmap(summary: dict, cell_px: int | None = None, gap: int = 12) -> np.ndarray:
    panels = layer_panels(summary, cell_px)
    h = panels[0].shape[0]
    sep = np.full((h, gap, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [sep, p]
    img = np.concatenate(row, axis=1)
    border = np.full((gap, img.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([border, img, border], axis=0)
