"""Tiny synthetic Wan2.1 checkpoints for the ComfyUI tests, from the suite's shared helper.

``lora_formats`` is ``tests/helpers/lora_formats.py``, loaded by path (tests/ need not be a package;
importing this module also puts the repository root at the end of sys.path, for casa_core);
``tiny_wan_state_dict`` is its state dict and ``write_tiny_wan`` writes one with its ``save_checkpoint``.
Needs only torch and safetensors; never imports ComfyUI.

Layout (comfyui-notes §1 "Smallest synthetic checkpoint"): no key prefix, fp32, dim a multiple of 128
(ComfyUI derives num_heads = dim // 128), text_dim fixed at 4096, freq_dim 256, in/out 16 channels.
Detected by ComfyUI as WAN21 / WAN21_T2V (t2v) or WAN21_I2V (``i2v=True``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def _load_lora_formats():
    name = "casa_tests_helpers_lora_formats"
    if name in sys.modules:
        return sys.modules[name]
    # The repository root goes at the END of sys.path: it has a top-level `nodes/` folder that must never
    # shadow ComfyUI's `nodes.py` (the in-process fixture puts ComfyUI's root at the front).
    if str(_REPO) not in sys.path:
        sys.path.append(str(_REPO))
    spec = importlib.util.spec_from_file_location(name, _REPO / "tests" / "helpers" / "lora_formats.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[name]
        raise
    return mod


lora_formats = _load_lora_formats()
tiny_wan_state_dict = lora_formats.tiny_wan_state_dict


def write_tiny_wan(path, **kwargs) -> Path:
    """Write a tiny Wan checkpoint (``tiny_wan_state_dict(**kwargs)``) to ``path`` and return the path."""
    return lora_formats.save_checkpoint(path, tiny_wan_state_dict(**kwargs))
