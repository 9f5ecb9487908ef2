"""Writing LoRA files that ComfyUI's LoRA loader applies exactly.

Keys (canonical layer names behind ComfyUI's ``diffusion_model.`` prefix):

* ``kind == "lowrank"``, tensors ``(up[out×r], down[r×in])`` ->
  ``diffusion_model.<layer>.lora_up.weight``, ``….lora_down.weight`` and ``….alpha = r``, so that
  ComfyUI's scale ``alpha / rank`` is exactly 1 (without an alpha key it would also be 1, but other
  tools assume alpha = 1 or rank; writing it removes the doubt);
* ``kind == "diff"``, tensors ``(delta[out×in],)`` -> ``diffusion_model.<layer>.diff`` (a full weight
  difference, which ComfyUI applies as a ``("diff", …)`` patch).

A safetensors header needs every shape before any data, so the caller declares ``entries`` (layer,
kind, shapes) first and then supplies the tensors layer by layer, in the same order, from an iterator
or a callable. Each layer is written as soon as it arrives and dropped before the next is requested,
so a dense transfer never holds more than one layer's update in memory. The file appears atomically
(:class:`~casa_core.formats.safetensors_io.StreamingWriter`): an exception raised by the producer (for
example an interruption) leaves nothing at ``path``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from .keys import comfy_key
from .safetensors_io import StreamingWriter

__all__ = ["LayerEntry", "lora_keys", "write_comfy_lora"]

#: (canonical layer, kind, shapes): kind "lowrank" with shapes ((out, r), (r, in)), or kind "diff"
#: with shapes ((out, in),).
LayerEntry = tuple[str, str, tuple[tuple[int, ...], ...]]

_ALPHA_DTYPE = torch.float32


def lora_keys(layer: str, kind: str) -> tuple[str, ...]:
    """The keys one layer's update is stored under, in the order its tensors are supplied
    (``alpha`` last for low-rank updates)."""
    if kind == "lowrank":
        return (comfy_key(layer, "lora_up.weight"), comfy_key(layer, "lora_down.weight"),
                comfy_key(layer, "alpha"))
    if kind == "diff":
        return (comfy_key(layer, "diff"),)
    raise ValueError(f"layer {layer}: unknown update kind '{kind}' (expected 'lowrank' or 'diff')")


def _declare(entries: Sequence[LayerEntry], dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    declared: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for layer, kind, shapes in entries:
        keys = lora_keys(layer, kind)
        if kind == "lowrank":
            (out, r), (r2, n) = shapes
            if r != r2:
                raise ValueError(f"layer {layer}: up is {out}×{r} but down is {r2}×{n}")
            declared += [(keys[0], dtype, (out, r)), (keys[1], dtype, (r, n)), (keys[2], _ALPHA_DTYPE, ())]
        else:
            ((out, n),) = shapes
            declared.append((keys[0], dtype, (out, n)))
    return declared


def write_comfy_lora(
    path: str | os.PathLike[str],
    entries: Sequence[LayerEntry],
    tensors: Iterable[Sequence[torch.Tensor]] | Callable[[str, str], Sequence[torch.Tensor]],
    passthrough: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write a ComfyUI LoRA file atomically.

    ``tensors`` yields, for each entry in order, ``(up, down)`` or ``(delta,)`` — either as an iterable
    (typically a generator computing one layer at a time) or as a callable ``(layer, kind) -> tensors``.
    Update tensors are stored as ``dtype``; ``passthrough`` tensors (already ComfyUI-loadable keys, e.g.
    ``LoRAFile.passthrough``) keep their own dtypes. ``metadata`` (``dict[str, str]``) goes into the
    header and is where provenance belongs.
    """
    passthrough = dict(passthrough or {})
    declared = _declare(entries, dtype)
    clash = sorted({name for name, _, _ in declared} & passthrough.keys())
    if clash:
        raise ValueError(f"{os.fspath(path)}: pass-through keys collide with written updates: {clash[:3]}")
    declared += [(key, t.dtype, tuple(t.shape)) for key, t in passthrough.items()]

    iterator = None if callable(tensors) else iter(tensors)

    def produce(layer: str, kind: str) -> Sequence[torch.Tensor]:
        if iterator is None:
            return tensors(layer, kind)  # type: ignore[operator]
        try:
            return next(iterator)
        except StopIteration:
            raise ValueError(f"{os.fspath(path)}: the tensor source ended before layer {layer}") from None

    with StreamingWriter(path, declared, metadata) as writer:
        for layer, kind, _ in entries:
            # Written inside a function so no local keeps this layer alive while the next is produced.
            _write_layer(writer, layer, kind, produce(layer, kind))
        if iterator is not None and next(iterator, None) is not None:
            raise ValueError(f"{os.fspath(path)}: the tensor source yields more layers than entries")
        for key, t in passthrough.items():
            writer.write(key, t)


def _write_layer(writer: StreamingWriter, layer: str, kind: str, layer_tensors: Sequence[torch.Tensor]) -> None:
    keys = lora_keys(layer, kind)
    expected = 2 if kind == "lowrank" else 1
    if len(layer_tensors) != expected:
        raise ValueError(f"layer {layer}: expected {'(up, down)' if kind == 'lowrank' else '(delta,)'}, "
                         f"got {len(layer_tensors)} tensors")
    for key, t in zip(keys, layer_tensors, strict=False):  # alpha is added below
        writer.write(key, t)
    if kind == "lowrank":
        writer.write(keys[2], torch.tensor(float(layer_tensors[1].shape[0])))
