"""Tiny synthetic Wan2.1 checkpoints for the ComfyUI tests.

``tiny_wan_state_dict`` comes from ``tests/helpers/lora_formats.py`` when that module provides it (the
shared helper of the whole test suite); until it does, the private fallback below is used (``SOURCE``
says which). Files are written here with safetensors directly. Needs only torch and safetensors; never
imports ComfyUI.

Layout (comfyui-notes §1 "Smallest synthetic checkpoint"): no key prefix, fp32, dim a multiple of 128
(ComfyUI derives num_heads = dim // 128), text_dim fixed at 4096, freq_dim 256, in/out 16 channels.
Detected by ComfyUI as WAN21 / WAN21_T2V (t2v) or WAN21_I2V (``i2v=True``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]

BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
)


def _fallback_tiny_wan_state_dict(dim: int = 128, ffn_dim: int = 256, layers: int = 2, seed: int = 0,
                                  in_dim: int = 16, out_dim: int = 16, text_dim: int = 4096,
                                  freq_dim: int = 256, i2v: bool = False,
                                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    if dim % 128:
        raise ValueError(f"dim must be a multiple of 128 (ComfyUI uses num_heads = dim // 128), got {dim}")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    sd: dict[str, torch.Tensor] = {}

    def linear(name, out_f, in_f):
        sd[f"{name}.weight"] = rnd(out_f, in_f)
        sd[f"{name}.bias"] = rnd(out_f)

    sd["patch_embedding.weight"] = rnd(dim, in_dim, 1, 2, 2)
    sd["patch_embedding.bias"] = rnd(dim)
    linear("text_embedding.0", dim, text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, freq_dim)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", dim * 6, dim)
    if i2v:
        sd["img_emb.proj.0.weight"] = torch.ones(1280, dtype=dtype)
        sd["img_emb.proj.0.bias"] = torch.zeros(1280, dtype=dtype)
        linear("img_emb.proj.1", 1280, 1280)
        linear("img_emb.proj.3", dim, 1280)
        sd["img_emb.proj.4.weight"] = torch.ones(dim, dtype=dtype)
        sd["img_emb.proj.4.bias"] = torch.zeros(dim, dtype=dtype)
    for n in range(layers):
        b = f"blocks.{n}"
        for lin in BLOCK_LINEARS + (("cross_attn.k_img", "cross_attn.v_img") if i2v else ()):
            linear(f"{b}.{lin}", dim, dim)
        for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k") + (
                ("cross_attn.norm_k_img",) if i2v else ()):
            sd[f"{b}.{norm}.weight"] = torch.ones(dim, dtype=dtype)
        sd[f"{b}.norm3.weight"] = torch.ones(dim, dtype=dtype)
        sd[f"{b}.norm3.bias"] = torch.zeros(dim, dtype=dtype)
        linear(f"{b}.ffn.0", ffn_dim, dim)
        linear(f"{b}.ffn.2", dim, ffn_dim)
        sd[f"{b}.modulation"] = rnd(1, 6, dim)
    linear("head.head", out_dim * 4, dim)
    sd["head.modulation"] = rnd(1, 2, dim)
    return sd


def save_safetensors(state_dict: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)
    return path


def _load_shared_helpers():
    """tests/helpers/lora_formats.py, loaded by path (tests/ need not be a package)."""
    path = _REPO / "tests" / "helpers" / "lora_formats.py"
    if not path.is_file():
        return None
    name = "casa_tests_helpers_lora_formats"
    if name in sys.modules:
        return sys.modules[name]
    # The repository root goes at the END of sys.path: it has a top-level `nodes/` folder that must never
    # shadow ComfyUI's `nodes.py` (the in-process fixture puts ComfyUI's root at the front).
    if str(_REPO) not in sys.path:
        sys.path.append(str(_REPO))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[name]
        raise
    return mod


_shared = _load_shared_helpers()
if _shared is not None and hasattr(_shared, "tiny_wan_state_dict"):
    tiny_wan_state_dict = _shared.tiny_wan_state_dict
    SOURCE = "tests/helpers/lora_formats.py"
else:
    tiny_wan_state_dict = _fallback_tiny_wan_state_dict
    SOURCE = "tests/comfy/_tiny.py (fallback)"


def write_tiny_wan(path, **kwargs) -> Path:
    """Write a tiny Wan checkpoint (``tiny_wan_state_dict(**kwargs)``) to ``path`` and return the path."""
    return save_safetensors(tiny_wan_state_dict(**kwargs), path)
