"""Model checkpoints (safetensors), read lazily one layer at a time.

**Weight providers.** The maths side reads weights through a tiny protocol (:class:`WeightProvider`),
which :class:`Checkpoint` implements and which a ComfyUI model adapter can implement too:

* ``.layers`` -> ``dict[str, tuple[int, int]]``: canonical layer name -> (out, in) of its 2-D weight;
* ``.get(layer)`` -> the weight as a float32 CPU tensor (dequantised, never an alias of live memory);
* ``.identity()`` -> a string that changes whenever the weights can differ (used as a cache key);
  for a file, ``"file:" + blake2b digest of its content``.

A layer is every 2-D ``<module>.weight`` tensor, whatever the model family: conv kernels, 1-D norms,
modulation tables and biases are not layers (they are listed in ``other_keys``). Key layouts handled:
original names, ComfyUI repacks with ``model.diffusion_model.`` (or ``diffusion_model.``, ``model.model.``,
``net.``) prefixes, Wan diffusers names (translated to original names) and HunyuanVideo's original release
names (translated to ComfyUI's: ``img_attn_qkv`` -> ``img_attn.qkv``); see :func:`keys.canonical_names`.
``param_names`` lists every tensor under its canonical name (what ComfyUI's LoRA loader could patch).

**fp8.** Plain ``float8_e4m3fn``/``float8_e5m2`` weights are upcast. Scaled fp8 stores the weight divided
by a scale: legacy files carry ``<module>.scale_weight`` (plus a ``scaled_fp8`` marker), newer ComfyUI
files ``<module>.weight_scale`` (scalar, or per output row) with a ``<module>.comfy_quant`` JSON tensor
or a ``_quantization_metadata`` header entry; the weight is ``w.float() * scale``. ComfyUI's
``int8_tensorwise``, ``mxfp8`` and ``nvfp4`` formats are decoded by :mod:`.comfy_quant`; other quantisation
formats (a rotated int8, 4-bit SVDQuant/AWQ/W4A8 …) are refused with a clear message.
``grid(layer)`` describes a layer's storage grid (:class:`~casa_core.quantnoise.StorageGrid`: fp8,
bfloat16, float16), from which the drift estimates the rounding noise of the layer; float32 has none.
"""
from __future__ import annotations

import json
import os
import re
from types import TracebackType
from typing import Protocol, runtime_checkable

import torch

from .. import linalg
from ..errors import CasaError
from . import comfy_quant
from .keys import canonical_names, naming_of
from .safetensors_io import file_digest
from .sharded import open_tensors, resolve_model_path

__all__ = ["Checkpoint", "WeightProvider", "check_finite", "open_model"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
#: the 2-D factors of the LoRA formats (lora_down/up, lora_A/B, lora.down/up, LoHa, LoKr): a file made of
#: them is a LoRA, not a model
_LORA_FACTOR = re.compile(r"(?:[._]lora[._](?:up|down)|\.lora_(?:up|down|A|B)|\.lora_linear_layer\.|\.hada_w|\.lokr_w)")


@runtime_checkable
class WeightProvider(Protocol):
    """Anything the maths can read weights from (see the module docstring)."""

    @property
    def layers(self) -> dict[str, tuple[int, int]]: ...

    def get(self, layer: str) -> torch.Tensor: ...

    def identity(self) -> str: ...


def check_finite(tensor: torch.Tensor, *, file: str, layer: str | None, what: str) -> None:
    """Raise a CasaError naming ``file`` (and ``layer``) when a float tensor holds NaN or Inf."""
    if not tensor.is_floating_point():
        return
    # a LoRA factor or a layer: one pass, under the per-layer thread rule (on a small shared CPU a thread
    # pool's hand-off costs more than the pass over a LoRA factor)
    with linalg.layer_threads(tensor.numel(), tensor.device):
        t = tensor.float() if tensor.dtype in _FP8 else tensor
        # one reducing pass (NaN and Inf make the sum non-finite); only a non-finite sum, which an overflow
        # of huge but finite values could also give, is looked at entry by entry
        total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()  # (float16 would overflow)
        finite = bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())
    if not finite:
        where = f"{file}, layer {layer}" if layer is not None else file
        raise CasaError(f"{where}: {what} contains NaN/Inf values", file=file, layer=layer)


class FileIdentity:
    """The identity of a model file: ``"file:" + blake2b digest of its content``, memoised in ``_memo_dir``
    (a class using it sets ``path``, ``_memo_dir`` and ``_digest = None``)."""

    path: str
    _memo_dir: str | os.PathLike[str] | None
    _digest: str | None

    def digest(self) -> str:
        """blake2b digest of the file content (memoised in ``memo_dir`` when one was given)."""
        if self._digest is None:
            own = getattr(getattr(self, "_file", None), "digest", None)  # a sharded model: over its files
            self._digest = own(self._memo_dir) if own is not None else file_digest(self.path, self._memo_dir)
        return self._digest

    def identity(self) -> str:
        return "file:" + self.digest()


class Checkpoint(FileIdentity):
    """A safetensors model file as a :class:`WeightProvider`; tensors are read only when asked for. A model
    in shards is given by its ``*.safetensors.index.json`` (or a folder holding it) and read as one file
    (:mod:`.sharded`)."""

    concurrent_reads = True  # its reads are locked (casa_core.parallel)

    def __init__(self, path: str | os.PathLike[str], memo_dir: str | os.PathLike[str] | None = None):
        self._file = open_tensors(resolve_model_path(path))
        self.path: str = self._file.path
        self._memo_dir = memo_dir
        self._digest: str | None = None
        try:
            self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self) -> None:
        f = self._file
        keys = f.keys()
        canonical = canonical_names(keys)
        self.naming: str = naming_of(keys)
        quant_meta = self._quantization_metadata()

        self._weight_key: dict[str, str] = {}
        self._scale_key: dict[str, str] = {}
        self._fp8_view: dict[str, torch.dtype] = {}
        #: layer -> (ComfyUI format, {scale suffix: key}) for the integer and block-scaled formats
        self._packed: dict[str, tuple[str, dict[str, str]]] = {}
        used: set[str] = set()
        for key in keys:
            if not key.endswith(".weight") or len(f.shape(key)) != 2:
                continue
            raw_module = key[: -len(".weight")]
            layer = canonical[key][: -len(".weight")]
            if layer in self._weight_key:
                raise CasaError(f"{self.path}: keys '{self._weight_key[layer]}' and '{key}' are both the "
                                f"weight of layer {layer}", file=self.path, layer=layer)
            self._weight_key[layer] = key
            used.add(key)
            for suffix in _SCALE_SUFFIXES:
                if f"{raw_module}.{suffix}" in f:
                    self._scale_key[layer] = f"{raw_module}.{suffix}"
                    used.add(self._scale_key[layer])
            conf_key = f"{raw_module}.comfy_quant"
            conf = None
            if conf_key in f:
                conf = self._read_quant_conf(conf_key, layer)
                used.add(conf_key)
            elif raw_module in quant_meta:
                conf = quant_meta[raw_module]
            if conf is not None:
                self._apply_quant_conf(layer, key, conf)
            if layer in self._packed:
                used.update(self._packed[layer][1].values())
                self._scale_key.pop(layer, None)

        self._refuse_a_lora()
        self.layers: dict[str, tuple[int, int]] = {
            layer: (f.shape(key)[0],
                    f.shape(key)[1] * comfy_quant.VALUES_PER_ELEMENT.get(self._packed.get(layer, ("",))[0], 1))
            for layer, key in self._weight_key.items()
        }
        self.other_keys: list[str] = [k for k in keys if k not in used]
        #: every tensor's canonical name (scale and quantisation bookkeeping left out)
        self.param_names: frozenset[str] = frozenset(
            canonical[k] for k in keys
            if k in self._weight_key.values() or (k in self.other_keys and not k.endswith(("comfy_quant", "scaled_fp8")))
        )

    def _refuse_a_lora(self) -> None:
        """A LoRA given where a model goes (its "layers" would be its factors): one sentence saying so."""
        factors = [key for key in self._file.keys() if _LORA_FACTOR.search(key)]
        if factors and len(factors) * 2 >= len(self._weight_key):
            raise CasaError(f"{self.path} is a LoRA (its weights are LoRA factors such as '{factors[0]}'), not a "
                            f"model checkpoint: a distillation LoRA (lightx2v, CausVid …) is given as --distill-lora "
                            f"(in ComfyUI: loaded onto the base model with a LoRA loader), a style LoRA as --lora",
                            file=self.path)

    def _quantization_metadata(self) -> dict[str, dict]:
        raw = self._file.metadata.get("_quantization_metadata")
        if not raw:
            return {}
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise CasaError(f"{self.path}: its _quantization_metadata header entry is not valid JSON",
                            file=self.path) from None
        return layers if isinstance(layers, dict) else {}

    def _read_quant_conf(self, key: str, layer: str) -> dict:
        try:
            conf = json.loads(self._file.get(key).numpy().tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise CasaError(f"{self.path}, layer {layer}: '{key}' is not valid quantisation JSON",
                            file=self.path, layer=layer) from None
        return conf if isinstance(conf, dict) else {}

    def _apply_quant_conf(self, layer: str, key: str, conf: dict) -> None:
        fmt = conf.get("format")
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        rotated = conf.get("convrot", params.get("convrot", False))
        raw_module = key[: -len(".weight")]
        if f"{raw_module}.pre_quant_scale" in self._file:
            raise CasaError(f"{self.path}, layer {layer}: its weight comes with a pre-quantisation input scale "
                            f"('{raw_module}.pre_quant_scale', AWQ smoothing), so the stored weight is not the "
                            f"layer's own; use the bf16 or fp8 release of this model, or one quantised without it",
                            file=self.path, layer=layer)
        if fmt in comfy_quant.FORMATS and not rotated:
            scales = {}
            for suffix in comfy_quant.FORMATS[fmt]:
                if f"{raw_module}.{suffix}" not in self._file:
                    raise CasaError(f"{self.path}, layer {layer}: weights quantised as '{fmt}' need "
                                    f"'{raw_module}.{suffix}', which the file does not have",
                                    file=self.path, layer=layer)
                scales[suffix] = f"{raw_module}.{suffix}"
            self._packed[layer] = (fmt, scales)
            return
        if fmt not in _FP8_FORMATS:
            what = f"'{fmt}' with a rotation (convrot)" if rotated else f"'{fmt}'"
            raise CasaError(f"{self.path}, layer {layer}: weights quantised as {what} are not supported; "
                            f"use the bf16, fp16 or fp8 release of this model", file=self.path, layer=layer)
        stored = self._file.dtype(key)
        if stored in (torch.uint8, torch.int8):  # fp8 bytes stored as integers: reinterpret
            self._fp8_view[layer] = _FP8_FORMATS[fmt]

    # -- WeightProvider -------------------------------------------------------------------------------

    def _key(self, layer: str) -> str:
        try:
            return self._weight_key[layer]
        except KeyError:
            raise CasaError(f"{self.path} has no layer {layer}", file=self.path, layer=layer) from None

    def grid(self, layer: str):
        """The storage grid of a layer stored in fp8 (plain or scaled), bfloat16 or float16; None for
        float32 (whose rounding is negligible)."""
        from ..quantnoise import StorageGrid

        if layer in self._packed:
            fmt, _ = self._packed[layer]
            return comfy_quant.grid(fmt, self._packed_scales(layer))
        scale_key = self._scale_key.get(layer)
        scale = self._file.get(scale_key).float() if scale_key is not None else None
        return StorageGrid.of_dtype(self.storage_dtype(layer), scale)

    def storage_dtype(self, layer: str) -> torch.dtype:
        """The dtype the layer's weight is stored in (fp8 for scaled-fp8 files)."""
        return self._fp8_view.get(layer) or self._file.dtype(self._key(layer))

    def _packed_scales(self, layer: str) -> dict[str, torch.Tensor]:
        return {suffix: self._file.get(key) for suffix, key in self._packed[layer][1].items()}

    def get(self, layer: str) -> torch.Tensor:
        """The layer's weight as a float32 CPU tensor, dequantised (``w.float() * scale``, or the decoding of
        ComfyUI's int8 / MXFP8 / NVFP4 formats)."""
        w = self._file.get(self._key(layer))
        if layer in self._packed:
            fmt, _ = self._packed[layer]
            try:
                w = comfy_quant.decode(fmt, w, self._packed_scales(layer))
            except ValueError as e:
                raise CasaError(f"{self.path}, layer {layer} ({fmt}): {e}", file=self.path, layer=layer) from None
            check_finite(w, file=self.path, layer=layer, what="weight")
            return w
        if layer in self._fp8_view:
            w = w.view(self._fp8_view[layer])
        w = w.float()
        scale_key = self._scale_key.get(layer)
        if scale_key is not None:
            scale = self._file.get(scale_key).float()
            if scale.numel() == 1:
                w = w * scale.reshape(())
            elif scale.numel() == w.shape[0]:
                w = w * scale.reshape(-1, 1)
            else:
                raise CasaError(f"{self.path}, layer {layer}: scale '{scale_key}' has shape "
                                f"{list(scale.shape)}, neither a scalar nor one value per output row",
                                file=self.path, layer=layer)
        check_finite(w, file=self.path, layer=layer, what="weight")
        return w

    @property
    def metadata(self) -> dict[str, str]:
        return self._file.metadata

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_model(path: str | os.PathLike[str], memo_dir: str | os.PathLike[str] | None = None):
    """A model file as a weight provider: :class:`Checkpoint` for safetensors (one file, or shards through
    their index), a :class:`~casa_core.formats.gguf_file.GGUFCheckpoint` for GGUF (needs the optional ``gguf``
    package). ``path`` may also be a folder holding one model (:func:`.sharded.resolve_model_path`)."""
    from .gguf_file import GGUFCheckpoint, is_gguf

    path = resolve_model_path(path)
    if is_gguf(path):
        return GGUFCheckpoint(path, memo_dir)
    return Checkpoint(path, memo_dir)
