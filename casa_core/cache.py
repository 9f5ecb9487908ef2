"""On-disk caches of per-layer tensors (safetensors shards + a JSON manifest).

A cache is a folder ``<kind>-<key>/`` holding one safetensors file per layer and a
``manifest.json`` that is written last.  It is built in ``<kind>-<key>.partial/`` and renamed
into place only when every layer is done, so an interrupted run never leaves a folder that
looks complete.  A later run with the same key resumes from the layers already finished in
the partial folder (each shard is itself written atomically and carries the key in its
metadata, so a shard from other inputs is never picked up).

The key is a hash of everything the content depends on (the input files' content digests
and the settings), so a cache made from another source file is never reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import CasaError
from .formats.safetensors_io import SafeTensorsFile, write_file
from .parallel import map_layers

FORMAT_VERSION = "1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

# fp16 keeps 11 significant bits over a range of 2^30; scaling the largest magnitude to 2^14
# keeps every value down to 2^-28 of it a normal number.
_FP16_TARGET_MAX = 2.0**14

Progress = Callable[[int, int, str], None]


def settings_key(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=10)
    for p in (FORMAT_VERSION, *parts):
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def shard_name(layer: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)
    return f"{safe}.safetensors"


def encode(t: torch.Tensor, storage: str, scaled: bool) -> dict[str, torch.Tensor]:
    """Store ``t`` in the storage dtype; ``scaled`` adds a per-tensor scale for small values."""
    t = t.detach().float().cpu().contiguous()
    if storage == "float32":
        return {"": t}
    if not scaled:
        return {"": t.to(torch.float16)}
    peak = float(t.abs().max()) if t.numel() else 0.0
    scale = peak / _FP16_TARGET_MAX if peak > 0 else 1.0
    return {"": (t / scale).to(torch.float16), ".scale": torch.tensor([scale], dtype=torch.float32)}


def decode(f, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of :func:`encode`; ``f`` is an open shard or a dict of its tensors."""
    stored = f.get(name)
    t = stored.to(device=device, dtype=torch.float32)
    if f"{name}.scale" in f:
        scale = float(f.get(f"{name}.scale")[0])
        # in place when the conversion made a copy (never scale the caller's own tensor)
        t = t.mul_(scale) if t.data_ptr() != stored.data_ptr() else t * scale
    return t


class LayerCache:
    """A finished (or resumable) cache folder."""

    def __init__(self, root: Path, kind: str, key: str):
        self.kind = kind
        self.key = key
        self.final = Path(root) / f"{kind}-{key}"
        self.partial = Path(root) / f"{kind}-{key}.partial"

    @property
    def complete(self) -> bool:
        return (self.final / MANIFEST).is_file()

    def manifest(self) -> dict:
        path = self.final / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CasaError(f"{path}: cache manifest is unreadable ({exc}); delete the folder to rebuild it", file=str(path)) from exc
        if data.get("key") != self.key or data.get("version") != FORMAT_VERSION:
            raise CasaError(f"{path}: cache manifest does not belong to these inputs; delete the folder to rebuild it", file=str(path))
        return data

    def open_layer(self, layer: str) -> SafeTensorsFile:
        return SafeTensorsFile(str(self.final / shard_name(layer)))

    def build(
        self,
        layers: Iterable[str],
        compute: Callable[[str], tuple[dict[str, torch.Tensor], dict]],
        manifest_extra: dict,
        progress: Progress | None = None,
        size: Callable[[str], int] | None = None,
        device: torch.device | str = "cpu",
    ) -> dict:
        """Compute every layer not already in the partial folder, then publish the cache.

        ``compute(layer)`` returns the tensors to store and a small JSON-able description. ``size`` (the
        layer's entries), when given, lets small layers be computed side by side on a small CPU
        (:func:`casa_core.parallel.map_layers`): ``compute`` must then be safe to run in several threads.
        """
        layers = list(layers)
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CasaError(f"{self.partial.parent} cannot hold the cache ({exc.strerror or exc}): give a folder this "
                            "program may write to", file=str(self.partial.parent)) from None
        entries: dict[str, dict] = {}
        total = len(layers)

        def one(layer: str) -> dict:
            shard = self.partial / shard_name(layer)
            info = self._resume(shard)
            if info is None:
                tensors, info = compute(layer)
                meta = {"casa_key": self.key, "casa_layer": layer, "casa_info": json.dumps(info, sort_keys=True)}
                write_file(str(shard), tensors, meta)
            return info

        # closed on any exit (an interruption raised by ``progress``): the layers running are waited for.
        # An interruption keeps the layers done, for the next run to resume from; a clear error on the inputs
        # (CasaError: a NaN, a wrong shape) removes them: the key follows the files' content, so the folder
        # could only be resumed by inputs that fail again, and would stay on disk for good
        try:
            with contextlib.closing(map_layers(one, layers, size or (lambda _: 0), device,
                                               workers=None if size is not None else 1)) as infos:
                for i, (layer, info) in enumerate(zip(layers, infos)):
                    entries[layer] = info
                    if progress is not None:
                        progress(i + 1, total, layer)
        except CasaError:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise
        manifest = {"version": FORMAT_VERSION, "key": self.key, "kind": self.kind, "layers": entries, **manifest_extra}
        tmp = self.partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.partial / MANIFEST)
        if self.final.exists():  # a concurrent run finished first: keep its copy
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            os.replace(self.partial, self.final)
        return manifest

    def _resume(self, shard: Path) -> dict | None:
        if not shard.is_file():
            return None
        try:
            with SafeTensorsFile(str(shard)) as f:
                meta = f.metadata
            if meta.get("casa_key") != self.key:
                return None
            return json.loads(meta["casa_info"])
        except (CasaError, KeyError, json.JSONDecodeError):
            shard.unlink(missing_ok=True)
            return None

    def bytes_on_disk(self) -> int:
        root = self.final if self.final.exists() else self.partial
        return sum(p.stat().st_size for p in root.glob("*") if p.is_file()) if root.exists() else 0
