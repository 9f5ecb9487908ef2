"""Checkpoint: layer discovery in every layout, fp8 dequantisation, errors, identity."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers.lora_formats import save_checkpoint, tiny_wan_state_dict
from safetensors.torch import load_file, save_file

from casa_core.errors import CasaError
from casa_core.formats.checkpoint import Checkpoint, WeightProvider

LAYOUTS = ("original", "comfy_repack", "comfy_repack_prefix", "diffusers")


@pytest.fixture(scope="module")
def sd():
    return tiny_wan_state_dict(dim=128, ffn_dim=256, layers=2, seed=3)


def expected_layers(sd) -> dict[str, tuple[int, int]]:
    """Written out plainly: every 2-D weight of the original-named dict."""
    out = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.dim() == 2:
            out[key[: -len(".weight")]] = (t.shape[0], t.shape[1])
    return out


def test_tiny_checkpoint_matches_the_notes(sd):
    assert len(sd) == 69
    assert len(expected_layers(sd)) == 6 + 2 * 10


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_layers_and_values(tmp_path, sd, layout):
    path = save_checkpoint(tmp_path / f"{layout}.safetensors", sd, layout=layout)
    with Checkpoint(path) as ckpt:
        assert isinstance(ckpt, WeightProvider)
        assert ckpt.layers == expected_layers(sd)
        for layer in ckpt.layers:
            w = ckpt.get(layer)
            assert w.dtype == torch.float32
            assert torch.equal(w, sd[f"{layer}.weight"]), layer
        # conv kernel, biases, norms and modulation are not layers
        assert len(ckpt.other_keys) == len(sd) - len(expected_layers(sd))


def test_diffusers_layout_swaps_norm_names_back(tmp_path, sd):
    path = save_checkpoint(tmp_path / "d.safetensors", sd, layout="diffusers")
    keys = set(load_file(str(path)))
    assert "blocks.0.norm2.weight" in keys and "blocks.0.attn1.to_q.weight" in keys  # diffusers names
    assert "proj_out.weight" in keys and "condition_embedder.time_proj.weight" in keys
    with Checkpoint(path) as ckpt:
        assert torch.equal(ckpt.get("head.head"), sd["head.head.weight"])
        assert torch.equal(ckpt.get("time_projection.1"), sd["time_projection.1.weight"])


def test_bf16_storage_is_upcast(tmp_path, sd):
    path = save_checkpoint(tmp_path / "bf16.safetensors", sd, dtype=torch.bfloat16)
    with Checkpoint(path) as ckpt:
        assert ckpt.storage_dtype("blocks.0.ffn.0") == torch.bfloat16
        assert torch.equal(ckpt.get("blocks.0.ffn.0"), sd["blocks.0.ffn.0.weight"].bfloat16().float())


def test_plain_fp8(tmp_path, sd):
    path = save_checkpoint(tmp_path / "fp8.safetensors", sd, fp8="plain")
    raw = load_file(str(path))
    with Checkpoint(path) as ckpt:
        assert ckpt.storage_dtype("blocks.1.self_attn.o") == torch.float8_e4m3fn
        assert torch.equal(ckpt.get("blocks.1.self_attn.o"), raw["blocks.1.self_attn.o.weight"].float())
        # head stays float32 in these files
        assert torch.equal(ckpt.get("head.head"), sd["head.head.weight"])


@pytest.mark.parametrize("layout", ("original", "comfy_repack"))
def test_legacy_scaled_fp8(tmp_path, sd, layout):
    path = save_checkpoint(tmp_path / "legacy.safetensors", sd, layout=layout, fp8="scaled_legacy")
    raw = load_file(str(path))
    prefix = "model.diffusion_model." if layout == "comfy_repack" else ""
    with Checkpoint(path) as ckpt:
        assert f"{prefix}scaled_fp8" in ckpt.other_keys
        for layer in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
            w = raw[f"{prefix}{layer}.weight"]
            scale = raw[f"{prefix}{layer}.scale_weight"]
            assert w.dtype == torch.float8_e4m3fn and scale.numel() == 1
            expected = w.float() * scale.float().item()
            assert torch.equal(ckpt.get(layer), expected)
            assert ckpt.storage_dtype(layer) == torch.float8_e4m3fn
            # and it is close to the unquantised weight (fp8 keeps ~2 significant digits)
            ref = sd[f"{layer}.weight"]
            assert (ckpt.get(layer) - ref).abs().max() <= 0.07 * ref.abs().max()


@pytest.mark.parametrize("scale_shape", ("tensor", "row"))
def test_new_scaled_fp8(tmp_path, sd, scale_shape):
    path = save_checkpoint(tmp_path / "new.safetensors", sd, fp8="scaled_new", fp8_scale=scale_shape)
    raw = load_file(str(path))
    layer = "blocks.0.cross_attn.v"
    w, scale = raw[f"{layer}.weight"], raw[f"{layer}.weight_scale"]
    if scale_shape == "tensor":
        expected = w.float() * scale.float().item()
    else:
        expected = torch.stack([w[i].float() * scale[i].float() for i in range(w.shape[0])])
    with Checkpoint(path) as ckpt:
        assert torch.equal(ckpt.get(layer), expected)
        assert f"{layer}.comfy_quant" not in ckpt.other_keys
        assert f"{layer}.weight_scale" not in ckpt.other_keys


def test_fp8_stored_as_bytes_with_comfy_quant(tmp_path):
    w = torch.randn(4, 8).to(torch.float8_e4m3fn)
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    path = tmp_path / "u8.safetensors"
    save_file({"lin.weight": w.view(torch.uint8), "lin.weight_scale": torch.tensor(0.5), "lin.comfy_quant": conf},
              str(path))
    with Checkpoint(path) as ckpt:
        assert ckpt.storage_dtype("lin") == torch.float8_e4m3fn
        assert torch.equal(ckpt.get("lin"), w.float() * 0.5)


def test_unsupported_quantisation_is_refused(tmp_path):
    conf = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    path = tmp_path / "nvfp4.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(4, 2, dtype=torch.uint8),
               "blocks.0.ffn.0.comfy_quant": conf}, str(path))
    with pytest.raises(CasaError) as e:
        Checkpoint(path)
    assert str(e.value).startswith(f"{path}, layer blocks.0.ffn.0: weights quantised as 'nvfp4' are not supported")


def test_any_model_family(tmp_path):
    path = tmp_path / "other.safetensors"
    tensors = {"encoder.layers.0.fc1.weight": torch.randn(6, 4), "encoder.layers.0.fc1.bias": torch.randn(6),
               "conv_in.weight": torch.randn(3, 2, 3, 3), "embed.weight": torch.randn(10, 4)}
    save_file(tensors, str(path))
    with Checkpoint(path) as ckpt:
        assert ckpt.layers == {"encoder.layers.0.fc1": (6, 4), "embed": (10, 4)}
        assert sorted(ckpt.other_keys) == ["conv_in.weight", "encoder.layers.0.fc1.bias"]


def test_nan_weight_is_reported(tmp_path, sd):
    bad = dict(sd)
    bad["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].clone()
    bad["blocks.0.self_attn.q.weight"][3, 5] = float("nan")
    path = save_checkpoint(tmp_path / "nan.safetensors", bad)
    with Checkpoint(path) as ckpt:
        ckpt.get("blocks.0.self_attn.k")  # other layers read fine
        with pytest.raises(CasaError) as e:
            ckpt.get("blocks.0.self_attn.q")
    assert str(e.value) == f"{path}, layer blocks.0.self_attn.q: weight contains NaN/Inf values"
    assert e.value.layer == "blocks.0.self_attn.q"


def test_unknown_layer(tmp_path, sd):
    path = save_checkpoint(tmp_path / "c.safetensors", sd)
    with Checkpoint(path) as ckpt, pytest.raises(CasaError, match="has no layer blocks.9.ffn.0"):
        ckpt.get("blocks.9.ffn.0")


def test_identity_is_the_content_digest(tmp_path, sd):
    path = save_checkpoint(tmp_path / "c.safetensors", sd)
    digest = hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()
    with Checkpoint(path, memo_dir=tmp_path / "memo") as ckpt:
        assert ckpt.digest() == digest
        assert ckpt.identity() == "file:" + digest
    assert (tmp_path / "memo" / "file_digests.json").exists()
