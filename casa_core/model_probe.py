"""What a drift remembers of the model it was measured on, to tell it from another model later.

A transfer is computed for the distilled model whose drift was measured. In a graph the transfer node gets
its own MODEL input, and nothing forces it to be that model: a user may wire the base model, the other
Wan2.2 expert, or a model with another distillation LoRA strength, and the result is then silently wrong.

The drift cache keeps, for every layer that moved, a sketch ``W g`` of the measured model's weight and of
the base's, with ``g`` a fixed Gaussian ``in x 4`` matrix drawn from the layer's name, taken from the
weights the drift reads anyway (:class:`casa_core.drift.WeightDifference`); a check reads the other
model's weights of the two smallest such layers only, so that it costs little. Another model's sketch is compared with the measured one in units
of the distillation's own change, ``||W_m g - W_t g|| / ||W_t g - W_s g||``: the very same weights give
float64 rounding (about 1e-12); the same model stored in another precision (an fp8 copy of a bf16
model) gives about its rounding noise over the drift (1-3 at a 1.5 % drift); the base gives 1; another
model or the other expert gives 10 or more. ``E||X g||^2 = 4 ||X||_F^2`` for any ``X``, so the ratio
estimates the ratio of the Frobenius norms without reading more than the few layers.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

#: layers sketched per drift, and columns per sketch
PROBE_LAYERS = 2
PROBE_COLUMNS = 4
#: a model within this share of the drift from the measured one is taken for it
SAME_MODEL = 0.05
#: a model within this share of the drift from the base is said to be the base
LIKE_BASE = 0.1


#: rows of a weight taken to float64 at a time (a 14B FFN weight whole would be 0.5 GiB more)
SKETCH_ROWS = 1024


def sketch(w: torch.Tensor, layer: str) -> torch.Tensor:
    """``w @ g`` in float64 (``out x PROBE_COLUMNS``), ``g`` standard Gaussian drawn from the layer's name."""
    gen = torch.Generator().manual_seed(zlib.crc32(layer.encode()))
    g = torch.randn(int(w.shape[1]), PROBE_COLUMNS, generator=gen, dtype=torch.float64)
    w = w.detach()
    return torch.cat([w[i:i + SKETCH_ROWS].to("cpu", torch.float64) @ g for i in range(0, int(w.shape[0]), SKETCH_ROWS)])


def probe_layers(layers: dict[str, tuple[int, int]]) -> list[str]:
    """The layers a probe sketches: the ``PROBE_LAYERS`` smallest of ``layers`` (``{name: (out, in)}``)."""
    return sorted(layers, key=lambda n: (layers[n][0] * layers[n][1], n))[:PROBE_LAYERS]


@dataclass(frozen=True)
class Mismatch:
    """The layer where another model is farthest from the measured one: ``off`` its distance to the measured
    model and ``to_base`` to the base, both in units of the drift (``inf``: the layer is absent or has
    another shape)."""

    layer: str
    off: float
    to_base: float


@dataclass(frozen=True)
class ModelProbe:
    measured: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def measure(cls, get_model: Callable[[str], torch.Tensor], get_base: Callable[[str], torch.Tensor],
                layers: dict[str, tuple[int, int]]) -> ModelProbe | None:
        """Sketches of the ``PROBE_LAYERS`` smallest of ``layers`` (``{name: (out, in)}``: layers whose drift is
        not zero); None without any."""
        pick = probe_layers(layers)
        if not pick:
            return None
        return cls({n: sketch(get_model(n), n) for n in pick}, {n: sketch(get_base(n), n) for n in pick},
                   {n: tuple(layers[n]) for n in pick})

    def compare(self, get_model: Callable[[str], torch.Tensor], has: Callable[[str], bool]) -> Mismatch | None:
        """The worst layer of another model when it is not the measured one (beyond ``SAME_MODEL``), else None."""
        worst = None
        for name, s_t in self.measured.items():
            if not has(name):
                return Mismatch(name, math.inf, math.inf)
            w = get_model(name)
            if tuple(int(x) for x in w.shape) != self.shapes[name]:
                return Mismatch(name, math.inf, math.inf)
            s_m = sketch(w, name)
            scale = float((s_t - self.base[name]).norm())
            if scale <= 0.0:
                continue
            m = Mismatch(name, float((s_m - s_t).norm()) / scale, float((s_m - self.base[name]).norm()) / scale)
            if worst is None or m.off > worst.off:
                worst = m
        return worst if worst is not None and worst.off > SAME_MODEL else None

    @staticmethod
    def describe(m: Mismatch, measured: str = "the model CASA Compute Drift measured") -> str:
        """The warning, in plain words."""
        if math.isinf(m.off):
            how = f"its layer {m.layer} is absent or has another shape"
        else:
            how = f"on {m.layer} it differs from it by {m.off:.0%} of the distillation's own change"
            if m.to_base < LIKE_BASE:
                how += " (it looks like the base model itself)"
        return (f"the MODEL connected here is not {measured}: {how}. The transfer is computed for the measured "
                "model: connect the same MODEL to both nodes, unless this one is that distilled model in another "
                "precision (e.g. an fp8 or GGUF copy of it)")
