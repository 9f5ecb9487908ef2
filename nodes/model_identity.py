"""The identity of a loaded MODEL from the file it was loaded from, without reading its weights.

The drift cache is keyed by the target model's identity. Hashing every weight of a loaded model costs
reading all of it (tens of GB for a 14B model) on every prompt, even when the drift is cached. When the
file behind the model is known, its content digest (memoised on disk by path, size and mtime, like the
basis node's source file) stands for the weights instead, together with:

* how ComfyUI loaded it: the loader and its ``model_options`` (a ``weight_dtype`` of fp8 changes the
  weights), the model class, and every layer's stored type, dtype and shape (which also tells a bf16
  load on a GPU from a float32 load on the CPU);
* a spot check: a few layers spread over the model (``SPOT_LAYERS``, among its smaller half), read from
  the file and cast to the loaded dtype, must equal the loaded model's original weights bit for bit, so
  a model loaded before its file was rewritten (ComfyUI keeps serving it under the same name) is not
  keyed by the new file's digest;
* this patcher's patches on those layers (a distillation LoRA added by LoraLoaderModelOnly), hashed by
  content (:mod:`casa_core.fingerprint`): they are LoRA-sized.

Where the file comes from: ComfyUI >= 0.9 keeps ``cached_patcher_init = (loader, args[, index])`` on the
patchers that its core loaders return (``comfy.sd.load_diffusion_model`` for UNETLoader,
``load_checkpoint_guess_config`` for checkpoint loaders) and copies it to clones; the loader's own
signature names the argument holding the path. ComfyUI 0.8.0 keeps no trace of the file, nor do other
loaders (ComfyUI-GGUF); for those, and whenever anything above cannot be established (an unknown
option value, an object patch replacing the diffusion model, a spot check that differs),
:func:`file_identity` returns None and the caller hashes the weights as before.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable

import comfy.model_patcher
import torch

from ..casa_core.errors import CasaError
from ..casa_core.fingerprint import feed
from ..casa_core.formats.checkpoint import Checkpoint
from ..casa_core.formats.keys import PATCH_PREFIX
from ..casa_core.formats.safetensors_io import file_digest

PATH_ARGUMENTS = ("unet_path", "ckpt_path")  # the loaders' names for the file they read
SPOT_LAYERS = 4  # layers compared with the file (spread over the model): a rewritten file differs in them


class _Unknown(Exception):
    pass


def _canonical(v):
    """A JSON-able, process-independent form of a loader option, or _Unknown."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, type) or inspect.isfunction(v):
        return f"{v.__module__}.{v.__qualname__}"
    raise _Unknown(type(v).__name__)


def loaded_from(patcher) -> tuple[str, dict, str] | None:
    """``(path, model_options, loader name)`` of the file ``patcher`` was loaded from, if ComfyUI says."""
    init = getattr(patcher, "cached_patcher_init", None)
    if not isinstance(init, tuple) or len(init) < 2 or not callable(init[0]):
        return None
    loader, args = init[0], init[1]
    try:
        bound = inspect.signature(loader).bind_partial(*args)
    except (TypeError, ValueError):
        return None
    path = next((bound.arguments[a] for a in PATH_ARGUMENTS if a in bound.arguments), None)
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    options = bound.arguments.get("model_options") or {}
    name = f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', '?')}"
    return os.fspath(path), options, name


def _stored(patcher, key: str):
    """The original weight object of ``key`` as it sits in memory (nothing is read or converted)."""
    bk = getattr(patcher, "backup", {}).get(key)
    return bk.weight if bk is not None else comfy.model_patcher.get_key_weight(patcher.model, key)[0]


def _spot_check(path: str, layers: dict, original: Callable[[str], torch.Tensor]) -> bool:
    """A few layers spread over the model, read from the file and cast to the loaded dtype, equal the
    loaded original weights bit for bit."""
    try:
        with Checkpoint(path) as ck:
            both = [n for n in layers if tuple(ck.layers.get(n, ())) == tuple(layers[n])]
            if not both:
                return False
            picks = spot_layers({n: layers[n] for n in both})
            for layer in picks:
                got = original(layer)
                if not got.is_floating_point():
                    return False
                if not torch.equal(ck.get(layer).to(got.dtype).to(got.device), got):
                    return False
    except (CasaError, OSError):
        return False
    return True


def spot_layers(layers: dict) -> list[str]:
    """``SPOT_LAYERS`` layers spread over the model (natural order) among its smaller half by size (a
    rewritten file differs everywhere; the smaller layers are cheaper to read)."""
    by_size = sorted(layers, key=lambda n: (math.prod(layers[n]), _natural(n)))
    small = sorted(by_size[: max(SPOT_LAYERS, (len(by_size) + 1) // 2)], key=_natural)
    return sorted({small[(i * len(small)) // SPOT_LAYERS] for i in range(SPOT_LAYERS)}, key=_natural)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace("_", ".").split(".")]


def patches_digest(patcher, keys) -> str:
    """Content digest of this patcher's patches on ``keys`` (LoRA-sized)."""
    h = hashlib.blake2b(digest_size=20)
    patches = getattr(patcher, "patches", {})
    for key in keys:
        entry = patches.get(key)
        if entry:
            h.update(key.encode())
            feed(h, entry)
    return h.hexdigest()


def file_identity(patcher, layers: dict, original: Callable[[str], torch.Tensor], *, prefix: str = PATCH_PREFIX,
                  memo_dir: str | os.PathLike | None = None) -> str | None:
    """The model's identity from its file's digest, its loading and its patches; None when unknown."""
    found = loaded_from(patcher)
    if found is None:
        return None
    path, options, loader = found
    if any(str(name).startswith("diffusion_model") for name in getattr(patcher, "object_patches", {})):
        return None  # the diffusion model itself is replaced: not what the file holds
    try:
        options = _canonical(options)
    except _Unknown:
        return None
    keys = [prefix + layer + ".weight" for layer in sorted(layers)]
    stored = []
    for layer, key in zip(sorted(layers), keys, strict=True):
        w = _stored(patcher, key)
        stored.append([layer, type(w).__qualname__, str(w.dtype), list(w.shape)])
    if not _spot_check(path, layers, original):
        return None
    if memo_dir is None:
        from .common import cache_dir

        memo_dir = cache_dir()
    description = {"file": file_digest(path, memo_dir), "loader": loader, "options": options,
                   "model": type(patcher.model).__qualname__, "layers": stored}
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps(description, sort_keys=True).encode())
    h.update(patches_digest(patcher, keys).encode())
    return "comfy-file:" + h.hexdigest()
