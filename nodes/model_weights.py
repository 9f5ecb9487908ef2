"""Read a model loaded in ComfyUI one layer at a time, as casa_core's weight provider.

Original weights come from the patcher's backup when a patched clone is loaded (the shared module
then holds patched weights), else from the module through ``comfy.model_patcher.get_key_weight``;
quantized weights are dequantized; the patches of *this* patcher (e.g. a distillation LoRA added
by LoraLoaderModelOnly) are applied with ComfyUI's own ``comfy.lora.calculate_weight``.  The live,
possibly patched module is never trusted.  Only the public patcher interface shared by the classic
and the dynamic-VRAM patchers is used.
"""
from __future__ import annotations

import hashlib

import comfy.lora
import comfy.model_patcher
import torch

from .model_identity import file_identity

try:  # ComfyUI >= 0.4
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # pragma: no cover - older ComfyUI
    QuantizedTensor = ()

PREFIX = "diffusion_model."


def _plain(w) -> torch.Tensor:
    if QuantizedTensor and isinstance(w, QuantizedTensor):
        w = w.dequantize()
    return w.detach()


def _hash_value(h, v) -> None:
    """Feed a patch entry (tensors, numbers, adapters, nested tuples) into a hash."""
    if isinstance(v, torch.Tensor):
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


class ComfyModelWeights:
    """casa_core weight provider over a ComfyUI ModelPatcher (the effective weights)."""

    def __init__(self, patcher, label: str = "the connected MODEL"):
        self.patcher = patcher
        self.path = label
        dm = patcher.model.diffusion_model
        self.layers: dict[str, tuple[int, int]] = {}
        for name, module in dm.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.ndim == 2 and not isinstance(module, torch.nn.Embedding):
                self.layers[name] = (int(w.shape[0]), int(w.shape[1]))
        self._identity: str | None = None

    def original(self, layer: str) -> torch.Tensor:
        key = PREFIX + layer + ".weight"
        bk = getattr(self.patcher, "backup", {}).get(key)
        w = bk.weight if bk is not None else comfy.model_patcher.get_key_weight(self.patcher.model, key)[0]
        return _plain(w)

    def get(self, layer: str) -> torch.Tensor:
        """The effective weight: float32 without patches, else ComfyUI's patches applied in float64.

        float64 is what casa_core's ``LoRAApplied`` uses for a distillation LoRA file, so the drift of
        base + distillation LoRA is the same here and in the command line (casa_core.drift)."""
        key = PREFIX + layer + ".weight"
        with torch.no_grad():
            w = self.original(layer)
            patches = self.patcher.patches.get(key, [])
            if not patches:
                return w.to(torch.float32)
            w = w.to(torch.float64).clone()
            return comfy.lora.calculate_weight(patches, w, key, intermediate_dtype=torch.float64)

    def identity(self) -> str:
        """The loaded file's digest + how it was loaded + this patcher's patches when ComfyUI says which
        file the model came from (``model_identity``: a few layers are read to check it), else a content digest of the
        effective weights (original weights + this patcher's patches)."""
        if self._identity is None:
            self._identity = file_identity(self.patcher, self.layers, self.original, prefix=PREFIX)
        if self._identity is None:
            h = hashlib.blake2b(digest_size=20)
            for layer in sorted(self.layers):
                key = PREFIX + layer + ".weight"
                h.update(key.encode())
                _hash_value(h, self.original(layer))
                _hash_value(h, self.patcher.patches.get(key, []))
            self._identity = "comfy-model:" + h.hexdigest()
        return self._identity
