"""Models split over several safetensors files, and models given as a folder.

The original Wan releases and every diffusers repository store a large model as shards
(``diffusion_pytorch_model-00001-of-00006.safetensors`` …) with an index,
``diffusion_pytorch_model.safetensors.index.json``, whose ``weight_map`` says which shard holds each
tensor. :class:`ShardedSafeTensors` reads such a model through that index with the interface of
:class:`~casa_core.formats.safetensors_io.SafeTensorsFile` (keys, shapes, dtypes, one tensor at a time),
so that :class:`~casa_core.formats.checkpoint.Checkpoint` treats it as one file.

:func:`resolve_model_path` turns what a user may give into one file: a ``.safetensors`` or ``.gguf``
file as it is, an index as it is, and a folder holding exactly one index (or, without one, exactly one
model file) as that file. Anything else is one sentence naming what was found.
"""
from __future__ import annotations

import hashlib
import json
import os
from types import TracebackType

import torch

from ..errors import CasaError
from .safetensors_io import SafeTensorsFile, file_digest

__all__ = ["INDEX_SUFFIX", "ShardedSafeTensors", "is_index", "model_files", "open_tensors", "resolve_model_path"]

INDEX_SUFFIX = ".index.json"
_MODEL_SUFFIXES = (".safetensors", ".gguf")


def is_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a shard index (``*.index.json``)."""
    return os.fspath(path).endswith(INDEX_SUFFIX)


def resolve_model_path(path: str | os.PathLike[str]) -> str:
    """The one file to open for a model given as ``path`` (a file, an index, or a folder holding one)."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        return p
    names = sorted(os.listdir(p))
    indexes = [n for n in names if n.endswith(".safetensors" + INDEX_SUFFIX)]
    if len(indexes) == 1:
        return os.path.join(p, indexes[0])
    if len(indexes) > 1:
        raise CasaError(f"{p} is a folder with {len(indexes)} shard indexes ({', '.join(indexes[:3])}): "
                        f"give the one of the model", file=p)
    models = [n for n in names if n.endswith(_MODEL_SUFFIXES) and os.path.isfile(os.path.join(p, n))]
    if len(models) == 1:
        return os.path.join(p, models[0])
    if not models:
        raise CasaError(f"{p} is a folder without a model file (.safetensors, .gguf or a "
                        f"*.safetensors{INDEX_SUFFIX} shard index)", file=p)
    raise CasaError(f"{p} is a folder with {len(models)} model files ({', '.join(models[:3])}"
                    f"{' …' if len(models) > 3 else ''}) and no shard index: give the file of the model", file=p)


def model_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file a model given as ``path`` is read from: the file itself, or an index and its shards
    (an index that cannot be read: the index alone; opening it says why)."""
    p = resolve_model_path(path)
    if not is_index(p):
        return [p]
    try:
        return [p] + [os.path.join(os.path.dirname(p), s) for s in _read_index(p)[1]]
    except CasaError:
        return [p]


def open_tensors(path: str | os.PathLike[str]):
    """A :class:`SafeTensorsFile`, or a :class:`ShardedSafeTensors` for a shard index."""
    return ShardedSafeTensors(path) if is_index(path) else SafeTensorsFile(path)


def _read_index(path: str) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """``(weight_map, shard names in order of first use, metadata)`` of a shard index."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CasaError(f"{path} does not exist", file=path) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CasaError(f"{path} is not a readable shard index (JSON: {e})", file=path) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CasaError(f"{path} is not a shard index: it has no 'weight_map' naming the file of each tensor",
                        file=path)
    shards: list[str] = []
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard:
            raise CasaError(f"{path}: the weight_map entry of '{key}' is {shard!r}, not the name of a file "
                            f"beside the index", file=path)
        if shard not in shards:
            shards.append(shard)
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return weight_map, shards, {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


class ShardedSafeTensors:
    """A model stored as shards, read through its index like one :class:`SafeTensorsFile`.

    Every shard's header is read (and validated) at once, and every tensor of the ``weight_map`` must
    be in the shard it names, so a missing or mismatched shard fails here, before any computation.
    ``path`` is the index's; ``metadata`` is the shards' (the first shard's entries first) with the
    index's own ``metadata`` under it."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path: str = os.fspath(path)
        weight_map, shards, index_meta = _read_index(self.path)
        folder = os.path.dirname(self.path)
        self.shard_paths: list[str] = [os.path.join(folder, s) for s in shards]
        self._shards: dict[str, SafeTensorsFile] = {}
        try:
            for name, shard_path in zip(shards, self.shard_paths):
                if not os.path.exists(shard_path):
                    raise CasaError(f"{self.path}: its shard {name} is missing (expected beside the index)",
                                    file=self.path)
                self._shards[name] = SafeTensorsFile(shard_path)
            self._where: dict[str, SafeTensorsFile] = {}
            for key, name in weight_map.items():
                f = self._shards[name]
                if key not in f:
                    raise CasaError(f"{self.path}: the index puts tensor '{key}' in {name}, which does not hold it "
                                    f"(a shard from another download?)", file=self.path)
                self._where[key] = f
        except BaseException:
            self.close()
            raise
        # the shards' own order of tensors, shard by shard
        self._keys = [k for f in self._shards.values() for k in f.keys() if self._where.get(k) is f]
        meta = dict(index_meta)
        for f in reversed(list(self._shards.values())):
            meta.update(f.metadata)
        self.metadata: dict[str, str] = meta

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _file(self, key: str) -> SafeTensorsFile:
        try:
            return self._where[key]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor '{key}'") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._file(key).dtype(key)

    def nbytes(self, key: str) -> int:
        return self._file(key).nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get(key)

    def digest(self, memo_dir: str | os.PathLike[str] | None = None) -> str:
        """blake2b over the index's and every shard's content digests: it changes with any of them."""
        h = hashlib.blake2b(digest_size=20)
        for p in [self.path, *self.shard_paths]:  # the index names the shards
            h.update(file_digest(p, memo_dir).encode("ascii") + b"\0")
        return h.hexdigest()

    def close(self) -> None:
        for f in getattr(self, "_shards", {}).values():
            f.close()

    def __enter__(self) -> ShardedSafeTensors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
