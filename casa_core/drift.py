"""The distillation drift ``C_F = U^T (W_t - W_s) V`` of every layer, cached on disk.

``W_t - W_s`` is always formed from the two real weights (never from a rebuilt ``W_s``), by one
function, :func:`weight_difference`: both weights in float64, subtracted, rounded once to float32.
For weights stored in float32 or narrower that difference is exact before its one rounding, so it
does not depend on how either weight was produced.

A distillation LoRA (lightx2v, CausVid, Lightning ...) is a target like any other: :class:`LoRADrift`
is the difference between the source and :class:`LoRAApplied` (the source with the LoRA added, in
float64), through the same function. ComfyUI's own patcher, asked for the same weight in float64
(``nodes/model_weights.py``), gives the same float64 sum up to the last float64 bit, so the node's
drift (base + distillation LoRA loaded by ComfyUI) and the command line's drift (the two files) are
the same float32 numbers, not two roundings that CASA's thresholds could split apart.

**Stored targets are noisy.** A target stored in fp8, GGUF, bfloat16 or float16 was rounded to its
storage grid; at distillation drifts the rounding error is a sizeable part of ``W_t - W_s`` (fp8:
larger than the drift). :class:`WeightDifference` therefore separates the drift from the rounding
noise whose grid it knows (:mod:`casa_core.quantnoise`) and records per layer, in the cache manifest,
the storage, the estimated noise and the signal-to-noise ratio (``info[layer]["noise"]``). A target
without rounding noise (float32) and a distillation LoRA (exact by construction) are used as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import layer as L
from . import linalg
from .basis import SourceBasis, WeightProvider
from .cache import LayerCache, Progress, decode, encode, settings_key
from .errors import CasaError
from .formats.checkpoint import check_finite
from .formats.keys import comfy_key
from .model_probe import ModelProbe, probe_layers, sketch
from .parallel import concurrent
from .quantnoise import EDGE_MARGIN, DriftEstimate, grid_of, separate_drift_parts

#: manifest keys of a lossy storage without a noise model (its name), the target's and the base's
UNMODELLED = {False: "unmodelled_storage", True: "unmodelled_base_storage"}

#: bumped whenever the drift a target gives changes for the same files (part of the cache key)
DRIFT_MODEL = "noise-aware-6"


class DriftSource(Protocol):
    def identity(self) -> str: ...

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        """``W_t - W_s`` in float32 (``out x in``), or None where the target equals the source."""

    def describe(self) -> str: ...


_ROWS_PER_CHUNK = 1024  # bounds the float64 temporaries of weight_difference to a few rows at a time


def weight_difference(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target - source`` in float32, computed in float64 and rounded once (row chunks, bounded memory)."""
    out = torch.empty(source.shape, dtype=torch.float32, device=source.device)
    for r in range(0, source.shape[0], _ROWS_PER_CHUNK):
        rows = slice(r, r + _ROWS_PER_CHUNK)
        out[rows] = (target[rows].to(torch.float64) - source[rows].to(torch.float64)).to(torch.float32)
    return out


class WeightDifference:
    """Drift between a source and a target weight provider (files or loaded models)."""

    def __init__(self, source: WeightProvider, target: WeightProvider):
        self.source, self.target = source, target
        #: per layer read, the sketches ``(W_t g, W_s g)`` of :mod:`casa_core.model_probe`, taken from the
        #: weights the drift reads anyway; the drift cache stores them (one key per layer: safe in threads)
        self.sketches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def concurrent_reads(self) -> bool:
        return concurrent(self.source, self.target)

    def identity(self) -> str:
        return f"diff({self.source.identity()},{self.target.identity()}):{DRIFT_MODEL}"

    def describe(self) -> str:
        return f"{_name(self.target)} - {_name(self.source)}"

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        return self.delta_info(layer, shape)[0]

    def delta_info(self, layer: str, shape: tuple[int, int], device: torch.device | str = "cpu",
                   factored: bool = False) -> tuple[torch.Tensor | DriftEstimate | None, dict | None]:
        """The drift (separated from the target's rounding noise where it has one, and from the base's
        when the base is stored on a coarse grid: fp8, GGUF) and the noise report (None without either).
        ``factored``: a separated drift that is exactly low rank comes as its factors
        (:class:`~casa_core.quantnoise.DriftEstimate`, on ``device``)."""
        raw = self._raw(layer, shape)
        if raw is None:
            return None, None
        d0, stored, grid, base = raw
        del raw
        if base is not None and not base[1].supported:
            return d0, {UNMODELLED[True]: base[1].describe()}
        if grid is None and base is None:
            return d0, None
        if grid is not None and not grid.supported:  # lossy storage without a noise model: as it is, and say so
            return d0, {UNMODELLED[False]: grid.describe()}
        dev = torch.device(device)
        if grid is not None:
            cells = list(grid.cells_and_variance(stored.to(dev)))
        else:
            cells = [torch.zeros_like(d0, device=dev), torch.zeros_like(d0, device=dev), torch.zeros_like(d0, device=dev)]
        del stored
        if base is not None:
            # a base stored on a coarse grid (an fp8 or GGUF copy of the model the distillation started from):
            # W_s lies in its cells too, so the drift W_t - W_s lies in [lo_t - hi_s, hi_t - lo_s]
            lo_s, hi_s, var_s = base[1].cells_and_variance(base[0].to(dev))
            cells[0].sub_(hi_s)
            cells[1].sub_(lo_s)
            cells[2].add_(var_s)
            del lo_s, hi_s, var_s
        coarse = (grid is not None and grid.coarse) or base is not None
        # the cells are handed over (the separation turns them into its bounds in place: less memory)
        est, info = separate_drift_parts(d0.to(dev), *cells, rank_search=coarse, overwrite_cells=True,
                                         margin=EDGE_MARGIN if coarse else 0.0)
        del cells
        info = {k: v for k, v in info.items() if k != "trace"}
        info["storage"] = grid.describe() if grid is not None else None
        if base is not None:
            info["base_storage"] = base[1].describe()
        if factored and est.residual is None:
            return est, info
        return est.dense().float().cpu(), info

    def _raw(self, layer: str, shape: tuple[int, int]):
        tshape = self.target.layers.get(layer)
        if tshape is None:
            return None
        if tuple(tshape) != tuple(shape):
            raise CasaError(
                f"{_name(self.target)}, layer {layer}: the target weight is {tshape[0]}x{tshape[1]} but the "
                f"source's is {shape[0]}x{shape[1]} — the two models are not the same architecture",
                file=_name(self.target), layer=layer,
            )
        wt = self.target.get(layer)
        check_finite(wt, file=_name(self.target), layer=layer, what="weight")
        # the grid is the one the target's stored weight lies on (before any patch it carries)
        stored = self.target.stored(layer) if hasattr(self.target, "stored") else wt
        grid = self.target.grid(layer) if hasattr(self.target, "grid") else None
        if grid is None:
            grid = grid_of(stored)
        ws = self.source.get(layer)
        check_finite(ws, file=_name(self.source), layer=layer, what="weight")
        self.sketches[layer] = (sketch(wt, layer).float(), sketch(ws, layer).float())
        if grid is not None and stored.shape == ws.shape and bool(torch.equal(stored.to(ws.dtype), ws)):
            # the target's stored weights ARE the source's (e.g. base + distillation LoRA patches): their
            # rounding is common to both and cancels, so there is no storage noise to separate
            return weight_difference(wt, ws), stored.float(), None, None
        # a base on a coarse grid (fp8, GGUF) is a rounded copy of the model the distillation started from,
        # so its rounding is noise in the drift too; a bf16 / fp16 base is the model as trained on
        sgrid = self.source.grid(layer) if hasattr(self.source, "grid") else grid_of(ws)
        base = (ws, sgrid) if sgrid is not None and sgrid.coarse else None
        return weight_difference(wt, ws), stored.float(), grid, base


class LoRAApplied:
    """The source with a distillation LoRA added (``W_s + strength * scale * up @ down``, plus its
    ``.diff`` layers), in float64: the target weights a distillation LoRA describes.

    The sum is formed as ComfyUI's patcher forms it (the factors' product, times the strength-and-
    alpha scale, added to the weight), here in float64."""

    def __init__(self, source: WeightProvider, lora):  # lora: casa_core.formats.lora.LoRAFile
        self.source, self.lora = source, lora
        self.layers = source.layers
        self.path = lora.path

    @property
    def concurrent_reads(self) -> bool:  # the LoRA is in memory
        return concurrent(self.source)

    def identity(self) -> str:
        return f"applied({self.source.identity()},{self.lora.identity()})"

    def get(self, layer: str) -> torch.Tensor:
        w = self.source.get(layer).to(torch.float64)
        upd = self.lora.updates.get(layer)
        if upd is not None:
            if upd.low_rank:
                w = w + upd.scale * (upd.up.to(torch.float64) @ upd.down.to(torch.float64))
            else:
                w = w + upd.delta.to(torch.float64)
        if layer in self.lora.passthrough_layers:  # a full .diff: strength times the file's tensor
            raw = self.lora.passthrough.get(comfy_key(layer, "diff"))
            if raw is not None and raw.numel() == w.numel():
                w = w + self.lora.strength * raw.to(torch.float64).reshape(w.shape)
            else:
                w = w + self.lora.passthrough_layers[layer].to(torch.float64)
        return w


class LoRADrift(WeightDifference):
    """Drift given by a distillation LoRA applied to the source: ``LoRAApplied(source, lora) - source``."""

    def __init__(self, lora, source: WeightProvider):  # lora: casa_core.formats.lora.LoRAFile
        super().__init__(source, LoRAApplied(source, lora))
        self.lora = lora

    def identity(self) -> str:
        return self.lora.identity()

    def describe(self) -> str:
        return f"distillation LoRA {Path(self.lora.path).name}"

    def delta(self, layer: str, shape: tuple[int, int]) -> torch.Tensor | None:
        if layer not in self.lora.updates and layer not in self.lora.passthrough_layers:
            return torch.zeros(shape)  # the LoRA leaves this layer as it is: present, and no drift
        return super().delta(layer, shape)


def _name(p) -> str:
    """A provider's file name (never its folder: reports and LoRA metadata must not carry local paths)."""
    path = getattr(p, "path", None)
    return Path(str(path)).name if path else p.identity()


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
            return decode_drift(name, {k: f.get(k) for k in f.keys() if k not in (PROBE_TARGET, PROBE_BASE)}, info,
                                device)

    def bytes_on_disk(self) -> int:
        return self.cache.bytes_on_disk()

    def probe(self) -> ModelProbe | None:
        """The sketches of the measured model (:mod:`casa_core.model_probe`) on the smallest layers that moved,
        read from the cache; None for a drift cached without them (before they existed, or from a
        distillation LoRA file) or without any layer that moved."""
        pick = probe_layers({n: self.basis.layers[n] for n, i in self.info.items()
                             if i.get("mode") != "zero" and n in self.basis.layers})
        measured, base = {}, {}
        for name in pick:
            with self.cache.open_layer(name) as f:
                if PROBE_TARGET not in f.keys():
                    return None
                measured[name], base[name] = f.get(PROBE_TARGET), f.get(PROBE_BASE)
        if not measured:
            return None
        return ModelProbe(measured, base, {n: tuple(self.basis.layers[n]) for n in measured})

    def missing(self) -> list[str]:
        """Layers of the source that the target does not have (not the same as "no drift")."""
        return [n for n, i in self.info.items() if i.get("missing")]

    def _zero(self, noisy: bool, layers=None) -> list[str]:
        """Layers (of ``layers``, default all) present in both models whose drift is zero: with a noise report
        (``noisy``: separated to zero from the storage noise) or without (identical weights)."""
        names = self.info if layers is None else [n for n in layers if n in self.info]
        return [n for n in names if self.info[n].get("mode") == "zero" and not self.info[n].get("missing")
                and ("noise" in self.info[n]) == noisy]

    def identical(self, layers=None) -> list[str]:
        """Layers present in both models with exactly the same weights."""
        return self._zero(False, layers)

    def lost_in_noise(self, layers=None) -> list[str]:
        """Layers whose weights differ, but whose drift, separated from the target's rounding noise, is zero
        (nothing in it stands out from that noise)."""
        return self._zero(True, layers)

    def noisy(self, layers=None) -> dict[str, dict]:
        """Layers (of ``layers``, default all) whose target is stored with rounding noise: layer -> report."""
        return {n: i["noise"] for n, i in self.info.items() if "noise" in i and (layers is None or n in layers)}

    def unmodelled(self, layers=None, base: bool = False) -> dict[str, str]:
        """Layers (of ``layers``, default all) whose target (``base``: whose base) is stored in a lossy
        format without a noise model here (GGUF IQ2/IQ3/TQ types, NVFP4 …): layer -> the storage's name.
        Their drift holds that storage's rounding as it is."""
        key = UNMODELLED[base]
        return {n: i[key] for n, i in self.info.items() if key in i and (layers is None or n in layers)}

    def below_noise(self, floor: float = 1.0, layers=None) -> list[str]:
        """Layers whose drift is below the target's rounding noise (amplitude SNR < ``floor``)."""
        return [n for n, r in self.noisy(layers).items() if r.get("snr", float("inf")) < floor]

    def entry(self, name: str) -> "DriftEntry":
        """What the cache says about one layer (:class:`DriftEntry`)."""
        return DriftEntry.of(self.info[name])

    def moved(self) -> int:
        """How many layers have a drift (not identical in both models, not missing from the target)."""
        return sum(1 for i in self.info.values() if not DriftEntry.of(i).zero)


@dataclass(frozen=True)
class DriftEntry:
    """One layer's entry in a drift cache's manifest (``TargetDrift.info[layer]``), read in one place:
    ``missing``: the target has no such layer; ``zero``: nothing stored, the drift is zero (identical
    weights, or missing); ``norm``: ``||W_t - W_s||_F``; ``noise``: the rounding-noise report of a
    target stored on a coarse grid, else None; ``unmodelled``: the name of the target's lossy storage
    when it has no noise model, else None."""

    missing: bool
    zero: bool
    norm: float
    noise: dict | None
    unmodelled: str | None = None

    @classmethod
    def of(cls, info: dict) -> "DriftEntry":
        return cls(bool(info.get("missing")), info.get("mode") == "zero", float(info.get("norm", 0.0)),
                   info.get("noise"), info.get(UNMODELLED[False]))


def noise_summary(drift: TargetDrift, what: str = "the target", layers=None) -> list[str]:
    """Plain-language lines about the target's storage noise (empty when it has none that matters);
    ``layers`` restricts them to some layers (those a LoRA touches)."""
    lines = []
    for base in (False, True):
        mine = drift.unmodelled(layers, base)
        if not mine:
            continue
        kinds = sorted(set(mine.values()))
        model = "the base model" if base else what
        better = ("a bf16 base model" if base else
                  "a bf16, fp8 or GGUF Q8_0/K-quant/IQ4 release of the distilled model, or its distillation LoRA on "
                  "the base model,")
        lines.append(f"WARNING: {model} is stored as {', '.join(kinds)} in {len(mine)} layer(s) (e.g. "
                     f"{next(iter(mine))}), a lossy format whose rounding casa-lora cannot separate from the "
                     f"distillation drift, so that drift includes the storage noise; {better} is the cleaner "
                     f"choice")
    noisy = drift.noisy(layers)
    if not noisy:
        return lines
    snrs = sorted(r["snr"] for r in noisy.values())
    kinds = sorted({r["storage"] for r in noisy.values() if r.get("storage")})
    bases = sorted({r["base_storage"] for r in noisy.values() if r.get("base_storage")})
    median = snrs[len(snrs) // 2]
    stored = (f"{what} is stored as {', '.join(kinds)}" if kinds else f"{what} is stored without rounding noise")
    if bases:
        stored += f", the base as {', '.join(bases)}"
    lines.append(f"{stored}: drift/noise (SNR) per layer from {snrs[0]:.2g} to "
                 f"{snrs[-1]:.2g} (median {median:.2g}); the drift was separated from the rounding noise")
    low = drift.below_noise(layers=layers)
    if low:
        lines.append(f"WARNING: in {len(low)} of {len(noisy)} layers (e.g. {low[0]}) the distillation drift is "
                     f"below the storage noise, so the transfer there rests on an estimate; "
                     + ("a bf16 base model, and " if bases else "")
                     + "a bf16 release of the distilled model, or its distillation LoRA on the base model, is the "
                       "cleaner target when one exists")
    return lines


def decode_drift(name: str, tensors: dict[str, torch.Tensor], info: dict, device: torch.device | str = "cpu") -> L.LayerDrift:
    """Inverse of :func:`encode_drift`."""

    def dec(key: str) -> torch.Tensor:
        return decode(tensors, key, device)

    comp = None
    if info["mode"] == "complement":
        q = dec("Q2")
        if "C_F2.triu" in tensors:  # upper triangular, stored as its upper triangle
            n = q.shape[1]
            # row-major upper triangle, the order encode_drift stored it in (triu_indices'); a boolean
            # mask costs n*n bytes where the two int64 index vectors cost 8*n*(n+1) bytes
            upper = torch.ones(n, n, dtype=torch.bool, device=device).triu_()
            c_f2 = torch.zeros(n, n, device=device).masked_scatter_(upper, dec("C_F2.triu"))
        else:
            c_f2 = dec("C_F2")
        comp = L.Complement(c_f=c_f2, q=q)
    return L.LayerDrift(name, dec("C_F"), comp)


# The drift's coordinates decide CASA's dominance and arbitration entry by entry: stored in float16
# their rounding (5e-4) would turn input differences of 1e-6 (the same target read two ways) into
# moved thresholds and flipped decisions.  They are kept in float32 whatever the basis storage.
COORDINATE_STORAGE = "float32"


#: the shard tensors holding a layer's sketches of the target and the base weights (casa_core.model_probe)
PROBE_TARGET, PROBE_BASE = "probe_W_t", "probe_W_s"


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
    if not isinstance(basis, SourceBasis):
        raise TypeError(f"basis must be a SourceBasis (from load_or_build_basis), got {type(basis).__name__}")
    device = linalg.check_device(device)
    cache = drift_cache(basis, drift, cache_dir)
    names = list(layers if layers is not None else basis.layers)
    if cache.complete:
        td = TargetDrift(cache, basis)
        if set(names) <= set(td.info):
            return td

    def compute(name: str):
        shape = basis.layers[name]
        with linalg.layer_threads(shape[0] * shape[1], device):
            return compute_layer(name, shape)

    def compute_layer(name: str, shape):
        if hasattr(drift, "delta_info"):
            delta, noise = drift.delta_info(name, shape, device, factored=True)
        else:
            delta, noise = drift.delta(name, shape), None
        if isinstance(delta, DriftEstimate):
            norm = linalg.product_norm(delta.left, delta.right)
        else:
            norm = 0.0 if delta is None else float(torch.linalg.matrix_norm(delta.float()))
        # a storage without a noise model is recorded under its own key; a noise report under "noise"
        unmodelled = {k: v for k, v in (noise or {}).items() if k in UNMODELLED.values()}

        def annotate(info: dict) -> dict:
            if noise and not unmodelled:
                info["noise"] = noise
            info.update(unmodelled)
            return info

        sketches = getattr(drift, "sketches", {}).pop(name, None)
        if delta is None or norm == 0.0:
            return {}, annotate({"mode": "zero", "norm": 0.0, "missing": delta is None})
        b = basis.layer(name, device)
        if isinstance(delta, DriftEstimate):  # exactly low rank: its coordinates from the factors
            d = L.compute_drift_factored(b, delta.left.to(device), delta.right.to(device))
        else:
            d = L.compute_drift(b, delta.to(device=device, dtype=torch.float32))
        tensors, info = encode_drift(d, basis.storage)
        if sketches is not None:
            tensors[PROBE_TARGET], tensors[PROBE_BASE] = sketches
        info["norm"] = norm
        w_norm = float(torch.linalg.vector_norm(b.S.double()))
        if w_norm > 0:
            info["rel"] = norm / w_norm  # of the base weight's norm
        info["missing"] = False
        return tensors, annotate(info)

    cache.build(
        names, compute,
        {"drift": drift.identity(), "basis": basis.key, "description": drift.describe()},
        progress,
        # layers side by side on a small CPU when both models are files (casa_core.parallel)
        size=(lambda name: math.prod(basis.layers[name])) if concurrent(drift) else None, device=device,
    )
    return TargetDrift(cache, basis)
