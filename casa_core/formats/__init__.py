"""Reading and writing model checkpoints and LoRA files: every key scheme, alpha rule and fp8 flavour.

This package is the only place that knows tensor key names. Everything above it speaks canonical layer
names (``blocks.0.self_attn.q``) and float32 tensors.
"""
from __future__ import annotations

from .checkpoint import Checkpoint, WeightProvider
from .keys import LayerMatcher, diffusers_to_original, is_diffusers_wan, strip_model_prefix
from .lora import DenseUpdate, LoRAFile, LowRankUpdate, read_lora
from .lora_write import write_comfy_lora
from .safetensors_io import SafeTensorsFile, StreamingWriter, file_digest, write_file

__all__ = [
    "Checkpoint",
    "WeightProvider",
    "LayerMatcher",
    "diffusers_to_original",
    "is_diffusers_wan",
    "strip_model_prefix",
    "DenseUpdate",
    "LoRAFile",
    "LowRankUpdate",
    "read_lora",
    "write_comfy_lora",
    "SafeTensorsFile",
    "StreamingWriter",
    "file_digest",
    "write_file",
]
