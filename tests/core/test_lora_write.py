"""write_comfy_lora: keys and values ComfyUI reads (checked with the official loader), streaming,
atomicity."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from casa_core.errors import CasaInterrupted
from casa_core.formats.lora import read_lora
from casa_core.formats.lora_write import write_comfy_lora


def factors(seed: int):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(8, 3, generator=g)
    down = torch.randn(3, 6, generator=g)
    delta = torch.randn(5, 8, generator=g)
    return up, down, delta


def test_keys_values_and_alpha(tmp_path):
    up, down, delta = factors(0)
    path = tmp_path / "out.safetensors"
    entries = [("blocks.0.self_attn.q", "lowrank", ((8, 3), (3, 6))), ("blocks.1.ffn.2", "diff", ((5, 8),))]
    passthrough = {"diffusion_model.blocks.0.norm3.diff": torch.full((4,), 0.5, dtype=torch.float32)}
    write_comfy_lora(path, entries, iter([(up, down), (delta,)]), passthrough=passthrough,
                     metadata={"casa_lora.method": "casa"})
    sd = load_file(str(path))
    assert set(sd) == {
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        "diffusion_model.blocks.0.self_attn.q.alpha",
        "diffusion_model.blocks.1.ffn.2.diff",
        "diffusion_model.blocks.0.norm3.diff",
    }
    assert sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].dtype == torch.float16
    assert torch.equal(sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], up.half())
    assert torch.equal(sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"], down.half())
    assert sd["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 3.0  # alpha = rank
    assert torch.equal(sd["diffusion_model.blocks.1.ffn.2.diff"], delta.half())
    assert sd["diffusion_model.blocks.0.norm3.diff"].dtype == torch.float32  # pass-through keeps its dtype
    # ComfyUI's rule: scale = alpha / rank = 1, so the applied update is exactly up @ down
    alpha = sd["diffusion_model.blocks.0.self_attn.q.alpha"].item()
    applied = alpha / 3 * (sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].float()
                           @ sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].float())
    assert torch.allclose(applied, up.half().float() @ down.half().float())

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"casa_lora.method": "casa"}


def test_callable_source_and_float32(tmp_path):
    up, down, delta = factors(1)
    calls = []

    def source(layer, kind):
        calls.append((layer, kind))
        return (up, down) if kind == "lowrank" else (delta,)

    path = tmp_path / "out.safetensors"
    write_comfy_lora(path, [("a.b", "diff", ((5, 8),)), ("c", "lowrank", ((8, 3), (3, 6)))], source,
                     dtype=torch.float32)
    assert calls == [("a.b", "diff"), ("c", "lowrank")]
    sd = load_file(str(path))
    assert torch.equal(sd["diffusion_model.a.b.diff"], delta)
    assert torch.equal(sd["diffusion_model.c.lora_up.weight"], up)


def test_round_trip_through_read_lora(tmp_path):
    up, down, delta = factors(2)
    path = tmp_path / "rt.safetensors"
    write_comfy_lora(path, [("blocks.0.x", "lowrank", ((8, 3), (3, 6))), ("blocks.0.y", "diff", ((5, 8),))],
                     [(up, down), (delta,)], dtype=torch.float32)
    lora = read_lora(path, {"blocks.0.x": (8, 6), "blocks.0.y": (5, 8)}, strength=1.0)
    assert lora.updates["blocks.0.x"].scale == 1.0
    assert torch.allclose(lora.updates["blocks.0.x"].dense(), up @ down)
    assert torch.equal(lora.passthrough_layers["blocks.0.y"], delta)


def test_dense_layers_are_not_kept_alive(tmp_path):
    """While layer n+1 is produced, nothing in the writer still references layer n."""
    n_layers = 4
    entries = [(f"blocks.{i}.ffn.0", "diff", ((16, 8),)) for i in range(n_layers)]
    previous: list[weakref.ref] = []

    def source():
        for _ in range(n_layers):
            if previous:
                gc.collect()
                assert previous[-1]() is None, "the previous layer is still referenced"
            t = torch.randn(16, 8)
            previous.append(weakref.ref(t))
            yield (t,)
            del t

    write_comfy_lora(tmp_path / "dense.safetensors", entries, source())
    assert len(load_file(str(tmp_path / "dense.safetensors"))) == n_layers


def test_interrupted_write_leaves_nothing(tmp_path):
    entries = [(f"l{i}", "diff", ((2, 2),)) for i in range(3)]

    def source():
        yield (torch.zeros(2, 2),)
        raise CasaInterrupted("interrupted by the user")

    path = tmp_path / "out.safetensors"
    with pytest.raises(CasaInterrupted):
        write_comfy_lora(path, entries, source())
    assert list(tmp_path.iterdir()) == []


def test_source_length_must_match_entries(tmp_path):
    entries = [("a", "diff", ((2, 2),)), ("b", "diff", ((2, 2),))]
    with pytest.raises(ValueError, match="ended before layer b"):
        write_comfy_lora(tmp_path / "x.safetensors", entries, [(torch.zeros(2, 2),)])
    with pytest.raises(ValueError, match="more layers than entries"):
        write_comfy_lora(tmp_path / "x.safetensors", entries, [(torch.zeros(2, 2),)] * 3)
    assert list(tmp_path.iterdir()) == []


def test_passthrough_may_not_collide(tmp_path):
    with pytest.raises(ValueError, match="collide"):
        write_comfy_lora(tmp_path / "x.safetensors", [("a", "diff", ((2, 2),))], [(torch.zeros(2, 2),)],
                         passthrough={"diffusion_model.a.diff": torch.zeros(2, 2)})
