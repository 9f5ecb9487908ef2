"""read_lora: every format gives strength * alpha / r * B @ A (written out plainly here), plus the
pass-through, unmatched and error behaviour."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from helpers.lora_formats import distill_extras, layer_shapes, make_lora, save_lora, tiny_wan_state_dict
from safetensors.torch import save_file

from casa_core.errors import CasaError
from casa_core.formats.keys import LayerMatcher
from casa_core.formats.lora import DenseUpdate, LowRankUpdate, read_lora

RANK = 4


@pytest.fixture(scope="module")
def sd():
    return tiny_wan_state_dict(layers=2, seed=1)


@pytest.fixture(scope="module")
def shapes(sd):
    return layer_shapes(sd)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# helper format -> LoRAFile.format, for the formats whose alpha lives in tensors
TENSOR_ALPHA_FORMATS = {"kohya": "kohya", "videox_fun": "videox_fun", "comfy_lora_up_down": "comfy",
                        "comfy_lora_A_B": "comfy", "bare_blocks": "original", "distill": "comfy"}


@pytest.mark.parametrize("fmt", TENSOR_ALPHA_FORMATS)
@pytest.mark.parametrize("alpha", (None, 2.0, 16.0))
def test_low_rank_formats(tmp_path, shapes, fmt, alpha):
    factors = make_lora(shapes, rank=RANK, seed=5)
    path = save_lora(tmp_path / f"{fmt}.safetensors", factors, fmt, alpha=alpha)
    strength = 0.7
    lora = read_lora(path, shapes, strength=strength)
    assert lora.format == TENSOR_ALPHA_FORMATS[fmt]
    assert set(lora.updates) == set(factors)
    assert lora.unmatched == []
    for layer, (B, A) in factors.items():
        upd = lora.updates[layer]
        assert isinstance(upd, LowRankUpdate)
        scale = strength * alpha / RANK if alpha is not None else strength * 1.0  # ComfyUI: no alpha -> 1
        assert upd.scale == pytest.approx(scale)
        assert upd.rank == RANK
        assert upd.alpha == alpha
        assert upd.alpha_rule == ("tensor" if alpha is not None else "none")
        assert upd.up.dtype == torch.float32 and upd.down.dtype == torch.float32
        assert close(upd.dense(), scale * (B @ A)), layer


def test_per_layer_alpha(tmp_path, shapes):
    factors = make_lora(shapes, rank=8, seed=2, targets=["blocks.0.self_attn.q", "blocks.1.ffn.0"])
    alphas = {"blocks.0.self_attn.q": 1.0, "blocks.1.ffn.0": 8.0}
    path = save_lora(tmp_path / "k.safetensors", factors, "kohya", alpha=alphas)
    lora = read_lora(path, shapes)
    for layer, (B, A) in factors.items():
        assert close(lora.updates[layer].dense(), alphas[layer] / 8 * (B @ A))


def test_half_precision_factors_are_upcast(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=2, targets=["blocks.0.ffn.2"])
    path = save_lora(tmp_path / "h.safetensors", factors, "comfy_lora_up_down", alpha=2.0, dtype=torch.bfloat16)
    (B, A), = factors.values()
    upd = read_lora(path, shapes).updates["blocks.0.ffn.2"]
    assert upd.up.dtype == torch.float32
    assert close(upd.dense(), 0.5 * (B.bfloat16().float() @ A.bfloat16().float()))


def test_diffsynth_default_has_no_alpha(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=3)
    path = save_lora(tmp_path / "ds.safetensors", factors, "diffsynth_default")
    lora = read_lora(path, shapes, strength=1.3)
    assert lora.format == "diffsynth"
    for layer, (B, A) in factors.items():
        assert lora.updates[layer].alpha_rule == "none"
        assert close(lora.updates[layer].dense(), 1.3 * (B @ A))


@pytest.mark.parametrize("fmt", ("diffusers_peft", "peft_base_model"))
def test_peft_without_alpha_is_scale_one(tmp_path, shapes, fmt):
    factors = make_lora(shapes, rank=RANK, seed=4)
    path = save_lora(tmp_path / "p.safetensors", factors, fmt)
    lora = read_lora(path, shapes)
    assert set(lora.updates) == set(factors)
    for layer, (B, A) in factors.items():
        assert lora.updates[layer].alpha_rule == "none"
        assert close(lora.updates[layer].dense(), B @ A)
    assert lora.peft_scale_note() is None


@pytest.mark.parametrize("fmt", ("diffusers_peft", "peft_base_model"))
def test_peft_alpha_from_metadata(tmp_path, shapes, fmt):
    factors = make_lora(shapes, rank=RANK, seed=4)
    path = save_lora(tmp_path / "p.safetensors", factors, fmt, alpha=8.0)
    lora = read_lora(path, shapes, strength=0.5)
    assert lora.format == ("diffusers" if fmt == "diffusers_peft" else "peft")
    for layer, (B, A) in factors.items():
        assert lora.updates[layer].alpha_rule == "peft"
        assert close(lora.updates[layer].dense(), 0.5 * 8.0 / RANK * (B @ A))
    # ComfyUI's loader reads no PEFT metadata: the summary says what was applied instead (strength apart)
    note = lora.peft_scale_note()
    assert note.startswith(f"{len(factors)} layer(s) scaled x{8.0 / RANK:g} by the LoRA's PEFT configuration"), note
    assert "ComfyUI's own LoRA loader ignores that configuration" in note


def test_peft_rslora_and_alpha_pattern(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=4)
    path = save_lora(tmp_path / "p.safetensors", factors, "diffusers_peft", alpha=8.0,
                     alpha_pattern={"attn1.to_q": 2.0}, use_rslora=True)
    lora = read_lora(path, shapes)
    for layer, (B, A) in factors.items():
        upd = lora.updates[layer]
        if layer.endswith("self_attn.q"):
            assert upd.alpha_rule == "peft_pattern_rslora"
            assert close(upd.dense(), 2.0 / math.sqrt(RANK) * (B @ A))
        else:
            assert upd.alpha_rule == "peft_rslora"
            assert close(upd.dense(), 8.0 / math.sqrt(RANK) * (B @ A))
    lo, hi = sorted((2.0 / math.sqrt(RANK), 8.0 / math.sqrt(RANK)))
    assert f"scaled x{lo:g} to x{hi:g} by the LoRA's PEFT configuration" in lora.peft_scale_note()


def test_peft_adapter_config_beside_the_file(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=4, targets=["blocks.0.self_attn.v"])
    path = save_lora(tmp_path / "adapter_model.safetensors", factors, "peft_base_model")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2}))
    (B, A), = factors.values()
    upd = read_lora(path, shapes).updates["blocks.0.self_attn.v"]
    assert upd.alpha_rule == "peft"
    assert close(upd.dense(), 2 / RANK * (B @ A))


def test_loha(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=6, kind="loha")
    path = save_lora(tmp_path / "loha.safetensors", factors, "loha", alpha=2.0)
    lora = read_lora(path, shapes, strength=0.8)
    for layer, (w1a, w1b, w2a, w2b) in factors.items():
        upd = lora.updates[layer]
        assert isinstance(upd, DenseUpdate) and upd.kind == "loha"
        assert close(upd.delta, 0.8 * 2.0 / RANK * ((w1a @ w1b) * (w2a @ w2b)))


def test_lokr(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=7, kind="lokr")
    path = save_lora(tmp_path / "lokr.safetensors", factors, "lokr", alpha=2.0)
    lora = read_lora(path, shapes, strength=0.5)
    for layer, (w1, w2a, w2b) in factors.items():
        upd = lora.updates[layer]
        assert isinstance(upd, DenseUpdate) and upd.kind == "lokr"
        assert close(upd.delta, 0.5 * 2.0 / RANK * torch.kron(w1, w2a @ w2b))


def test_lokr_without_factorised_half_ignores_alpha(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=7, kind="lokr_full", targets=["blocks.1.ffn.0"])
    path = save_lora(tmp_path / "lokr.safetensors", factors, "lokr", alpha=2.0)
    (w1, w2), = factors.values()
    assert close(read_lora(path, shapes).updates["blocks.1.ffn.0"].delta, torch.kron(w1, w2))


# -- names -----------------------------------------------------------------------------------------------


def test_kohya_underscore_resolution():
    layers = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.0.ffn.0", "blocks.12.ffn.2", "head.head",
              "text_embedding.0"]
    m = LayerMatcher(layers)
    assert m.match("lora_unet_blocks_0_self_attn_q") == "blocks.0.self_attn.q"
    assert m.match("lora_unet_blocks_12_ffn_2") == "blocks.12.ffn.2"
    assert m.match("lora_unet__blocks_0_ffn_0") == "blocks.0.ffn.0"
    assert m.match("lora_unet_text_embedding_0") == "text_embedding.0"
    assert m.match("lora_transformer_blocks_0_attn1_to_q") == "blocks.0.self_attn.q"  # OneTrainer
    assert m.match("lora_unet_blocks_0_cross_attn_k_img") is None
    assert m.canonical_module("lora_unet_blocks_0_cross_attn_k_img") == "blocks.0.cross_attn.k_img"
    assert m.canonical_module("lora_unet_blocks_0_self_attn_norm_q") == "blocks.0.self_attn.norm_q"
    assert m.canonical_module("lora_unet_blocks_0_norm3") == "blocks.0.norm3"


def test_prefixes_and_diffusers_names():
    m = LayerMatcher(["blocks.0.self_attn.o", "blocks.0.cross_attn.v_img", "blocks.1.ffn.0", "head.head"])
    assert m.match("diffusion_model.blocks.0.self_attn.o") == "blocks.0.self_attn.o"
    assert m.match("model.diffusion_model.blocks.0.self_attn.o") == "blocks.0.self_attn.o"
    assert m.match("blocks.0.self_attn.o") == "blocks.0.self_attn.o"
    assert m.match("transformer.blocks.0.attn1.to_out.0") == "blocks.0.self_attn.o"
    assert m.match("base_model.model.transformer.blocks.0.attn2.add_v_proj") == "blocks.0.cross_attn.v_img"
    assert m.match("base_model.model.blocks.1.ffn.net.0.proj") == "blocks.1.ffn.0"
    assert m.match("transformer.proj_out") == "head.head"
    assert m.match("blocks.0.self_attn.x") is None
    assert LayerMatcher(["blocks.0.ffn.0"], diffusers_naming=True).canonical_module(
        "transformer.blocks.0.norm2") == "blocks.0.norm3"


def test_i2v_keys_on_a_t2v_model_are_reported(tmp_path, shapes):
    i2v_shapes = layer_shapes(tiny_wan_state_dict(layers=2, seed=1, i2v=True))
    factors = make_lora(i2v_shapes, rank=RANK, seed=8)
    path = save_lora(tmp_path / "i2v.safetensors", factors, "kohya", alpha=1.0)
    lora = read_lora(path, shapes)
    img_layers = [layer for layer in factors if layer.endswith(("k_img", "v_img"))]
    assert len(img_layers) == 4
    assert set(lora.updates) == set(factors) - set(img_layers)
    expected_unmatched = set()
    for layer in img_layers:
        base = "lora_unet_" + layer.replace(".", "_")
        expected_unmatched |= {f"{base}.lora_up.weight", f"{base}.lora_down.weight", f"{base}.alpha"}
    assert set(lora.unmatched) == expected_unmatched
    assert lora.passthrough == {}


# -- pass-through ----------------------------------------------------------------------------------------


def test_distill_lora_passthrough(tmp_path, sd, shapes):
    factors = make_lora(shapes, rank=RANK, seed=9)
    extras = distill_extras(sd, seed=2)
    path = save_lora(tmp_path / "distill.safetensors", factors, "distill", alpha=RANK, extra=extras)
    strength = 0.6
    lora = read_lora(path, shapes, strength=strength)
    assert lora.format == "comfy"
    assert set(lora.updates) == set(factors)
    # already ComfyUI names: kept as they are, except .diff_m, which ComfyUI's loader never applies
    diff_m = {k for k in extras if k.endswith(".diff_m")}
    assert diff_m == {"diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.1.diff_m"}
    assert set(lora.passthrough) == set(extras) - diff_m
    assert set(lora.dropped) == diff_m
    for key in set(extras) - diff_m:
        assert torch.equal(lora.passthrough[key], extras[key]), key  # untouched
    assert "diffusion_model.blocks.1.self_attn.q.diff_b" in lora.passthrough
    assert set(lora.passthrough_layers) == {"head.head"}
    assert close(lora.passthrough_layers["head.head"], strength * extras["diffusion_model.head.head.diff"])
    scaled = lora.passthrough_at_strength()
    assert close(scaled["diffusion_model.blocks.0.norm3.diff"],
                 strength * extras["diffusion_model.blocks.0.norm3.diff"])


def test_passthrough_keys_get_comfy_names(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=9, targets=["blocks.0.self_attn.q"])
    extra = {
        "lora_unet_blocks_0_norm3.diff": torch.full((128,), 0.5),
        "lora_unet_blocks_1_cross_attn_norm_k.diff": torch.full((128,), 0.25),
        "lora_unet_blocks_0_ffn_0.diff_b": torch.full((256,), 0.125),
        "lora_unet_blocks_1_self_attn_k.diff": torch.full((128, 128), 0.01),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.diff": torch.ones(3),
        "some_unknown_key": torch.ones(2),
        "blocks.0.set_weight": torch.ones(1),
    }
    path = save_lora(tmp_path / "k.safetensors", factors, "kohya", alpha=1.0, extra=extra)
    lora = read_lora(path, shapes, strength=2.0)
    assert set(lora.passthrough) == {
        "diffusion_model.blocks.0.norm3.diff",
        "diffusion_model.blocks.1.cross_attn.norm_k.diff",
        "diffusion_model.blocks.0.ffn.0.diff_b",
        "diffusion_model.blocks.1.self_attn.k.diff",
        "diffusion_model.blocks.0.set_weight",  # without the model's keys: a recognised module counts
    }
    # keys ComfyUI could not load are not carried (and never written): listed with the reason
    assert set(lora.dropped) == {"lora_te_text_model_encoder_layers_0_mlp_fc1.diff", "some_unknown_key"}
    assert torch.equal(lora.passthrough["diffusion_model.blocks.0.norm3.diff"], torch.full((128,), 0.5))
    assert set(lora.passthrough_layers) == {"blocks.1.self_attn.k"}
    assert torch.equal(lora.passthrough_layers["blocks.1.self_attn.k"], torch.full((128, 128), 0.02))
    scaled = lora.passthrough_at_strength()
    assert torch.equal(scaled["diffusion_model.blocks.0.set_weight"], torch.ones(1))  # never scaled
    assert torch.equal(scaled["diffusion_model.blocks.0.ffn.0.diff_b"], torch.full((256,), 0.25))


# -- errors ----------------------------------------------------------------------------------------------


def test_lora_for_another_model_size(tmp_path, shapes):
    big = layer_shapes(tiny_wan_state_dict(dim=256, ffn_dim=512, layers=2))
    factors = make_lora(big, rank=RANK, seed=1, targets=["blocks.0.self_attn.q"])
    path = save_lora(tmp_path / "big.safetensors", factors, "kohya")
    with pytest.raises(CasaError) as e:
        read_lora(path, shapes)
    assert str(e.value) == (f"{path}, layer blocks.0.self_attn.q: the LoRA update is 256×256 but the model's "
                            f"layer is 128×128 — this LoRA was made for another model size")
    assert e.value.file == str(path) and e.value.layer == "blocks.0.self_attn.q"


def test_nan_in_a_factor(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=1, targets=["blocks.1.ffn.2"])
    factors["blocks.1.ffn.2"][1][0, 0] = float("inf")
    path = save_lora(tmp_path / "nan.safetensors", factors, "comfy_lora_up_down")
    with pytest.raises(CasaError) as e:
        read_lora(path, shapes)
    key = "diffusion_model.blocks.1.ffn.2.lora_down.weight"
    assert str(e.value) == f"{path}, layer blocks.1.ffn.2: tensor '{key}' contains NaN/Inf values"


def test_missing_partner(tmp_path, shapes):
    path = tmp_path / "half.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 4),
               "diffusion_model.blocks.0.self_attn.k.lora_B.weight": torch.zeros(128, 4),
               "diffusion_model.blocks.0.self_attn.k.lora_A.weight": torch.zeros(4, 128)}, str(path))
    with pytest.raises(CasaError) as e:
        read_lora(path, shapes)
    module = "diffusion_model.blocks.0.self_attn.q"
    assert str(e.value) == (f"{path}, layer blocks.0.self_attn.q: '{module}.lora_up.weight' has no partner "
                            f"'{module}.lora_down.weight' in the file")


def test_nothing_matches(tmp_path, shapes):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(CasaError) as e:
        read_lora(path, shapes)
    assert str(e.value) == (f"{path}: none of its 2 keys matches a layer of the model (first keys: "
                            f"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight, "
                            f"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight)")


def test_not_a_safetensors_file(tmp_path, shapes):
    path = tmp_path / "old.pt"
    path.write_bytes(b"\x80\x02}q\x00." + b"\x00" * 100)  # a pickle
    with pytest.raises(CasaError, match=r"is not a safetensors file"):
        read_lora(path, shapes)


def test_truncated_lora(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=1)
    path = save_lora(tmp_path / "t.safetensors", factors, "kohya")
    path.write_bytes(path.read_bytes()[:-100])
    pattern = rf"^{path} is truncated: tensor '.*' needs bytes up to \d+ but the file has only \d+$"
    with pytest.raises(CasaError, match=pattern):
        read_lora(path, shapes)


def test_dora_is_refused(tmp_path, shapes):
    path = tmp_path / "dora.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(256, 4),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 128),
               "diffusion_model.blocks.0.ffn.0.dora_scale": torch.ones(256, 1)}, str(path))
    with pytest.raises(CasaError, match="layer blocks.0.ffn.0: DoRA updates are not supported"):
        read_lora(path, shapes)


def test_two_updates_for_one_layer(tmp_path, shapes):
    path = tmp_path / "dup.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_up.weight": torch.zeros(256, 4),
               "lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(4, 128),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(256, 4),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 128)}, str(path))
    with pytest.raises(CasaError, match="layer blocks.0.ffn.0: the file has two updates for this layer"):
        read_lora(path, shapes)


def test_identity(tmp_path, shapes):
    factors = make_lora(shapes, rank=RANK, seed=1)
    path = save_lora(tmp_path / "id.safetensors", factors, "kohya")
    digest = hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()
    assert read_lora(path, shapes, strength=0.5).identity() == f"lora:{digest}:strength=0.5"
    assert read_lora(path, shapes, strength=1, memo_dir=tmp_path / "m").identity() == f"lora:{digest}:strength=1.0"


def test_a_rank_0_pair_is_refused_naming_the_layer(tmp_path, shapes):
    """Some pruning and resizing tools leave a layer with an empty pair (``[out, 0]`` and ``[0, in]``)."""
    layer = "blocks.0.self_attn.q"
    m, n = shapes[layer]
    path = tmp_path / "rank0.safetensors"
    save_file({f"diffusion_model.{layer}.lora_up.weight": torch.zeros(m, 0),
               f"diffusion_model.{layer}.lora_down.weight": torch.zeros(0, n)}, str(path))
    with pytest.raises(CasaError) as e:
        read_lora(path, shapes)
    assert str(e.value).startswith(f"{path}, layer {layer}: tensor ") and "empty (a rank-0" in str(e.value)


def test_a_patch_embedding_diff_is_carried_through_where_the_model_has_that_convolution(tmp_path, shapes):
    """lightx2v / CausVid LoRAs carry ``patch_embedding.diff`` (the 5-D conv kernel) and ``.diff_b``: ComfyUI
    applies them, so they must be written, not dropped as "no module of the model has this name"."""
    layer = "blocks.0.self_attn.q"
    m, n = shapes[layer]
    path = tmp_path / "pe.safetensors"
    save_file({f"diffusion_model.{layer}.lora_up.weight": torch.ones(m, 2),
               f"diffusion_model.{layer}.lora_down.weight": torch.ones(2, n),
               "diffusion_model.patch_embedding.diff": torch.ones(8, 16, 1, 2, 2) * 1e-3,
               "diffusion_model.patch_embedding.diff_b": torch.ones(8) * 1e-3,
               "diffusion_model.no_such_module.diff_b": torch.ones(8)}, str(path))
    model_keys = {f"{k}.weight" for k in shapes} | {"patch_embedding.weight", "patch_embedding.bias"}
    lora = read_lora(path, shapes, model_keys=model_keys)
    assert {"diffusion_model.patch_embedding.diff", "diffusion_model.patch_embedding.diff_b"} <= set(lora.passthrough)
    assert "diffusion_model.no_such_module.diff_b" in lora.dropped


def test_an_empty_file_and_a_model_checkpoint_are_named_for_what_they_are(tmp_path, sd, shapes):
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_network_dim": "16"})
    with pytest.raises(CasaError) as e:
        read_lora(empty, shapes)
    assert str(e.value) == f"{empty} holds no tensors: it is not a LoRA (an empty or metadata-only file)"
    model = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(model))
    with pytest.raises(CasaError) as e:
        read_lora(model, shapes)
    assert str(e.value).startswith(f"{model} looks like a model checkpoint, not a LoRA")


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf")])
def test_a_strength_that_is_not_a_finite_number_is_refused_by_name(tmp_path, strength):
    """What ComfyUI's API lets through (JSON NaN passes its min/max check) ends in one sentence naming the file,
    not a linear-algebra error on non-finite values later."""
    from casa_core.routing import CasaParams

    sd = tiny_wan_state_dict(layers=1)
    shapes = layer_shapes(sd)
    path = tmp_path / "l.safetensors"
    save_lora(path, make_lora(shapes, rank=2, seed=1), "kohya", alpha=2.0)
    with pytest.raises(CasaError, match="the strength must be a finite number") as e:
        read_lora(path, shapes, strength=strength)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match="tau must be a positive number"):
        CasaParams(tau=float("inf")).validate()
