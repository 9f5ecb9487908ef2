"""casa_core's LoRA reader against ComfyUI's own LoRA loader (key mapping, alpha and strength).

For every format ComfyUI loads, the update ComfyUI would add to each layer (its key map,
``comfy.lora.load_lora`` and ``comfy.lora.calculate_weight`` applied to a zero weight) must equal
the dense update casa_core reads from the same file at the same strength.
"""
from __future__ import annotations

import pytest
import torch
from helpers.lora_formats import layer_shapes, make_lora, save_lora, tiny_wan_state_dict

from casa_core.formats.lora import read_lora

# blocks.0.cross_attn.k is included because ComfyUI recognises a VideoX-Fun file by that key
TARGETS = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0", "blocks.1.ffn.2"]

# (format, make_lora kind, alpha) — formats ComfyUI itself accepts
CASES = [
    ("kohya", "lowrank", 2.0),
    ("kohya", "lowrank", None),  # no alpha key: ComfyUI's scale is 1, not alpha = rank
    ("videox_fun", "lowrank", 8.0),
    ("comfy_lora_up_down", "lowrank", 1.0),
    ("comfy_lora_A_B", "lowrank", None),
    ("loha", "loha", 3.0),
    ("loha", "loha", None),
    ("lokr", "lokr", 2.0),
    ("lokr", "lokr_full", 2.0),
]


def comfy_deltas(model_patcher, sd: dict, strength: float) -> dict[str, torch.Tensor]:
    """What ComfyUI adds to each weight for a LoRA state dict at ``strength``."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map)  # as LoraLoader does
    out = {}
    for key, patch in patches.items():
        if not key.endswith(".weight"):
            continue
        shape = model_patcher.model.state_dict()[key].shape
        entry = [(strength, patch, 1.0, None, None)]
        with torch.no_grad():
            out[key] = comfy.lora.calculate_weight(entry, torch.zeros(shape, dtype=torch.float32), key)
    return out


@pytest.mark.parametrize("fmt,kind,alpha", CASES)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_reader_matches_comfyui_loader(comfy_inprocess, tiny_wan, tmp_path, fmt, kind, alpha, strength):
    from safetensors.torch import load_file

    sd = tiny_wan_state_dict()
    shapes = layer_shapes(sd)
    factors = make_lora(shapes, rank=4, seed=3, kind=kind,
                        targets=TARGETS)
    path = save_lora(tmp_path / f"{fmt}.safetensors", factors, fmt, alpha=alpha)
    model = comfy_inprocess.load_unet(tiny_wan)
    expected = comfy_deltas(model, load_file(str(path)), strength)
    assert len(expected) == len(TARGETS), f"ComfyUI loaded {sorted(expected)}"

    lora = read_lora(path, shapes, strength=strength)
    assert sorted(lora.updates) == sorted(k[len("diffusion_model."):-len(".weight")] for k in expected)
    for key, want in expected.items():
        upd = lora.updates[key[len("diffusion_model."):-len(".weight")]]
        got = upd.dense() if hasattr(upd, "dense") else upd.delta
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-7)
