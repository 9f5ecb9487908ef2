"""GGUF model files (city96's ComfyUI-GGUF format) as a weight provider, read with the ``gguf`` package.

The ``gguf`` package (PyPI, from llama.cpp) is an optional dependency: it parses the file and
dequantises every tensor type (Q8_0, Q6_K, Q5_K, Q4_K …, F16, BF16, F32). Without it, opening a
``.gguf`` file raises one sentence saying how to install it.

Names: the tensors carry the model's own names (``blocks.0.self_attn.q.weight``; some converters keep
``model.diffusion_model.``); they go through :func:`keys.canonical_names` like a safetensors
checkpoint's. Shapes are the reverse of GGUF's dimension order, or the ``comfy.gguf.orig_shape.<name>``
entry ComfyUI-GGUF's converter writes for tensors of more than four dimensions.

``grid(layer)``: the storage grid of a quantised layer (``gguf:Q8_0`` …), or of an F16/BF16 one, from
which the drift estimates the layer's rounding noise (:mod:`casa_core.quantnoise`).
"""
from __future__ import annotations

import os
from types import TracebackType
from typing import Self

import numpy as np
import torch

from ..errors import CasaError
from .checkpoint import FileIdentity, check_finite
from .keys import canonical_names, naming_of

__all__ = ["GGUFCheckpoint", "is_gguf"]

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_module(path: str):
    try:
        import gguf
    except ImportError:
        raise CasaError(f"{path} is a GGUF file; reading it needs the optional 'gguf' package "
                        f"(pip install gguf)", file=path) from None
    return gguf


class GGUFCheckpoint(FileIdentity):
    """A GGUF model file as a :class:`~casa_core.formats.checkpoint.WeightProvider`."""

    concurrent_reads = True  # its tensors are memory-mapped (casa_core.parallel)

    def __init__(self, path: str | os.PathLike[str], memo_dir: str | os.PathLike[str] | None = None):
        self.path: str = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CasaError(f"{self.path} does not exist", file=self.path)
        gguf = _gguf_module(self.path)
        self._gguf = gguf
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # noqa: BLE001 - the reader raises ValueError/struct/numpy errors on damaged files
            raise CasaError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                            file=self.path) from None
        self._memo_dir = memo_dir
        self._digest: str | None = None
        self.architecture: str | None = self._string_field("general.architecture")
        if self.architecture in set(getattr(gguf, "MODEL_ARCH_NAMES", {}).values()):
            # llama.cpp's own architectures are language and text-encoder models (a Wan UMT5, a HunyuanVideo
            # llava-llama, a Qwen text encoder), never a diffusion model
            raise CasaError(f"{self.path} is a GGUF of a language or text-encoder model (architecture "
                            f"'{self.architecture}'), not of a diffusion model: give the diffusion model's own "
                            f"GGUF (the one ComfyUI loads with Unet Loader (GGUF))", file=self.path)
        tensors = {t.name: t for t in self._reader.tensors}
        canonical = canonical_names(tensors)
        self.naming: str = naming_of(tensors)
        self._tensor: dict[str, object] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self.layers: dict[str, tuple[int, int]] = {}
        self.other_keys: list[str] = []
        for name, t in tensors.items():
            shape = self._orig_shape(name) or tuple(int(d) for d in reversed(t.shape.tolist()))
            self._shape[name] = shape
            key = canonical[name]
            if key.endswith(".weight") and len(shape) == 2:
                layer = key[: -len(".weight")]
                if layer in self._tensor:
                    raise CasaError(f"{self.path}: two tensors are the weight of layer {layer}",
                                    file=self.path, layer=layer)
                self._tensor[layer] = t
                self.layers[layer] = (shape[0], shape[1])
            else:
                self.other_keys.append(name)
        self.param_names: frozenset[str] = frozenset(canonical.values())

    def _string_field(self, key: str) -> str | None:
        field = self._reader.get_field(key)
        if field is None or not field.data:
            return None
        try:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        except (UnicodeDecodeError, IndexError, TypeError):
            return None

    def _orig_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._reader.get_field(f"comfy.gguf.orig_shape.{name}")
        if field is None:
            return None
        return tuple(int(field.parts[i][0]) for i in field.data)

    # -- WeightProvider -------------------------------------------------------------------------------

    def _get_tensor(self, layer: str):
        try:
            return self._tensor[layer]
        except KeyError:
            raise CasaError(f"{self.path} has no layer {layer}", file=self.path, layer=layer) from None

    def qtype(self, layer: str) -> str:
        """The GGUF type of the layer's weight (``Q8_0``, ``Q4_K``, ``F16`` …)."""
        return self._get_tensor(layer).tensor_type.name

    def get(self, layer: str) -> torch.Tensor:
        """The layer's weight as a float32 CPU tensor, dequantised by the gguf package."""
        t = self._get_tensor(layer)
        try:
            values = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CasaError(f"{self.path}, layer {layer}: the gguf package cannot dequantise {t.tensor_type.name} "
                            f"tensors", file=self.path, layer=layer) from None
        w = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(self.layers[layer])
        check_finite(w, file=self.path, layer=layer, what="weight")
        return w

    def grid(self, layer: str):
        from ..quantnoise import StorageGrid

        qtype = self.qtype(layer)
        if qtype == "F16":
            return StorageGrid.of_dtype(torch.float16)
        if qtype == "BF16":
            return StorageGrid.of_dtype(torch.bfloat16)
        return StorageGrid.gguf(qtype)

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        self._reader = None
        self._tensor = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
