"""Test-only node that reads back the weights a MODEL really uses, through ComfyUI's own patching.

``CasaTestDumpWeights(model, keys, filename, after?)``:

1. ``comfy.model_management.load_models_gpu([model], force_patch_weights=True)``: ComfyUI loads the model
   the way a sampler does and bakes its patches (LoRAs, ``diff`` patches, any weight adapter) into the
   module weights with ``comfy.lora.calculate_weight``. Loading another patcher of the same module
   first restores ComfyUI's backup of the original weights.
2. For each key, ``comfy.model_patcher.get_key_weight(model.model, key)[0]`` (the live module weight),
   dequantised when it is a ``comfy.quant_ops.QuantizedTensor`` (scaled fp8), as float32 on the CPU.
3. Writes them to ``<output>/casa_test_dumps/<filename>.safetensors`` with keys in canonical layer names
   (``blocks.0.self_attn.q``); the metadata ``dtype.<layer>`` records the live weight's dtype.

GGUF weights (ComfyUI-GGUF) are dequantised by that pack's own ``dequantize_tensor`` (the metadata
``gguf.<layer>`` records their type).
``keys``: comma-separated canonical layer names (``blocks.0.self_attn.q``) or ComfyUI keys
(``diffusion_model.blocks.0.self_attn.q.weight``); ``*`` = every 2-D weight of the diffusion model (saved
under canonical layer names); ``**`` = every parameter (biases, norms, modulation too), saved under its
full parameter name (``blocks.0.self_attn.q.bias``, ``blocks.0.norm3.weight``, ``head.head.weight``).
``after`` (optional, any type) only orders execution: wire another dump's output into it.
Output: the dump's file name relative to the output folder (STRING); ui ``casa_dump`` =
``[{"filename", "subfolder", "type": "output"}]`` (fetch it with ``/view``) and text.
"""
from __future__ import annotations

import os

import torch

try:
    from comfy_api.v0_0_2 import io, ui
except ImportError:  # pragma: no cover - older ComfyUI
    from comfy_api.latest import io, ui

import comfy.model_management
import comfy.model_patcher
import folder_paths

SUBFOLDER = "casa_test_dumps"
PREFIX = "diffusion_model."


def _dequantize(w):
    try:
        import comfy.quant_ops as qo
    except ImportError:  # pragma: no cover - ComfyUI without quantized tensors
        qo = None
    if qo is not None and isinstance(w, getattr(qo, "QuantizedTensor", ())):
        return w.dequantize()
    if hasattr(w, "tensor_type") and hasattr(w, "tensor_shape"):  # ComfyUI-GGUF's GGMLTensor: its own dequantiser
        import sys

        deq = sys.modules[type(w).__module__].dequantize_tensor
        return deq(w, torch.float32).as_subclass(torch.Tensor).reshape(tuple(w.tensor_shape))
    return w


def _all_layer_keys(model) -> list[str]:
    dm = model.model.diffusion_model
    keys = []
    for name, module in dm.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            keys.append(f"{PREFIX}{name}.weight")
    return keys


def _comfy_key(key: str) -> str:
    key = key.strip()
    if not key.startswith(PREFIX):
        key = PREFIX + key
    if not key.endswith(".weight"):
        key += ".weight"
    return key


class CasaTestDumpWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestDumpWeights",
            display_name="CASA test: dump effective weights",
            category="testing/casa",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("keys", default="*"),
                io.String.Input("filename", default="dump"),
                io.AnyType.Input("after", optional=True),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # always run: the point is to observe the live module at this moment

    @classmethod
    def execute(cls, model, keys: str, filename: str, after=None) -> io.NodeOutput:
        from safetensors.torch import save_file

        comfy.model_management.load_models_gpu([model], force_patch_weights=True)
        every = keys.strip() == "**"
        if every:
            wanted = [PREFIX + name for name, _ in model.model.diffusion_model.named_parameters()]
        elif keys.strip() in ("", "*"):
            wanted = _all_layer_keys(model)
        else:
            wanted = [_comfy_key(k) for k in keys.split(",") if k.strip()]
        tensors, meta = {}, {}
        with torch.no_grad():
            for key in wanted:
                w = comfy.model_patcher.get_key_weight(model.model, key)[0]
                layer = key[len(PREFIX):] if every else key[len(PREFIX):-len(".weight")]
                meta[f"dtype.{layer}"] = str(getattr(w, "dtype", "?")).replace("torch.", "")
                if hasattr(w, "tensor_type"):
                    meta[f"gguf.{layer}"] = getattr(w.tensor_type, "name", str(w.tensor_type))
                meta[f"class.{layer}"] = type(w).__name__
                tensors[layer] = _dequantize(w).detach().to("cpu", torch.float32).clone().contiguous()
        out_dir = os.path.join(folder_paths.get_output_directory(), SUBFOLDER)
        os.makedirs(out_dir, exist_ok=True)
        name = os.path.basename(filename) + ".safetensors"
        save_file(tensors, os.path.join(out_dir, name), metadata=meta)
        rel = f"{SUBFOLDER}/{name}"
        return io.NodeOutput(rel, ui={"casa_dump": [{"filename": name, "subfolder": SUBFOLDER, "type": "output"}],
                                      **ui.PreviewText(f"{len(tensors)} weights -> {rel}").as_dict()})


def _describe_patch_value(v) -> dict:
    """JSON-able description of one patch value as stored by ModelPatcher.add_patches."""
    if isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], str):
        kind, payload = v
        items = payload if isinstance(payload, (tuple, list)) else (payload,)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        return {"kind": kind, "shapes": [list(t.shape) for t in tensors],
                "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors]}
    weights = getattr(v, "weights", None)
    if weights is not None:  # a comfy.weight_adapter adapter
        tensors = [t for t in weights if isinstance(t, torch.Tensor)]
        alpha = weights[2] if len(weights) > 2 else None
        return {"kind": type(v).__name__, "shapes": [list(t.shape) for t in tensors[:2]],
                "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors[:2]],
                "alpha": None if alpha is None else float(alpha), "n_weights": len(weights)}
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return {"kind": "bare", "shapes": [list(v[0].shape)], "dtypes": [str(v[0].dtype).replace("torch.", "")]}
    return {"kind": type(v).__name__}


class CasaTestPatchInfo(io.ComfyNode):
    """Output node: what ``model.patches`` holds (per key: strength, kind, shapes, dtypes), in its ui dict
    ``casa_patches`` = ``[{key: [entry, ...]}]``, plus ``casa_model`` = ``[{"class", "dtype"}]``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestPatchInfo",
            display_name="CASA test: patch info",
            category="testing/casa",
            inputs=[io.Model.Input("model")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        info = {}
        for key, entries in model.patches.items():
            k = key if isinstance(key, str) else str(key)
            info[k] = [{"strength_patch": float(p[0]), "strength_model": float(p[2]), **_describe_patch_value(p[1])}
                       for p in entries]
        dtype = str(model.model_dtype()).replace("torch.", "") if hasattr(model, "model_dtype") else "?"
        return io.NodeOutput(ui={"casa_patches": [info],
                                 "casa_model": [{"class": type(model).__name__, "dtype": dtype}]})
