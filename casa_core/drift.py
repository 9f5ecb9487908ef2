"""The distillation drift ``C_F = U^T (W_t - W_s) V`` of every layer, cached on disk.

``W_t - W_s`` is always formed from the two real weights in float32 (never from a rebuilt
``W_s``), or taken directly as the dense delta of a distillation LoRA (lightx2v, CausVid,
Lightning ...: the LoRA *is* the drift).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from . import layer as L
from .basis import SourceBasis, WeightProvider
from .cache import LayerCache, Progress, decode, encode, settings_key
from .errors import CasaError
from .formats.checkpoint import check_finite


class DriftSource(Protocol):
    def identity(self) -> str: ...

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        """``W_t - W_s`` in float32 (``out x in``), or None where the target equals the source."""

    def describe(self) -> str: ...


class WeightDifference:
    """Drift between a source and a target weight provider (files or loaded models)."""

    def __init__(self, source: WeightProvider, target: WeightProvider):
        self.source, self.target = source, target

    def identity(self) -> str:
        return f"diff({self.source.identity()},{self.target.identity()})"

    def describe(self) -> str:
        return f"{_name(self.target)} - {_name(self.source)}"

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        tshape = self.target.layers.get(layer)
        if tshape is None:
            return None
        if tuple(tshape) != tuple(shape):
            raise CasaError(
                f"{_name(self.target)}, layer {layer}: the target weight is {tshape[0]}x{tshape[1]} but the "
                f"source's is {shape[0]}x{shape[1]} — the two models are not the same architecture",
                file=_name(self.target), layer=layer,
            )
        wt = self.target.get(layer).float()
        check_finite(wt, file=_name(self.target), layer=layer, what="weight")
        ws = self.source.get(layer).float()
        check_finite(ws, file=_name(self.source), layer=layer, what="weight")
        return wt - ws


class LoRADrift:
    """Drift given by a distillation LoRA applied to the source (its dense update)."""

    def __init__(self, lora):  # casa_core.formats.lora.LoRAFile
        self.lora = lora

    def identity(self) -> str:
        return self.lora.identity()

    def describe(self) -> str:
        return f"distillation LoRA {Path(self.lora.path).name}"

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        total = None
        upd = self.lora.updates.get(layer)
        if upd is not None:
            total = upd.dense() if hasattr(upd, "dense") else upd.delta
        diff = self.lora.passthrough_layers.get(layer)
        if diff is not None:
            total = diff.float() if total is None else total + diff.float()
        return total


def _name(p) -> str:
    return str(getattr(p, "path", None) or p.identity())


class TargetDrift:
    """A complete drift cache; ``layer(name, basis_layer)`` loads one layer's ``C_F``."""

    def __init__(self, cache: LayerCache, basis: SourceBasis):
        self.cache = cache
        self.basis = basis
        self.manifest = cache.manifest()
        self.info: dict[str, dict] = self.manifest["layers"]
        self.identity: str = self.manifest["drift"]
        self.description: str = self.manifest.get("description", "")

    def layer(self, name: str, basis_layer: L.LayerBasis, device: torch.device | str = "cpu") -> L.LayerDrift:
        info = self.info[name]
        if info["mode"] == "zero":
            n = basis_layer.S.numel()
            return L.LayerDrift(name, torch.zeros(n, n, device=device))
        with self.cache.open_layer(name) as f:
            return decode_drift(name, {k: f.get(k) for k in f.keys()}, info, device)

    def bytes_on_disk(self) -> int:
        return self.cache.bytes_on_disk()


def decode_drift(name: str, tensors: dict[str, torch.Tensor], info: dict, device: torch.device | str = "cpu") -> L.LayerDrift:
    """Inverse of :func:`encode_drift`."""

    def dec(key: str) -> torch.Tensor:
        return decode(tensors, key, device)

    comp = None
    if info["mode"] == "complement":
        q = dec("Q2")
        if "C_F2.triu" in tensors:  # upper triangular, stored as its upper triangle
            n = q.shape[1]
            rows, cols = torch.triu_indices(n, n, device=device)
            c_f2 = torch.zeros(n, n, device=device)
            c_f2[rows, cols] = dec("C_F2.triu")
        else:
            c_f2 = dec("C_F2")
        comp = L.Complement(c_f=c_f2, q=q)
    return L.LayerDrift(name, dec("C_F"), comp)


# The drift's coordinates decide CASA's dominance and arbitration entry by entry: stored in float16
# their rounding (5e-4) would turn input differences of 1e-6 (the same target read two ways) into
# moved thresholds and flipped decisions.  They are kept in float32 whatever the basis storage.
COORDINATE_STORAGE = "float32"


def encode_drift(d: L.LayerDrift, storage: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors stored for one layer's drift: ``C_F`` (float32), the complement's ``Q2`` (in
    the basis storage) and ``C_F2`` (float32; its upper triangle only when it is triangular)."""
    tensors = {"C_F" + s: v for s, v in encode(d.c_f, COORDINATE_STORAGE, scaled=True).items()}
    comp = d.complement
    if comp is None:
        return tensors, {"mode": "top"}
    tensors.update({"Q2" + s: v for s, v in encode(comp.q, storage, scaled=False).items()})
    c = comp.c_f
    n = c.shape[0]
    if c.shape[0] == c.shape[1] and not bool(torch.tril(c, diagonal=-1).any()):
        rows, cols = torch.triu_indices(n, n, device=c.device)
        tensors.update({"C_F2.triu" + s: v for s, v in encode(c[rows, cols], COORDINATE_STORAGE, scaled=True).items()})
    else:
        tensors.update({"C_F2" + s: v for s, v in encode(c, COORDINATE_STORAGE, scaled=True).items()})
    return tensors, {"mode": "complement"}


def drift_cache(basis: SourceBasis, drift: DriftSource, cache_dir: str | Path) -> LayerCache:
    # a float16 basis gives refined coordinates (casa_core.layer), stored in float32: not those of
    # older caches
    extra = () if basis.storage == "float32" else ("refined-coordinates", "float32-coordinates")
    return LayerCache(Path(cache_dir), "drift", settings_key("drift", basis.key, drift.identity(), *extra))


def load_or_build_drift(
    basis: SourceBasis,
    drift: DriftSource,
    cache_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    layers=None,
    progress: Progress | None = None,
) -> TargetDrift:
    """The cached drift of ``drift`` in ``basis``' coordinates, computing it when needed."""
    cache = drift_cache(basis, drift, cache_dir)
    names = list(layers if layers is not None else basis.layers)
    if cache.complete:
        td = TargetDrift(cache, basis)
        if set(names) <= set(td.info):
            return td

    def compute(name: str):
        shape = basis.layers[name]
        delta = drift.delta(name, shape)
        if delta is None or not bool(delta.any()):
            return {}, {"mode": "zero", "norm": 0.0, "missing": delta is None}
        b = basis.layer(name, device)
        d = L.compute_drift(b, delta.to(device=device, dtype=torch.float32))
        tensors, info = encode_drift(d, basis.storage)
        info["norm"] = float(torch.linalg.matrix_norm(delta.float()))
        info["missing"] = False
        return tensors, info

    cache.build(
        names, compute,
        {"drift": drift.identity(), "basis": basis.key, "description": drift.describe()},
        progress,
    )
    return TargetDrift(cache, basis)
