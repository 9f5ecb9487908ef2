"""The source basis: thin SVDs of every 2-D linear weight of the base model, cached on disk.

Computed once per source file (keyed by its content digest and the storage settings) and
reused by every drift and every LoRA transfer.  See :mod:`casa_core.cache` for the on-disk
layout and its atomicity, :mod:`casa_core.layer` for the orientation and what is stored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from . import layer as L
from . import linalg
from .cache import STORAGE_DTYPES, LayerCache, Progress, decode, encode, settings_key
from .errors import CasaError
from .formats.checkpoint import WeightProvider, check_finite
from .formats.keys import natural_key as _natural_key
from .parallel import concurrent


class SourceBasis:
    """A complete basis cache; ``layer(name)`` loads one layer's ``U, S, V``."""

    def __init__(self, cache: LayerCache):
        self.cache = cache
        self.manifest = cache.manifest()
        self.layers: dict[str, tuple[int, int]] = {
            name: tuple(info["shape"]) for name, info in self.manifest["layers"].items()
        }
        self.source_identity: str = self.manifest["source"]
        self.storage: str = self.manifest["storage"]

    @property
    def key(self) -> str:
        return self.cache.key

    def layer(self, name: str, device: torch.device | str = "cpu") -> L.LayerBasis:
        with self.cache.open_layer(name) as f:
            return L.LayerBasis(
                name, self.layers[name], decode(f, "U", device), decode(f, "S", device), decode(f, "V", device),
                refine=self.storage != "float32",
            )

    def bytes_on_disk(self) -> int:
        return self.cache.bytes_on_disk()


def basis_cache(source: WeightProvider, cache_dir: str | Path, storage: str = "float16") -> LayerCache:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    key = settings_key("basis", source.identity(), storage)
    return LayerCache(Path(cache_dir), "basis", key)


def load_or_build_basis(
    source: WeightProvider,
    cache_dir: str | Path,
    *,
    storage: str = "float16",
    device: torch.device | str = "cpu",
    layers: Iterable[str] | None = None,
    progress: Progress | None = None,
) -> SourceBasis:
    """The cached basis of ``source``, computing (or finishing) it when needed.

    ``layers`` restricts the computation to some layers (default: every 2-D weight).
    """
    if not hasattr(source, "layers") or not hasattr(source, "get"):
        raise TypeError(f"source must be a weight provider (e.g. casa_core.Checkpoint(path)), got "
                        f"{type(source).__name__}")
    device = linalg.check_device(device)
    if layers is not None:
        layers = list(layers)
        unknown = [n for n in layers if n not in source.layers]
        if unknown:
            what = getattr(source, "path", None) or type(source).__name__
            raise CasaError(f"{what}: the model has no layer {unknown[0]} ({len(unknown)} of the {len(layers)} layers "
                            f"asked for are not in it)", file=str(what), layer=unknown[0])
    cache = basis_cache(source, cache_dir, storage)
    if cache.complete:
        basis = SourceBasis(cache)
        wanted = set(layers) if layers is not None else set(source.layers)
        if wanted <= set(basis.layers):
            return basis
    names = sorted(layers if layers is not None else source.layers, key=_natural_key)
    what = getattr(source, "path", None) or source.identity()

    def compute(name: str):
        w = source.get(name).to(device=device, dtype=torch.float32)
        check_finite(w, file=str(what), layer=name, what="weight")
        b = L.compute_basis(name, w)
        tensors = {}
        for key, t, scaled in (("U", b.U, False), ("S", b.S, None), ("V", b.V, False)):
            if scaled is None:  # singular values stay float32 (they define k and the gaps)
                tensors[key] = t.detach().float().cpu().contiguous()
                continue
            for suffix, v in encode(t, storage, scaled).items():
                tensors[key + suffix] = v
        return tensors, {"shape": list(b.shape)}

    cache.build(names, compute, {"source": source.identity(), "storage": storage}, progress,
                # layers side by side on a small CPU when the source is a file (casa_core.parallel)
                size=(lambda name: math.prod(source.layers[name])) if concurrent(source) else None, device=device)
    return SourceBasis(cache)
