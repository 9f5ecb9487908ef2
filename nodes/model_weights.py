"""Read a model loaded in ComfyUI one layer at a time, as casa_core's weight provider.

Original weights come from the patcher's backup when a patched clone is loaded (the shared module
then holds patched weights), else from the module through ``comfy.model_patcher.get_key_weight``;
quantized weights are dequantized; the patches of *this* patcher (e.g. a distillation LoRA added
by LoraLoaderModelOnly) are applied with ComfyUI's own ``comfy.lora.calculate_weight``.  The live,
possibly patched module is never trusted.  Only the public patcher interface shared by the classic
and the dynamic-VRAM patchers is used.

Quantized weights: ComfyUI's ``QuantizedTensor`` (scaled fp8) through its ``dequantize()``; plain fp8
tensors by upcasting; GGUF weights (city96's ComfyUI-GGUF, ``GGMLTensor``: raw blocks plus
``tensor_type`` and ``tensor_shape``) through that pack's own ``dequantize_tensor``, found at run time
in the module that defines the tensor's class (the pack is never imported by name, nor its code
copied). ``grid(layer)`` tells the drift the storage grid of the original weight, so that it can be
separated from the rounding noise (:mod:`casa_core.quantnoise`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys

import comfy.lora
import comfy.model_patcher
import torch

from ..casa_core.errors import CasaError
from ..casa_core.formats.keys import PATCH_PREFIX, naming_of, patch_key
from ..casa_core.quantnoise import StorageGrid
from .model_identity import file_identity

try:  # ComfyUI >= 0.4
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # pragma: no cover - older ComfyUI
    QuantizedTensor = ()


def is_ggml(w) -> bool:
    """A ComfyUI-GGUF weight: a tensor subclass holding GGUF blocks, with their type and real shape."""
    return isinstance(w, torch.Tensor) and hasattr(w, "tensor_type") and hasattr(w, "tensor_shape")


def _ggml_dequantizer(w):
    """ComfyUI-GGUF's ``dequantize_tensor``, from the module that defines the tensor's class (its ops
    module imports it) or that package's ``dequant`` module."""
    module = type(w).__module__
    fn = getattr(sys.modules.get(module), "dequantize_tensor", None)
    if fn is None and "." in module:
        fn = getattr(sys.modules.get(module.rsplit(".", 1)[0] + ".dequant"), "dequantize_tensor", None)
    if fn is None:
        raise CasaError(f"the connected MODEL holds GGUF weights ({type(w).__name__} from {module}) but that "
                        f"pack's dequantize_tensor was not found; update ComfyUI-GGUF")
    return fn


def _qtype(w) -> str:
    t = getattr(w, "tensor_type", None)
    return getattr(t, "name", str(t))


def _dequantized(w) -> torch.Tensor:
    """A ``QuantizedTensor`` dequantised in float32 by its own layout (``dequantize()`` gives the model's
    dtype, often bfloat16, whose rounding would blur the stored grid: an int8 value of 127 steps rounded
    to bf16 moves by a quarter step); the plain ``dequantize()`` where the layout's parameters cannot be
    rebuilt so."""
    params = getattr(w, "_params", None)
    if dataclasses.is_dataclass(params) and hasattr(params, "orig_dtype"):
        try:
            exact = type(w)(w._qdata, w._layout_cls, dataclasses.replace(params, orig_dtype=torch.float32))
            return exact.dequantize().float()
        except Exception:  # a layout that does not allow it: its own dequantisation
            pass
    return w.dequantize()


def _plain(w) -> torch.Tensor:
    if QuantizedTensor and isinstance(w, QuantizedTensor):
        w = _dequantized(w)
    elif is_ggml(w):
        shape = tuple(int(x) for x in w.tensor_shape)
        w = _ggml_dequantizer(w)(w, torch.float32)
        w = w.as_subclass(torch.Tensor) if type(w) is not torch.Tensor else w
        if tuple(w.shape) != shape:
            w = w.reshape(shape)
    return w.detach()


def grid_of_weight(w) -> StorageGrid | None:
    """The storage grid of a model weight as ComfyUI holds it (None: float32, or a format without one)."""
    if is_ggml(w):
        qtype = _qtype(w)
        return {"F16": StorageGrid.of_dtype(torch.float16), "BF16": StorageGrid.of_dtype(torch.bfloat16),
                "F32": None}.get(qtype, StorageGrid.gguf(qtype))
    qdata = getattr(w, "_qdata", None)
    if QuantizedTensor and isinstance(w, QuantizedTensor):
        scale = getattr(getattr(w, "_params", None), "scale", None)
        rows = int(w.shape[0]) if len(getattr(w, "shape", ())) == 2 else -1
        layout = getattr(w, "_layout_cls", None)
        name = str(getattr(layout, "__name__", layout) or type(w).__name__)
        lineage = _layout_lineage(w, name)
        grid = _layout_grid(lineage, qdata, getattr(w, "_params", None), rows)
        if grid is not None:
            return grid
        if (isinstance(qdata, torch.Tensor) and qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
                and "TensorCoreMXFP8Layout" not in lineage
                and (not isinstance(scale, torch.Tensor) or scale.numel() in (1, rows))):
            return StorageGrid.fp8(qdata.dtype, scale if isinstance(scale, torch.Tensor) else None)
        # another layout (INT8 with a rotation, 4-bit SVDQuant / AWQ …): lossy, but not a grid modelled here
        return StorageGrid.unmodelled(name)
    return StorageGrid.of_dtype(w.dtype) if isinstance(w, torch.Tensor) else None


def _layout_lineage(w, name: str) -> set[str]:
    """The names of a quantised tensor's layout class and of its base classes (ComfyUI subclasses
    comfy_kitchen's layouts), or just its name where the class cannot be looked up."""
    try:
        cls = w.layout_cls
    except Exception:  # an unregistered layout name
        cls = None
    return {c.__name__ for c in cls.__mro__} if isinstance(cls, type) else {name}


def _layout_grid(lineage: set[str], qdata, params, rows: int) -> StorageGrid | None:
    """The grid of ComfyUI's block-scaled and integer layouts (comfy_kitchen's ``TensorCoreMXFP8Layout``,
    ``TensorCoreNVFP4Layout``, ``TensorWiseINT8Layout`` or a subclass), checked against their storage;
    None for another layout, or one stored transposed or rotated (its blocks would not run along the
    rows as read here)."""
    if not isinstance(qdata, torch.Tensor) or getattr(params, "transposed", False):
        return None
    if "TensorCoreMXFP8Layout" in lineage and qdata.dtype == torch.float8_e4m3fn:
        return StorageGrid.block_scaled("mxfp8")
    if "TensorCoreNVFP4Layout" in lineage and qdata.dtype == torch.uint8:
        return StorageGrid.block_scaled("nvfp4")
    scale = getattr(params, "scale", None)
    if ("TensorWiseINT8Layout" in lineage and qdata.dtype == torch.int8 and not getattr(params, "convrot", False)
            and getattr(params, "is_weight", True) and isinstance(scale, torch.Tensor)
            and scale.numel() in (1, rows)):
        return StorageGrid.int8(scale, getattr(params, "orig_dtype", None))
    return None


def _hash_value(h, v) -> None:
    """Feed a patch entry (tensors, numbers, adapters, nested tuples) into a hash."""
    if is_ggml(v):  # the blocks themselves: exact and cheaper than dequantising
        h.update(f"{_qtype(v)}{tuple(int(x) for x in v.tensor_shape)}".encode())
        h.update(v.as_subclass(torch.Tensor).detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    elif isinstance(v, torch.Tensor):
        t = _plain(v).float().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    elif isinstance(v, (list, tuple)):
        h.update(b"(")
        for x in v:
            _hash_value(h, x)
        h.update(b")")
    elif hasattr(v, "weights"):  # comfy.weight_adapter adapters
        h.update(type(v).__name__.encode())
        _hash_value(h, v.weights)
    elif callable(v):  # a convert function: its name, not its address
        h.update(getattr(v, "__qualname__", type(v).__name__).encode())
    else:
        h.update(repr(v).encode())


#: the ``model_options`` entry where CASA Transfer LoRA records the patches it added, as the ids of their
#: values: a clone copies the patch lists (the same value objects, kept alive by them) and this entry with them
OWN_PATCHES = "casa_lora_own_patches"


def own_patch_ids(patcher) -> frozenset[int]:
    return frozenset((getattr(patcher, "model_options", None) or {}).get(OWN_PATCHES, ()))


#: the ``model_options`` entry where CASA Transfer LoRA records the LoRA files it transferred onto the model
#: (``{content digest: file name}``), to tell the user when one is applied a second time down a chain
APPLIED_LORAS = "casa_lora_applied"


def mark_own_patches(patcher, before: dict[str, int], lora_digest: str | None = None, lora_name: str = "") -> None:
    """Record the patches added to ``patcher`` since ``before`` (``{key: patches held then}``) as its own, and
    the LoRA they came from."""
    own = set(own_patch_ids(patcher))
    for key, patches in patcher.patches.items():
        own.update(id(p[1]) for p in patches[before.get(key, 0):])
    patcher.model_options[OWN_PATCHES] = frozenset(own)
    if lora_digest is not None:
        patcher.model_options[APPLIED_LORAS] = {**applied_loras(patcher), lora_digest: lora_name}


def applied_loras(patcher) -> dict[str, str]:
    """``{content digest: file name}`` of the LoRAs CASA Transfer LoRA already put on this model."""
    return dict((getattr(patcher, "model_options", None) or {}).get(APPLIED_LORAS, {}))


class ComfyModelWeights:
    """casa_core weight provider over a ComfyUI ModelPatcher (the effective weights)."""

    def __init__(self, patcher, label: str = "the connected MODEL"):
        self.patcher = patcher
        self.path = label
        dm = patcher.model.diffusion_model
        self.layers: dict[str, tuple[int, int]] = {}
        for name, module in dm.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and len(w.shape) == 2 and not isinstance(module, torch.nn.Embedding):
                self.layers[name] = (int(w.shape[0]), int(w.shape[1]))
                if isinstance(getattr(module, "pre_quant_scale", None), torch.Tensor):
                    # an AWQ-smoothed layer computes (x * s) W^T: its weight is not the layer's, and a patch
                    # on it would be scaled by s column by column
                    raise CasaError(
                        f"{label}, layer {name}: its quantised weight comes with a pre-quantisation input scale "
                        f"(pre_quant_scale, AWQ smoothing), so the stored weight is not the layer's own; "
                        f"casa-lora cannot compute a drift from it or patch it. Load the bf16 or fp8 release "
                        f"of this model, or one quantised without pre_quant_scale", layer=name)
        self.naming = "ComfyUI model, " + naming_of(self.layers).split(", ")[0]
        self._identity: str | None = None
        self._stored: tuple[str, torch.Tensor] | None = None

    def _raw(self, layer: str):
        key = patch_key(layer)
        bk = getattr(self.patcher, "backup", {}).get(key)
        return bk.weight if bk is not None else comfy.model_patcher.get_key_weight(self.patcher.model, key)[0]

    def original(self, layer: str) -> torch.Tensor:
        return _plain(self._raw(layer))

    def grid(self, layer: str) -> StorageGrid | None:
        """The storage grid of the layer's original weight (fp8, GGUF, bf16, fp16), None for float32."""
        return grid_of_weight(self._raw(layer))

    def stored(self, layer: str) -> torch.Tensor:
        """The original weight (before this patcher's patches), dequantised to float32."""
        if self._stored is not None and self._stored[0] == layer:
            return self._stored[1]
        return self.original(layer).to(torch.float32)

    def get(self, layer: str) -> torch.Tensor:
        """The effective weight: float32 without patches, else ComfyUI's patches applied in float64.

        float64 is what casa_core's ``LoRAApplied`` uses for a distillation LoRA file, so the drift of
        base + distillation LoRA is the same here and in the command line (casa_core.drift)."""
        return self._patched(layer, self.patcher.patches.get(patch_key(layer), []))

    def without_own(self, layer: str) -> torch.Tensor:
        """The effective weight without the patches CASA Transfer LoRA added (:data:`OWN_PATCHES`): the model
        a drift measured, also after a transfer was chained onto it."""
        own = own_patch_ids(self.patcher)
        return self._patched(layer, [p for p in self.patcher.patches.get(patch_key(layer), []) if id(p[1]) not in own])

    def _patched(self, layer: str, patches: list) -> torch.Tensor:
        """The original weight with ``patches`` applied as :meth:`get` applies them."""
        with torch.no_grad():
            w = self.original(layer)
            self._stored = (layer, w.to(torch.float32))
            if not patches:
                return w.to(torch.float32)
            w = w.to(torch.float64).clone()
            return comfy.lora.calculate_weight(patches, w, patch_key(layer), intermediate_dtype=torch.float64)

    def identity(self) -> str:
        """The loaded file's digest + how it was loaded + this patcher's patches when ComfyUI says which
        file the model came from (``model_identity``: a few layers are read to check it), else a content digest of the
        effective weights (original weights + this patcher's patches)."""
        if self._identity is None:
            self._identity = file_identity(self.patcher, self.layers, self.original, prefix=PATCH_PREFIX)
        if self._identity is None:
            h = hashlib.blake2b(digest_size=20)
            for layer in sorted(self.layers):
                key = patch_key(layer)
                h.update(key.encode())
                _hash_value(h, self.original(layer))
                _hash_value(h, self.patcher.patches.get(key, []))
            self._identity = "comfy-model:" + h.hexdigest()
        return self._identity
