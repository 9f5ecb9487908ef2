"""Tiny HunyuanVideo-1.5-shaped state dicts in both namings, written out by hand (independent of casa_core).

ComfyUI detects HunyuanVideo by ``txt_in.individual_token_refiner.blocks.0.norm1.weight`` and 1.5 by
``vision_in.proj.0.weight`` (1152 wide) and ``cond_type_embedding.weight``
(comfy/model_detection.py); ``img_in.proj`` is a Conv3d (in_channels 65 = 32 latent + 32 image + mask,
patch 1x1x1), ``final_layer.linear`` gives out_channels (32). The head dim is 128 (num_heads =
hidden // 128) and the rotary axes 16+56+56, so ``hidden`` must be 128 per head.

* ``naming="comfy"``: the module names of ComfyUI's model (``double_blocks.0.img_attn.qkv``,
  ``img_mlp.0``, ``img_mod.lin``, ``txt_in.t_embedder.in_layer``, ``*.norm.query_norm.weight``);
* ``naming="original"``: the release naming ComfyUI converts on load (``img_attn_qkv``, ``img_mlp.fc1``,
  ``img_mod.linear``, ``txt_in.t_embedder.mlp.0``, ``img_attn_q_norm.weight``, single blocks'
  ``modulation.linear`` and ``q_norm``).
"""
from __future__ import annotations

import torch

# comfy name -> original name, for every module of the model whose name differs (written out by hand)
ORIGINAL_OF = {
    "time_in.in_layer": "time_in.mlp.0",
    "time_in.out_layer": "time_in.mlp.2",
    "txt_in.t_embedder.in_layer": "txt_in.t_embedder.mlp.0",
    "txt_in.t_embedder.out_layer": "txt_in.t_embedder.mlp.2",
    "txt_in.c_embedder.in_layer": "txt_in.c_embedder.linear_1",
    "txt_in.c_embedder.out_layer": "txt_in.c_embedder.linear_2",
}
_REFINER = {"self_attn.qkv": "self_attn_qkv", "self_attn.proj": "self_attn_proj", "mlp.0": "mlp.fc1",
            "mlp.2": "mlp.fc2"}
_DOUBLE = {"img_mod.lin": "img_mod.linear", "img_attn.qkv": "img_attn_qkv", "img_attn.proj": "img_attn_proj",
           "img_mlp.0": "img_mlp.fc1", "img_mlp.2": "img_mlp.fc2", "txt_mod.lin": "txt_mod.linear",
           "txt_attn.qkv": "txt_attn_qkv", "txt_attn.proj": "txt_attn_proj", "txt_mlp.0": "txt_mlp.fc1",
           "txt_mlp.2": "txt_mlp.fc2",
           "img_attn.norm.query_norm": "img_attn_q_norm", "img_attn.norm.key_norm": "img_attn_k_norm",
           "txt_attn.norm.query_norm": "txt_attn_q_norm", "txt_attn.norm.key_norm": "txt_attn_k_norm"}
_SINGLE = {"modulation.lin": "modulation.linear", "norm.query_norm": "q_norm", "norm.key_norm": "k_norm"}


def original_name(key: str) -> str:
    """The original release name of a ComfyUI-named HunyuanVideo key (``….weight`` / ``….bias``)."""
    module, param = key.rsplit(".", 1)
    if module in ORIGINAL_OF:
        return f"{ORIGINAL_OF[module]}.{param}"
    parts = module.split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        rest = ".".join(parts[2:])
        table = _DOUBLE if parts[0] == "double_blocks" else _SINGLE
        if rest in table:
            return f"{parts[0]}.{parts[1]}.{table[rest]}.{param}"
    if module.startswith("txt_in.individual_token_refiner.blocks."):
        head = ".".join(parts[:4])
        rest = ".".join(parts[4:])
        if rest in _REFINER:
            return f"{head}.{_REFINER[rest]}.{param}"
    return key


def tiny_hunyuan15_state_dict(hidden: int = 128, depth: int = 1, single: int = 1, context: int = 64,
                              seed: int = 0, naming: str = "comfy") -> dict[str, torch.Tensor]:
    """A complete HunyuanVideo-1.5 state dict (no byT5 mapper) with random weights (std 0.02)."""
    if hidden % 128:
        raise ValueError("hidden must be a multiple of 128 (head dim 128)")
    g = torch.Generator().manual_seed(seed)
    mlp = 4 * hidden
    sd: dict[str, torch.Tensor] = {}

    def lin(name: str, out_f: int, in_f: int) -> None:
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) * 0.02
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.02

    def norm(name: str, width: int, bias: bool = True) -> None:
        sd[f"{name}.weight"] = torch.ones(width)
        if bias:
            sd[f"{name}.bias"] = torch.zeros(width)

    sd["img_in.proj.weight"] = torch.randn(hidden, 65, 1, 1, 1, generator=g) * 0.02
    sd["img_in.proj.bias"] = torch.zeros(hidden)
    lin("time_in.in_layer", hidden, 256)
    lin("time_in.out_layer", hidden, hidden)
    lin("txt_in.input_embedder", hidden, context)
    lin("txt_in.t_embedder.in_layer", hidden, 256)
    lin("txt_in.t_embedder.out_layer", hidden, hidden)
    lin("txt_in.c_embedder.in_layer", hidden, context)
    lin("txt_in.c_embedder.out_layer", hidden, hidden)
    for b in range(2):
        p = f"txt_in.individual_token_refiner.blocks.{b}"
        lin(f"{p}.adaLN_modulation.1", 2 * hidden, hidden)
        norm(f"{p}.norm1", hidden)
        lin(f"{p}.self_attn.qkv", 3 * hidden, hidden)
        lin(f"{p}.self_attn.proj", hidden, hidden)
        norm(f"{p}.norm2", hidden)
        lin(f"{p}.mlp.0", mlp, hidden)
        lin(f"{p}.mlp.2", hidden, mlp)
    for b in range(depth):
        p = f"double_blocks.{b}"
        for s in ("img", "txt"):
            lin(f"{p}.{s}_mod.lin", 6 * hidden, hidden)
            lin(f"{p}.{s}_attn.qkv", 3 * hidden, hidden)
            norm(f"{p}.{s}_attn.norm.query_norm", hidden, bias=False)
            norm(f"{p}.{s}_attn.norm.key_norm", hidden, bias=False)
            lin(f"{p}.{s}_attn.proj", hidden, hidden)
            lin(f"{p}.{s}_mlp.0", mlp, hidden)
            lin(f"{p}.{s}_mlp.2", hidden, mlp)
    for b in range(single):
        p = f"single_blocks.{b}"
        lin(f"{p}.linear1", 3 * hidden + mlp, hidden)
        lin(f"{p}.linear2", hidden, hidden + mlp)
        norm(f"{p}.norm.query_norm", hidden, bias=False)
        norm(f"{p}.norm.key_norm", hidden, bias=False)
        lin(f"{p}.modulation.lin", 3 * hidden, hidden)
    lin("final_layer.linear", 32, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    norm("vision_in.proj.0", 1152)
    lin("vision_in.proj.1", 1152, 1152)
    lin("vision_in.proj.3", hidden, 1152)
    norm("vision_in.proj.4", hidden)
    sd["cond_type_embedding.weight"] = torch.randn(3, hidden, generator=g) * 0.02
    if naming == "comfy":
        return sd
    if naming == "original":
        return {original_name(k): v for k, v in sd.items()}
    raise ValueError(f"unknown naming {naming!r}")


def block_layers(sd_comfy: dict[str, torch.Tensor]) -> list[str]:
    """The double/single block linears (ComfyUI names, no ``.weight``): what LoRAs for HunyuanVideo train."""
    return sorted(k[: -len(".weight")] for k, v in sd_comfy.items()
                  if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.ndim == 2)
