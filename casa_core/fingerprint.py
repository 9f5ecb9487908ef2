"""Content fingerprints of in-memory values that are cheap enough to take on every run.

Used for what sits on top of a model whose file is known (a distillation LoRA's factors patched onto
it, its strength, the adapter's kind): LoRA-sized, so hashing them costs a fraction of a second even
for a 14B model, where hashing the model's own weights would read tens of gigabytes.

A tensor is fed as its dtype, shape and raw bytes in that dtype (no conversion, no float32 copy); a
tensor subclass (a quantised weight) first as its class name, then dequantised when it can be, else as
its raw storage. Numbers and strings are fed by ``repr``, sequences and mappings element by element,
an object with a ``weights`` attribute (ComfyUI's weight adapters) as its class name and those
weights, and a function by its qualified name (never its address, which changes per process).
"""
from __future__ import annotations

import torch


def _tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if type(t) is not torch.Tensor:
        h.update(b"subclass:" + type(t).__qualname__.encode())
        if callable(getattr(t, "dequantize", None)):
            t = t.dequantize().detach()
        if type(t) is not torch.Tensor:
            h.update(repr(getattr(t, "tensor_shape", None)).encode())
            t = t.as_subclass(torch.Tensor)
    t = t.cpu().contiguous()
    h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def feed(h, value) -> None:
    """Feed ``value`` (tensors, numbers, strings, None, sequences, dicts, adapters, functions) into ``h``."""
    if isinstance(value, torch.Tensor):
        _tensor(h, value)
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}(".encode())
        for v in value:
            feed(h, v)
        h.update(b")")
    elif isinstance(value, dict):
        h.update(f"map{len(value)}(".encode())
        for k in sorted(value, key=repr):
            feed(h, k)
            feed(h, value[k])
        h.update(b")")
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, LoKr ...)
        h.update(b"adapter:" + type(value).__qualname__.encode())
        feed(h, value.weights)
    elif callable(value):
        h.update(b"fn:" + getattr(value, "__qualname__", type(value).__qualname__).encode())
    else:
        h.update(f"{type(value).__qualname__}:{value!r};".encode())
