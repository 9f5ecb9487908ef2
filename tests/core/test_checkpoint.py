"""Checkpoint: layer discovery in every layout, fp8 dequantisation, errors, identity."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers.lora_formats import save_checkpoint, tiny_wan_state_dict
from safetensors.torch import load_file, save_file

from casa_core.errors import CasaError
from casa_core.formats.checkpoint import Checkpoint, WeightProvider, check_finite, open_model

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


def _conf(**conf):
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("conf, says", [
    ({"format": "asym_w4a8_int8"}, "weights quantised as 'asym_w4a8_int8' are not supported"),
    ({"format": "int8_tensorwise", "params": {"convrot": True}},
     "weights quantised as 'int8_tensorwise' with a rotation (convrot) are not supported"),
])
def test_unsupported_quantisation_is_refused(tmp_path, conf, says):
    path = tmp_path / "q.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(4, 8, dtype=torch.int8),
               "blocks.0.ffn.0.weight_scale": torch.tensor(0.5), "blocks.0.ffn.0.comfy_quant": _conf(**conf)},
              str(path))
    with pytest.raises(CasaError) as e:
        Checkpoint(path)
    assert str(e.value).startswith(f"{path}, layer blocks.0.ffn.0: {says}")


def test_a_quantised_layer_without_its_scales_is_refused_by_name(tmp_path):
    path = tmp_path / "nvfp4.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(4, 8, dtype=torch.uint8),
               "blocks.0.ffn.0.weight_scale": torch.zeros(128, 4, dtype=torch.uint8),
               "blocks.0.ffn.0.comfy_quant": _conf(format="nvfp4")}, str(path))
    with pytest.raises(CasaError) as e:
        Checkpoint(path)
    assert str(e.value) == (f"{path}, layer blocks.0.ffn.0: weights quantised as 'nvfp4' need "
                            f"'blocks.0.ffn.0.weight_scale_2', which the file does not have")


def _tile(scales: torch.Tensor) -> torch.Tensor:
    """cuBLAS's block-scaling-factor layout, written out element by element from its description: 128 x 4
    tiles one after the other (row tiles outer), entry (r, c) of a tile at (r % 32) * 16 + (r // 32) * 4 + c."""
    rows, cols = scales.shape
    rt, ct = -(-rows // 128), -(-cols // 4)
    out = torch.zeros(rt * ct * 512, dtype=scales.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * ct + c // 4
            rr, cc = r % 128, c % 4
            out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] = scales[r, c]
    return out.reshape(rt * 128, ct * 4)


def test_int8_mxfp8_and_nvfp4_files_are_decoded(tmp_path):
    """ComfyUI's int8_tensorwise (per-row scale), mxfp8 and nvfp4 layers, written here from the formats'
    definitions (rows that fill part of a 128-row scale tile; nvfp4's first value in the high nibble)."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 200, 64
    q8 = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    s8 = torch.rand(rows, 1, generator=g) * 1e-3
    fp8 = (torch.randn(rows, cols, generator=g) * 50).to(torch.float8_e4m3fn)
    exps = torch.randint(110, 125, (rows, cols // 32), generator=g, dtype=torch.uint8)
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    packed = (codes[:, 0::2] * 16 + codes[:, 1::2]).to(torch.uint8)
    bscale = (torch.rand(rows, cols // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
    ts = torch.tensor(3e-5)
    save_file({
        "blocks.0.self_attn.q.weight": q8, "blocks.0.self_attn.q.weight_scale": s8,
        "blocks.0.self_attn.q.comfy_quant": _conf(format="int8_tensorwise"),
        "blocks.0.self_attn.k.weight": fp8, "blocks.0.self_attn.k.weight_scale": _tile(exps),
        "blocks.0.self_attn.k.comfy_quant": _conf(format="mxfp8"),
        "blocks.0.self_attn.v.weight": packed, "blocks.0.self_attn.v.weight_scale": _tile(bscale.view(torch.uint8)),
        "blocks.0.self_attn.v.weight_scale_2": ts, "blocks.0.self_attn.v.comfy_quant": _conf(format="nvfp4"),
    }, str(tmp_path / "q.safetensors"))
    with Checkpoint(tmp_path / "q.safetensors") as ckpt:
        assert ckpt.layers == {f"blocks.0.self_attn.{x}": (rows, cols) for x in "qkv"}
        assert not [k for k in ckpt.other_keys if "scale" in k or "comfy_quant" in k], ckpt.other_keys
        assert torch.equal(ckpt.get("blocks.0.self_attn.q"), q8.float() * s8)
        mx = fp8.float() * torch.exp2(exps.float() - 127).repeat_interleave(32, dim=1)
        assert torch.equal(ckpt.get("blocks.0.self_attn.k"), mx)
        nv = e2m1[codes] * (bscale.float() * ts).repeat_interleave(16, dim=1)
        assert torch.equal(ckpt.get("blocks.0.self_attn.v"), nv)
        assert [ckpt.grid(f"blocks.0.self_attn.{x}").kind for x in "qkv"] == ["int8", "mxfp8", "nvfp4"]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finiteness_check_catches_every_nan_and_inf_and_only_them(dtype):
    """One reducing pass decides for most tensors: a NaN, +Inf, -Inf or both infinities (whose sum is NaN) are
    caught; huge finite values whose sum overflows, and float16 weights whose float16 sum would, are not."""
    base = torch.randn(512, 256).to(dtype)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = base.clone()
        for i, v in enumerate(bad):
            t[7 + i, 3] = v
        with pytest.raises(CasaError, match="contains NaN/Inf values"):
            check_finite(t, file="f", layer="l", what="weight")
    big = torch.full((512, 256), 6e4 if dtype == torch.float16 else 3e35).to(dtype)  # the sum overflows
    check_finite(big, file="f", layer="l", what="weight")
    check_finite(base, file="f", layer="l", what="weight")


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


def _write_shards(folder, sd, n_shards: int = 3, prefix: str = "diffusion_pytorch_model") -> dict[str, str]:
    """``sd`` split over ``n_shards`` files the way diffusers / the Wan releases name them, with the index
    beside them (written here from the format's definition: a ``weight_map`` of tensor -> shard file)."""
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"{prefix}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n_shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_a_model_in_shards_reads_as_one_file_through_its_index_or_its_folder(tmp_path, sd):
    _write_shards(tmp_path, sd)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    for given in (index, tmp_path):
        with open_model(given, memo_dir=tmp_path / "memo") as ckpt:
            assert ckpt.layers == expected_layers(sd)
            for layer in ckpt.layers:
                assert torch.equal(ckpt.get(layer), sd[f"{layer}.weight"]), layer
            assert len(ckpt.other_keys) == len(sd) - len(expected_layers(sd))
            first = ckpt.identity()
    # the identity follows every shard's content: one value changed in one shard changes it
    shard = tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors"
    part = load_file(str(shard))
    key = next(k for k in part if part[k].dim() == 2)
    part[key] = part[key].clone()
    part[key][0, 0] += 1.0
    save_file(part, str(shard))
    with open_model(index, memo_dir=tmp_path / "memo") as ckpt:
        assert ckpt.identity() != first


def test_a_broken_shard_set_is_one_sentence_naming_the_index(tmp_path, sd):
    weight_map = _write_shards(tmp_path, sd)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    # a tensor the index puts in the wrong shard
    key = next(iter(weight_map))
    wrong = next(s for s in set(weight_map.values()) if s != weight_map[key])
    bad = dict(data, weight_map=dict(weight_map, **{key: wrong}))
    (tmp_path / "bad.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(CasaError, match=rf"puts tensor '{key}' in {wrong}, which does not hold it"):
        open_model(tmp_path / "bad.safetensors.index.json")
    # a missing shard
    (tmp_path / "diffusion_pytorch_model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CasaError, match="its shard diffusion_pytorch_model-00003-of-00003.safetensors is missing"):
        open_model(index)
    # not an index at all
    (tmp_path / "x.safetensors.index.json").write_text('{"hello": 1}')
    with pytest.raises(CasaError, match="has no 'weight_map'"):
        open_model(tmp_path / "x.safetensors.index.json")


def test_a_folder_is_read_when_it_holds_one_model(tmp_path, sd):
    one = tmp_path / "one"
    one.mkdir()
    save_checkpoint(one / "model.safetensors", sd)
    (one / "config.json").write_text("{}")
    with open_model(one) as ckpt:
        assert ckpt.layers == expected_layers(sd)
    two = tmp_path / "two"
    two.mkdir()
    save_checkpoint(two / "a.safetensors", sd)
    save_checkpoint(two / "b.safetensors", sd)
    with pytest.raises(CasaError, match=r"is a folder with 2 model files \(a.safetensors, b.safetensors\)"):
        open_model(two)
    (tmp_path / "none").mkdir()
    with pytest.raises(CasaError, match="is a folder without a model file"):
        open_model(tmp_path / "none")


@pytest.mark.parametrize("fmt", ["musubi", "peft", "loha"])
def test_a_lora_given_as_a_model_is_named_as_one(tmp_path, fmt):
    """Its "layers" would be its factors: the drift would be nonsense. One sentence, pointing to where a
    LoRA goes."""
    down, up = torch.randn(4, 64), torch.randn(64, 4)
    if fmt == "musubi":
        sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": down, "lora_unet_blocks_0_self_attn_q.lora_up.weight": up,
              "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}
    elif fmt == "peft":
        sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
              "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up}
    else:
        sd = {f"lycoris_blocks_0_self_attn_q.hada_w{i}_{ab}": (up if ab == "a" else down).clone()
              for i in (1, 2) for ab in ("a", "b")}
    save_file(sd, str(tmp_path / "l.safetensors"))
    with pytest.raises(CasaError, match=r"l.safetensors is a LoRA \(its weights are LoRA factors such as .*--distill-lora"):
        Checkpoint(tmp_path / "l.safetensors")
