"""Real users' files: HunyuanVideo namings, GGUF targets, trainer bookkeeping keys, no silent no-op."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from helpers.gguf_files import dequantize, quantize, save_gguf
from helpers.hunyuan import block_layers, original_name, tiny_hunyuan15_state_dict
from helpers.lora_formats import layer_shapes, make_lora, save_checkpoint, save_lora, tiny_wan_state_dict
from safetensors.torch import load_file, save_file

from casa_core.cli import main
from casa_core.errors import CasaError
from casa_core.formats.checkpoint import Checkpoint, open_model
from casa_core.formats.gguf_file import GGUFCheckpoint
from casa_core.formats.keys import LayerMatcher, loadable_passthrough
from casa_core.formats.lora import read_lora
from casa_core.quantnoise import StorageGrid
from casa_core.transfer import check_coverage

# -- HunyuanVideo namings ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hy():
    return tiny_hunyuan15_state_dict(seed=2)


def test_hunyuan_original_and_comfy_files_give_the_same_layers(tmp_path, hy):
    orig = {original_name(k): v for k, v in hy.items()}
    assert "double_blocks.0.img_attn_qkv.weight" in orig and "double_blocks.0.img_mlp.fc1.weight" in orig
    assert "single_blocks.0.modulation.linear.weight" in orig and "txt_in.t_embedder.mlp.0.weight" in orig
    save_file(hy, str(tmp_path / "comfy.safetensors"))
    save_file(orig, str(tmp_path / "orig.safetensors"))
    with Checkpoint(tmp_path / "comfy.safetensors") as a, Checkpoint(tmp_path / "orig.safetensors") as b:
        assert a.layers == b.layers == layer_shapes(hy)
        for layer in a.layers:
            assert torch.equal(a.get(layer), b.get(layer)), layer
        assert a.param_names == b.param_names == frozenset(hy)
        assert a.naming == "HunyuanVideo, ComfyUI naming" and b.naming == "HunyuanVideo, original naming"


def test_hunyuan_lora_namings_resolve_to_the_model_keys(hy):
    m = LayerMatcher(layer_shapes(hy))
    want = "double_blocks.0.img_attn.qkv"
    for name in ("diffusion_model.double_blocks.0.img_attn.qkv",  # ComfyUI
                 "transformer.double_blocks.0.img_attn_qkv",  # diffusion-pipe (older)
                 "diffusion_model.double_blocks.0.img_attn_qkv",  # "old loras" per ComfyUI's key map
                 "lora_unet_double_blocks_0_img_attn_qkv"):  # musubi-tuner
        assert m.match(name) == want, name
    assert m.match("transformer.double_blocks.0.img_mlp.fc2") == "double_blocks.0.img_mlp.2"
    assert m.match("lora_unet_double_blocks_0_img_mlp_fc1") == "double_blocks.0.img_mlp.0"
    assert m.match("transformer.single_blocks.0.modulation.linear") == "single_blocks.0.modulation.lin"
    assert m.match("transformer.double_blocks.0.img_attn_q") is None  # not a layer of this model
    # aliases (inside ComfyUI: the model's LoRA key map) win over the reader's own rules
    m2 = LayerMatcher(layer_shapes(hy), aliases={"weird.name.0": want, "x": "not.a.layer"})
    assert m2.match("weird.name.0") == want and m2.match("x") is None


def test_hunyuan_transfer_with_base_and_target_in_different_namings(tmp_path, hy):
    """CLI: base in the original naming, target in ComfyUI's, LoRA in diffusion-pipe's: every layer lands."""
    layers = block_layers(hy)
    g = torch.Generator().manual_seed(5)
    target = {k: (v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if k[:-7] in layers and k.endswith(".weight")
                  else v) for k, v in hy.items()}
    save_file({original_name(k): v for k, v in hy.items()}, str(tmp_path / "base.safetensors"))
    save_file(target, str(tmp_path / "target.safetensors"))
    shapes = layer_shapes(hy)
    factors = make_lora(shapes, rank=4, seed=3, targets=layers)
    lora = {}
    for layer, (up, down) in factors.items():
        name = "transformer." + original_name(layer + ".weight")[: -len(".weight")]
        lora[f"{name}.lora_B.weight"], lora[f"{name}.lora_A.weight"] = up, down
    save_file(lora, str(tmp_path / "dp.safetensors"))
    out = tmp_path / "out.safetensors"
    code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                 str(tmp_path / "target.safetensors"), "--lora", str(tmp_path / "dp.safetensors"), "--out", str(out),
                 "--report", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "c"), "--injection", "exact"])
    assert code == 0
    written = load_file(str(out))
    assert {f"diffusion_model.{layer}.diff" for layer in layers} <= set(written)
    rep = json.loads((tmp_path / "r.json").read_text())["methods"]["casa"]
    assert rep["totals"]["layers"] == len(layers)
    assert rep["layers_missing_in_target"] == [] and rep["layers_without_drift"] == []


def test_unresolvable_naming_mismatch_fails_with_one_sentence(tmp_path, hy, capsys):
    """A Wan base and LoRA with a HunyuanVideo target: the CLI exits 2 naming the files and the namings."""
    wan = tiny_wan_state_dict(seed=1)
    save_checkpoint(tmp_path / "wan.safetensors", wan)
    save_file(hy, str(tmp_path / "hy.safetensors"))
    save_lora(tmp_path / "wan_lora.safetensors", make_lora(layer_shapes(wan), rank=4, seed=1), "kohya", alpha=4.0)
    code = main(["transfer", "--source", str(tmp_path / "wan.safetensors"), "--target", str(tmp_path / "hy.safetensors"),
                 "--lora", str(tmp_path / "wan_lora.safetensors"), "--out", str(tmp_path / "o.safetensors"),
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "wan_lora.safetensors" in err and "hy.safetensors" in err and "HunyuanVideo" in err, err
    assert "20 of its 20 layers" in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_few_missing_layers_warn_and_most_fail():
    class U:  # a non-zero rank-1 update
        def factors(self):
            return torch.ones(4, 1), torch.ones(1, 4)

    class L:
        path = "x/style.safetensors"
        updates = {f"blocks.{i}.self_attn.q": U() for i in range(10)}
        unmatched_modules: list = []

    class D:
        def __init__(self, missing):
            self.info = {n: {"missing": n in missing, "mode": "zero" if n in missing else "top"} for n in L.updates}

    assert check_coverage(L, D(set()), source="b", target="t") == []
    warn = check_coverage(L, D({"blocks.0.self_attn.q"}), source="b", target="t")
    assert len(warn) == 1 and "1 of its 10 layers" in warn[0] and "blocks.0.self_attn.q" in warn[0]
    with pytest.raises(CasaError, match=r"style.safetensors: 6 of its 10 layers cannot be transferred"):
        check_coverage(L, D({f"blocks.{i}.self_attn.q" for i in range(6)}), source="b", target="t")
    with pytest.raises(CasaError, match="found no weight to patch"):
        check_coverage(L, D(set()), source="b", target="t", not_landed=list(L.updates))


# -- LoRA bookkeeping, rsLoRA, loadable keys -----------------------------------------------------------------


def test_bookkeeping_keys_are_dropped_and_rslora_is_honoured(tmp_path):
    sd = tiny_wan_state_dict(seed=1)
    shapes = layer_shapes(sd)
    factors = make_lora(shapes, rank=4, seed=2)
    extra = {"use_rslora_flag": torch.tensor(True), "use_dora_flag": torch.tensor(False)}
    path = save_lora(tmp_path / "rs.safetensors", factors, "kohya", alpha=2.0, extra=extra)
    lora = read_lora(path, shapes, strength=0.5)
    assert set(lora.dropped) == {"use_rslora_flag", "use_dora_flag"}
    assert not any("flag" in k for k in lora.passthrough)
    layer = "blocks.0.self_attn.q"
    up, down = factors[layer]
    assert math.isclose(lora.updates[layer].scale, 0.5 * 2.0 / math.sqrt(4), rel_tol=1e-6)  # alpha / sqrt(r)
    assert lora.updates[layer].alpha_rule == "tensor_rslora"
    assert torch.allclose(lora.updates[layer].dense(), 0.5 * 2.0 / 2.0 * up @ down, atol=1e-7)
    plain = save_lora(tmp_path / "plain.safetensors", factors, "kohya", alpha=2.0,
                      extra={"use_rslora_flag": torch.tensor(False)})
    assert math.isclose(read_lora(plain, shapes).updates[layer].scale, 2.0 / 4)
    dora = save_lora(tmp_path / "dora.safetensors", factors, "kohya", alpha=2.0, extra={"use_dora_flag": torch.tensor(True)})
    with pytest.raises(CasaError, match="dora.safetensors.*DoRA"):
        read_lora(dora, shapes)


def test_only_keys_comfyui_applies_are_carried(tmp_path):
    sd = tiny_wan_state_dict(seed=1)
    shapes = layer_shapes(sd)
    keys = frozenset(sd)
    assert loadable_passthrough("blocks.0.norm3", "diff", keys) is None
    assert loadable_passthrough("blocks.0.norm3", "diff_b", keys) is None
    assert loadable_passthrough("blocks.0.modulation", "diff", keys) is None  # a parameter of its own
    assert loadable_passthrough("blocks.0", "diff_m", keys) is not None
    assert loadable_passthrough("blocks.0.self_attn.norm_q", "diff_b", keys) is not None  # no bias there
    assert loadable_passthrough("blocks.0", "set_weight", keys) is not None
    extra = {"diffusion_model.blocks.0.norm3.diff": torch.ones(128), "diffusion_model.blocks.0.diff_m": torch.ones(6, 128),
             "diffusion_model.blocks.0.self_attn.norm_q.diff_b": torch.ones(128),
             "diffusion_model.blocks.1.set_weight": torch.ones(1)}
    path = save_lora(tmp_path / "x.safetensors", make_lora(shapes, rank=2, seed=4), "distill", alpha=2.0, extra=extra)
    lora = read_lora(path, shapes, model_keys=keys)
    assert set(lora.passthrough) == {"diffusion_model.blocks.0.norm3.diff"}
    assert set(lora.dropped) == set(extra) - {"diffusion_model.blocks.0.norm3.diff"}


# -- GGUF ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                   "IQ4_NL", "IQ4_XS", "BF16", "F16"])
def test_gguf_encodings_round_to_nearest_on_their_grid(qtype):
    """The test writer's bytes, decoded by the gguf package, are within one cell of the input."""
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    deq = dequantize(quantize(w, qtype), qtype, w.shape)
    grid = StorageGrid.gguf(qtype) or StorageGrid.of_dtype(torch.bfloat16 if qtype == "BF16" else torch.float16)
    lo, hi = grid.cells(deq)
    err = w - deq
    assert bool(((err >= lo - 1e-9) & (err <= hi + 1e-9)).all()), qtype
    rel = float(err.norm() / w.norm())
    assert rel < {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q4_K": 0.12, "Q3_K": 0.22, "Q2_K": 0.4, "Q4_0": 0.12,
                  "Q4_1": 0.12, "Q5_0": 0.06, "Q5_1": 0.06, "IQ4_NL": 0.12, "IQ4_XS": 0.12}.get(qtype, 0.005), rel
    est = float(grid.noise_variance(deq).sum().sqrt())
    assert 0.6 < est / float(err.norm()) < 1.4, (qtype, est / float(err.norm()))


def test_gguf_target_file(tmp_path):
    sd = tiny_wan_state_dict(dim=256, ffn_dim=512, layers=1, seed=3)
    types = {"*": "Q8_0", "blocks.0.ffn.0.weight": "Q4_K", "blocks.0.ffn.2.weight": "Q6_K",
             "blocks.0.self_attn.o.weight": "F16", "head.head.weight": "F32"}
    path = save_gguf(tmp_path / "m.gguf", sd, types)
    with open_model(path) as g:
        assert isinstance(g, GGUFCheckpoint)
        assert g.layers == layer_shapes(sd)
        for layer in g.layers:
            qt = types.get(layer + ".weight", types["*"])
            want = dequantize(quantize(sd[layer + ".weight"], qt), qt, sd[layer + ".weight"].shape)
            assert torch.equal(g.get(layer), want), layer
            assert g.qtype(layer) == qt
        assert g.grid("head.head") is None and g.grid("blocks.0.ffn.0").kind == "gguf:Q4_K"
        assert g.grid("blocks.0.self_attn.o").kind == "float16"
        assert "patch_embedding.weight" in g.param_names


@pytest.mark.parametrize("arch", ["llama", "t5encoder", "qwen2vl"])
def test_a_gguf_text_encoder_is_not_taken_for_the_diffusion_model(tmp_path, arch):
    """HunyuanVideo's llava-llama, Wan's UMT5 and Qwen text encoders come as GGUF files beside the diffusion
    model's: given as a model, one sentence says what the file is; the diffusion model's own GGUF opens."""
    sd = tiny_wan_state_dict(dim=128, ffn_dim=256, layers=1)
    path = save_gguf(tmp_path / f"{arch}.gguf", sd, "Q8_0", arch=arch)
    with pytest.raises(CasaError, match=rf"{arch}\.gguf is a GGUF of a language or text-encoder model "
                                        rf"\(architecture '{arch}'\), not of a diffusion model"):
        open_model(path)
    with open_model(save_gguf(tmp_path / "wan.gguf", sd, "Q8_0", arch="wan")) as g:
        assert g.architecture == "wan" and g.layers == layer_shapes(sd)


def test_gguf_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = save_gguf(tmp_path / "m.gguf", tiny_wan_state_dict(dim=128, ffn_dim=256, layers=1), "Q8_0")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CasaError, match=r"m\.gguf is a GGUF file; reading it needs the optional 'gguf' package"):
        open_model(path)


def test_cli_gguf_target_lands_every_layer(tmp_path, capsys):
    from casa_core import synth

    shape = synth.WanShape(dim=256, ffn_dim=512, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    distilled = synth.distill(base, svd, rel_drift=0.015, seed=1, dtype=torch.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_gguf(tmp_path / "distilled_Q8_0.gguf", distilled, "Q8_0")
    save_file(synth.style_lora(svd, rank=8), str(tmp_path / "style.safetensors"))
    out = tmp_path / "o.safetensors"
    code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                 str(tmp_path / "distilled_Q8_0.gguf"), "--lora", str(tmp_path / "style.safetensors"), "--out", str(out),
                 "--report", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    rep = json.loads((tmp_path / "r.json").read_text())["methods"]["casa"]
    assert rep["totals"]["layers"] == 10 and rep["layers_missing_in_target"] == []
    assert {layer["target_storage"] for layer in rep["layers"].values()} == {"GGUF Q8_0"}
    assert all(layer["drift_snr"] > 0 for layer in rep["layers"].values())
    written = load_file(str(out))
    assert len([k for k in written if k.endswith(".lora_up.weight")]) == 10
    assert "GGUF Q8_0" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8_plain", "fp8_scaled", "diffusers_bf16", "gguf_Q8_0", "gguf_Q4_K",
                                  "gguf_IQ4_XS"])
def test_cli_every_target_kind_lands_every_layer(tmp_path, kind):
    """One base (original naming, float32), the distilled model stored each way users have it."""
    from casa_core import synth

    shape = synth.WanShape(dim=256, ffn_dim=512, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=2, dtype=torch.float32)
    distilled = synth.distill(base, svd, rel_drift=0.015, seed=3, dtype=torch.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    if kind.startswith("gguf_"):
        target = save_gguf(tmp_path / "t.gguf", distilled, kind[5:])
    else:
        layout = "diffusers" if kind.startswith("diffusers") else "original"
        fp8 = {"fp8_plain": "plain", "fp8_scaled": "scaled_new"}.get(kind, "none")
        dtype = torch.bfloat16 if kind.endswith("bf16") else None
        target = save_checkpoint(tmp_path / "t.safetensors", distilled, layout=layout, dtype=dtype, fp8=fp8)
    save_file(synth.style_lora(svd, rank=8), str(tmp_path / "style.safetensors"))
    out = tmp_path / "o.safetensors"
    code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target", str(target), "--lora",
                 str(tmp_path / "style.safetensors"), "--out", str(out), "--report", str(tmp_path / "r.json"),
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    rep = json.loads((tmp_path / "r.json").read_text())["methods"]["casa"]
    assert rep["totals"]["layers"] == 10 and rep["layers_missing_in_target"] == [] and rep["warnings"] == []
    assert len([k for k in load_file(str(out)) if k.endswith(".lora_up.weight")]) == 10
    storages = {layer.get("target_storage") for layer in rep["layers"].values()}
    want = {"fp32": {None}, "bf16": {"bf16"}, "diffusers_bf16": {"bf16"}, "fp8_plain": {"fp8 e4m3fn"},
            "fp8_scaled": {"fp8 e4m3fn (scaled)"}, "gguf_Q8_0": {"GGUF Q8_0"}, "gguf_Q4_K": {"GGUF Q4_K"},
            "gguf_IQ4_XS": {"GGUF IQ4_XS"}}[kind]
    assert storages == want, storages


def test_iq4_cells_hold_the_unrounded_values_across_scales_and_outliers():
    """IQ4's outer levels also hold what the scale clipped, and subnormal float16 scales (weights of
    0.002) are allowed for: every unrounded value lies in its cell, the gguf package's decoder reading
    the bytes."""
    for qtype in ("IQ4_NL", "IQ4_XS"):
        for scale in (2e-3, 0.02, 0.5):
            w = torch.randn(32, 512, generator=torch.Generator().manual_seed(7)) * scale
            w[:, ::97] *= 8.0  # a few outliers per row: the blocks' scales differ widely
            deq = dequantize(quantize(w, qtype), qtype, w.shape)
            lo, hi = StorageGrid.gguf(qtype).cells(deq)
            err = w - deq
            assert bool(((err >= lo) & (err <= hi)).all()), (qtype, scale)
            width = float((hi - lo).median() / deq.abs().median())  # a level gap, not the whole range
            assert width < 0.6, (qtype, scale, width)
    # IQ4_XS: a sub-block as large as the super-block's largest but of the other sign gets its scale
    # integer clamped (l - 32 = 31 for 32 units), so its values are clipped by about 4 % more
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(8)) * 0.02
    w[:, 0], w[:, 32], w[:, 33] = 0.08, -0.0799, 0.0798  # value 33: at the top level, +113, of its sub-block
    deq = dequantize(quantize(w, "IQ4_XS"), "IQ4_XS", w.shape)
    lo, hi = StorageGrid.gguf("IQ4_XS").cells(deq)
    err = w - deq
    assert float(err[:, 33].abs().min()) > 0.13 * float(deq[:, 33].abs().max())  # clipped by > 15 units of 113
    assert bool(((err >= lo) & (err <= hi)).all())


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0"])
def test_clipped_levels_keep_their_values_in_the_cells(qtype):
    """Blocks whose scales differ widely (a few outliers per row): rounded sub-block scales and the
    asymmetric levels of Q4_0/Q5_0/Q3_K/Q6_K clip values at a block's end levels, whose cells reach out for
    them. Without outliers every value is inside; with them all but a handful (at most 1 in 10 000: sub-blocks
    whose tiny scale integer leaves their levels far from the values)."""
    g = torch.Generator().manual_seed(3)
    for outliers in (False, True):
        w = torch.randn(64, 512, generator=g) * 0.02
        if outliers:
            w[:, ::97] *= 6.0
        deq = dequantize(quantize(w, qtype), qtype, w.shape)
        lo, hi = StorageGrid.gguf(qtype).cells(deq)
        err = w - deq
        inside = float(((err >= lo) & (err <= hi)).float().mean())
        assert inside == 1.0 if not outliers else inside >= 0.9999, (qtype, outliers, inside)


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K"])
def test_gguf_drift_is_separated_from_its_rounding(qtype):
    """A low-rank drift under IQ4 and K-quant rounding: the separated drift is much closer to it than the raw one."""
    from casa_core.quantnoise import separate_drift

    g = torch.Generator().manual_seed(5)
    ws = torch.randn(256, 512, generator=g) * 0.02
    drift = torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g)
    drift *= 0.15 * float(ws.norm()) / float(drift.norm())
    wt = dequantize(quantize(ws + drift, qtype), qtype, ws.shape)
    grid = StorageGrid.gguf(qtype)
    lo, hi, var = grid.cells_and_variance(wt)
    est, info = separate_drift(wt - ws, lo, hi, var, rank_search=grid.coarse)
    raw = float((wt - ws - drift).norm() / drift.norm())
    now = float((est - drift).norm() / drift.norm())
    assert raw > 0.4 and now < raw / 3, (raw, now, info["rank"])


def _cli_on_synthetic(tmp_path, capsys, write_base, write_target):
    """The CLI's transfer of a style LoRA between a synthetic Wan base and its distilled model (1.5 % drift),
    written by ``write_base(path_stem, state_dict)`` / ``write_target(...)`` (each returns the file):
    ``(exit code, stdout, CASA's report)``."""
    from casa_core import synth

    shape = synth.WanShape(dim=256, ffn_dim=512, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=2, dtype=torch.float32)
    distilled = synth.distill(base, svd, rel_drift=0.015, seed=3, dtype=torch.float32)
    source, target = write_base(tmp_path / "base", base), write_target(tmp_path / "t", distilled)
    save_file(synth.style_lora(svd, rank=8), str(tmp_path / "style.safetensors"))
    code = main(["transfer", "--source", str(source), "--target", str(target), "--lora",
                 str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "o.safetensors"), "--report",
                 str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())["methods"]["casa"] if code == 0 else None
    return code, out, rep


def _safetensors(stem, sd):
    save_file(sd, str(stem) + ".safetensors")
    return str(stem) + ".safetensors"


def test_cli_a_lossy_target_without_a_noise_model_warns(tmp_path, capsys):
    """GGUF TQ1_0 (ternary): no noise model, so the drift is used as it is, and the person is told."""
    code, out, rep = _cli_on_synthetic(
        tmp_path, capsys, _safetensors,
        lambda stem, sd: save_gguf(str(stem) + "_TQ1_0.gguf", sd, {"*": "F32", "blocks.0.ffn.0.weight": "TQ1_0"}))
    assert code == 0
    assert "WARNING: t_TQ1_0.gguf is stored as GGUF TQ1_0 in 1 layer(s) (e.g. blocks.0.ffn.0)" in out, out
    assert rep["layers"]["blocks.0.ffn.0"]["target_storage"] == "GGUF TQ1_0"
    assert "drift_snr" not in rep["layers"]["blocks.0.ffn.0"]
    assert {rep["layers"][n].get("target_storage") for n in rep["layers"] if n != "blocks.0.ffn.0"} == {None}



@pytest.mark.parametrize("target_fp8", [False, True])
def test_an_fp8_base_has_its_rounding_separated_from_the_drift_too(tmp_path, target_fp8):
    """Many users' base is an fp8 copy of the model the distillation started from: its rounding is in
    ``W_t - W_s`` as much as the target's. The drift is then estimated from both cells (the base's and,
    for an fp8 target, the target's), and comes out much closer to the true drift than the raw difference."""
    from casa_core.drift import WeightDifference

    sd = tiny_wan_state_dict(dim=256, ffn_dim=512, layers=1, seed=6)
    g = torch.Generator().manual_seed(8)
    key = "blocks.0.self_attn.q.weight"
    ws = sd[key].float()
    drift = torch.randn(256, 6, generator=g) @ torch.randn(6, 256, generator=g)
    drift *= 0.04 * float(ws.norm()) / float(drift.norm())
    target_sd = dict(sd)
    target_sd[key] = ws + drift
    base = save_checkpoint(tmp_path / "base_fp8.safetensors", sd, fp8="plain")
    target = save_checkpoint(tmp_path / "t.safetensors", target_sd, dtype=None if target_fp8 else torch.bfloat16,
                             fp8="plain" if target_fp8 else "none")
    with Checkpoint(base) as b, Checkpoint(target) as t:
        assert b.grid("blocks.0.self_attn.q").kind == "float8_e4m3fn"
        est, info = WeightDifference(b, t).delta_info("blocks.0.self_attn.q", (256, 256))
        raw = t.get("blocks.0.self_attn.q") - b.get("blocks.0.self_attn.q")
    truth = (target_sd[key].to(torch.float8_e4m3fn if target_fp8 else torch.bfloat16).float() - ws) if not target_fp8 \
        else drift
    assert info["storage"] == ("fp8 e4m3fn" if target_fp8 else "bf16") and info["base_storage"] == "fp8 e4m3fn"
    raw_err = float((raw - truth).norm() / drift.norm())
    now_err = float((est - truth).norm() / drift.norm())
    assert raw_err > 0.5 and now_err < raw_err / 2, (raw_err, now_err, info["rank"], info["snr"])


def test_cli_names_a_quantised_base_in_its_summary(tmp_path, capsys):
    """A GGUF Q8_0 base with an fp8 target: both roundings are separated, and the summary says which is which."""
    code, out, rep = _cli_on_synthetic(
        tmp_path, capsys, lambda stem, sd: save_gguf(str(stem) + "_Q8_0.gguf", sd, "Q8_0"),
        lambda stem, sd: save_checkpoint(str(stem) + "_fp8.safetensors", sd, fp8="plain"))
    assert code == 0
    assert "t_fp8.safetensors is stored as fp8 e4m3fn, the base as GGUF Q8_0: drift/noise (SNR)" in out, out
    assert "a bf16 base model, and a bf16 release of the distilled model" in out, out
    assert {layer["target_storage"] for layer in rep["layers"].values()} == {"fp8 e4m3fn"}


def test_cli_a_lossy_base_without_a_noise_model_warns_about_the_base(tmp_path, capsys):
    code, out, rep = _cli_on_synthetic(
        tmp_path, capsys,
        lambda stem, sd: save_gguf(str(stem) + "_TQ1_0.gguf", sd, {"*": "F32", "blocks.0.ffn.0.weight": "TQ1_0"}),
        _safetensors)
    assert code == 0
    assert "WARNING: the base model is stored as GGUF TQ1_0 in 1 layer(s) (e.g. blocks.0.ffn.0)" in out, out
    assert "a bf16 base model is the cleaner choice" in out, out
    assert "target_storage" not in rep["layers"]["blocks.0.ffn.0"]  # the base's storage, not the target's
