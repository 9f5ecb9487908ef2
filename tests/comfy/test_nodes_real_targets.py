"""Real users' targets inside a real ComfyUI: GGUF models through city96's UnetLoaderGGUF, base/target/LoRA
files in different namings (Wan, HunyuanVideo-1.5), a LoRA rewritten under the same name, and mismatches
that must fail with one sentence instead of doing nothing.

Expected values: the weights a MODEL really uses are read back by CasaTestDumpWeights (GGUF: through
ComfyUI-GGUF's own dequantiser) and checked against the gguf package's independent decoder; the transfer
is casa_core's on those weights with their storage grid (casa_expected), as the node contract specifies.
"""
import re
import uuid

import pytest
import torch
from _fixtures_models import (
    _save,
    casa_expected,
    fetch_dump,
    load_safetensors_bytes,
    lora_file_deltas,
    rel_err,
    tiny_set,  # noqa: F401  (fixture)
    truth_cache,  # noqa: F401  (fixture)
    tiny_set_in,
)
from _tiny import lora_formats as lf
from graphs import (
    add_dump,
    add_ksampler,
    add_patch_info,
    add_save,
    api_node,
    casa_transfer_graph,
    latent_stats,
    patch_info,
    ui_text,
)
from helpers.gguf_files import dequantize, quantize, save_gguf
from helpers.hunyuan import block_layers, original_name, tiny_hunyuan15_state_dict

TOL = 1e-3  # the same maths on the same weights (the noise separation is iterative: float32 order)

MIXED = {"*": "Q6_K", "blocks.0.self_attn.q.weight": "Q8_0", "blocks.0.self_attn.k.weight": "Q5_K",
         "blocks.0.self_attn.v.weight": "Q4_K", "blocks.0.ffn.0.weight": "BF16", "blocks.0.ffn.2.weight": "F16",
         "head.head.weight": "F32"}
IQ4 = {"*": "IQ4_XS", "blocks.0.self_attn.q.weight": "IQ4_NL", "blocks.0.ffn.2.weight": "IQ4_NL"}


def saved_deltas(client, entry, node_id="save"):
    m = re.search(r"[\w./-]+\.safetensors", ui_text(entry, node_id))
    assert m, ui_text(entry, node_id)
    tensors, _ = load_safetensors_bytes((client.base_dir / "models" / "loras" / m.group(0)).read_bytes())
    return lora_file_deltas(tensors)


@pytest.fixture(scope="module")
def gguf_set(comfy_server, comfyui_gguf):
    """dim 256 (K-quant rows are 256 values), 1 block: base and distilled (1.5 % drift) in float32, the
    distilled model as GGUF files, a musubi-style LoRA."""
    from casa_core import synth

    ts = tiny_set_in(comfy_server.base_dir, "casa_gguf", seed=11, dim=256, ffn_dim=512, blocks=1, rel_drift=0.015,
                     fp8=False, distill_lora=False, style_formats=("kohya",), other_size=False)
    files = {}
    for tag, qtypes in (("Q8_0", "Q8_0"), ("Q4_K", "Q4_K"), ("mixed", MIXED), ("IQ4", IQ4)):
        name = f"casa_gguf_distilled_{tag}.gguf"
        save_gguf(ts.unet_path(name), ts.distilled_sd, qtypes)
        files[tag] = (name, qtypes)
    assert synth is not None
    return ts, files


def _qtype(qtypes, layer):
    return qtypes if isinstance(qtypes, str) else qtypes.get(layer + ".weight", qtypes["*"])


@pytest.mark.parametrize("tag", ["Q8_0", "Q4_K", "mixed", "IQ4"])
def test_gguf_target_through_unet_loader_gguf(comfy_server, gguf_set, truth_cache, tag):
    from casa_core.quantnoise import StorageGrid

    ts, files = gguf_set
    name, qtypes = files[tag]
    run = uuid.uuid4().hex[:6]
    g = casa_transfer_graph(ts.base, "unused", ts.style_lora, injection="exact")
    g["target"] = api_node("UnetLoaderGGUF", unet_name=name)
    add_save(g, "save", f"casa_tests/gguf_{tag}_{run}", dtype="float32")
    add_dump(g, "dump", ["target", 0], f"gguf_{tag}_{run}")
    add_patch_info(g, "patches", ["transfer", 0])
    stats = add_ksampler(g, ["transfer", 0], seed=4)
    entry = comfy_server.run(g, timeout=600)

    # what the GGUF model really uses = the gguf package's decoding of the file (ComfyUI-GGUF works in fp16)
    w_t, meta = fetch_dump(comfy_server, entry, "dump")
    grids = {}
    for layer in ts.block_layers() + ["head.head"]:
        qt = _qtype(qtypes, layer)
        w = ts.distilled_sd[layer + ".weight"]
        want = dequantize(quantize(w, qt), qt, w.shape)
        assert rel_err(w_t[layer], want) < 2e-3, (layer, qt)
        if qt not in ("F32", "F16", "BF16"):
            assert meta[f"gguf.{layer}"] == qt
        grids[layer] = {"F16": StorageGrid.of_dtype(torch.float16), "BF16": StorageGrid.of_dtype(torch.bfloat16),
                        "F32": None}.get(qt, StorageGrid.gguf(qt))
    # KSampler on the patched GGUF model: a finite latent
    assert latent_stats(entry, stats)["finite"]
    # a patch on every transferred layer
    info = patch_info(entry, "patches")
    assert {f"diffusion_model.{layer}.weight" for layer in ts.block_layers()} <= set(info), sorted(info)[:4]
    # the transfer is casa_core's on those weights, their rounding noise separated by their grid
    got = saved_deltas(comfy_server, entry)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_weights=w_t, target_grids={k: v for k, v in grids.items() if v is not None})
    assert set(got) == set(exp.deltas) == set(ts.block_layers())
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, layer
    drift_text, transfer_text = ui_text(entry, "drift"), ui_text(entry, "transfer")
    assert "GGUF" in drift_text and "SNR" in drift_text, drift_text
    assert "missing" not in transfer_text and "not found" not in transfer_text, transfer_text


# -- ComfyUI's own quantised layouts ------------------------------------------------------------------

#: comfy_quant format -> (comfy_kitchen layout, quantiser options, the grid's kind, the word the drift shows)
COMFY_LAYOUTS = {
    "nvfp4": ("TensorCoreNVFP4Layout", {}, "nvfp4", "NVFP4"),
    "mxfp8": ("TensorCoreMXFP8Layout", {}, "mxfp8", "MXFP8"),
    "int8_tensorwise": ("TensorWiseINT8Layout", {}, "int8", "int8"),
}


@pytest.fixture(scope="module")
def layout_set(comfy_server, comfy_inprocess):
    """dim 256, 1 block, a 1.5 % drift; the distilled model written in every quantised format of
    ``COMFY_LAYOUTS`` that this ComfyUI loads, by comfy_kitchen's own quantisers and serialisers (what
    ComfyUI saves: ``weight`` + its scales + a ``comfy_quant`` JSON)."""
    import json

    from safetensors.torch import save_file

    import comfy.quant_ops

    formats = [f for f in COMFY_LAYOUTS if f in comfy.quant_ops.QUANT_ALGOS]
    assert "nvfp4" in formats, sorted(comfy.quant_ops.QUANT_ALGOS)  # both tested versions load NVFP4
    ts = tiny_set_in(comfy_server.base_dir, "casa_qlayout", seed=13, dim=256, ffn_dim=512, blocks=1, rel_drift=0.015,
                     fp8=False, distill_lora=False, style_formats=("kohya",), other_size=False)
    files = {}
    for fmt in formats:
        layout, kwargs, _, _ = COMFY_LAYOUTS[fmt]
        out = {}
        for key, t in ts.distilled_sd.items():
            module = key[: -len(".weight")]
            # the head (64 rows: its block scales fill part of a 128-row tile) too
            if (key.startswith("blocks.") or key == "head.head.weight") and key.endswith(".weight") and t.ndim == 2:
                q = comfy.quant_ops.QuantizedTensor.from_float(t.float(), layout, **kwargs)
                out.update({k: v.contiguous() for k, v in q.state_dict(key).items()})
                out[f"{module}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()),
                                                            dtype=torch.uint8)
            else:
                out[key] = t.contiguous()
        name = f"casa_qlayout_distilled_{fmt}.safetensors"
        save_file(out, str(ts.unet_path(name)))
        files[fmt] = name
    return ts, files


def test_comfy_quantised_layouts_through_unet_loader(comfy_server, layout_set, truth_cache):
    """A distilled model in ComfyUI's own NVFP4 (and, where this ComfyUI has them, MXFP8 and INT8) layouts,
    through the stock UNETLoader: the drift is that of the weights the MODEL uses, its rounding separated
    with the layout's grid (the drift names it, with an SNR, and no "used as stored" warning); the transfer
    is casa_core's on those weights and grids; a patch lands on every layer and KSampler gives a finite
    latent."""
    from casa_core.quantnoise import StorageGrid
    from safetensors import safe_open

    ts, files = layout_set
    for fmt, name in files.items():
        _, _, kind, word = COMFY_LAYOUTS[fmt]
        run = uuid.uuid4().hex[:6]
        g = casa_transfer_graph(ts.base, name, ts.style_lora, injection="exact")
        # the weights the loaded MODEL holds, read first: a patched clone sampled later shares its modules
        dump = add_dump({"target": g["target"]}, "dump", ["target", 0], f"qlayout_{fmt}_{run}")
        w_t, meta = fetch_dump(comfy_server, comfy_server.run(dump, timeout=300), "dump")
        add_save(g, "save", f"casa_tests/qlayout_{fmt}_{run}", dtype="float32")
        add_patch_info(g, "patches", ["transfer", 0])
        stats = add_ksampler(g, ["transfer", 0], seed=5)
        entry = comfy_server.run(g, timeout=600)

        grids = {}
        with safe_open(str(ts.unet_path(name)), "pt") as f:
            for layer in ts.block_layers():
                assert meta[f"class.{layer}"] == "QuantizedTensor", (fmt, layer, meta.get(f"class.{layer}"))
                w = ts.distilled_sd[layer + ".weight"].float()
                # the weights ComfyUI uses are a rounding of W_t on this format's grid
                assert 0 < rel_err(w_t[layer], w) < 0.2, (fmt, layer)
                if kind == "int8":
                    grids[layer] = StorageGrid.int8(f.get_tensor(layer + ".weight_scale"),
                                                    getattr(torch, meta[f"dtype.{layer}"]))
                else:
                    grids[layer] = StorageGrid.block_scaled(kind)
                lo, hi = grids[layer].cells(w_t[layer])
                err = w - w_t[layer]
                assert bool(((err >= lo) & (err <= hi)).all()), (fmt, layer)
        assert latent_stats(entry, stats)["finite"], fmt
        info = patch_info(entry, "patches")
        assert {f"diffusion_model.{layer}.weight" for layer in ts.block_layers()} <= set(info), (fmt, sorted(info)[:4])
        got = saved_deltas(comfy_server, entry)
        exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                            target_weights=w_t, target_grids=grids)
        assert set(got) == set(exp.deltas) == set(ts.block_layers()), fmt
        for layer, d in exp.deltas.items():
            assert rel_err(got[layer], d) < TOL, (fmt, layer)
        drift_text = ui_text(entry, "drift")
        assert word in drift_text and "SNR" in drift_text, (fmt, drift_text)
        assert "cannot separate" not in drift_text, (fmt, drift_text)

        # the command line reads the same file without ComfyUI: the same weights, the same grid kind, and
        # (with the same grid: the block-scaled layouts) the same transfer
        from casa_core.formats.checkpoint import Checkpoint

        with Checkpoint(ts.unet_path(name)) as ckpt:
            assert ckpt.layers["head.head"] == tuple(ts.distilled_sd["head.head.weight"].shape)
            assert meta["class.head.head"] == "QuantizedTensor"
            assert torch.equal(ckpt.get("head.head"), w_t["head.head"]), fmt
            for layer in ts.block_layers():
                assert ckpt.layers[layer] == tuple(ts.distilled_sd[layer + ".weight"].shape), (fmt, layer)
                assert torch.equal(ckpt.get(layer), w_t[layer]), (fmt, layer)
                assert ckpt.grid(layer).kind == kind, (fmt, layer)
        if kind != "int8":  # (the file does not say in what precision its int8 division was done)
            exp_file = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache,
                                     injection="exact", target_path=ts.unet_path(name))
            for layer, d in exp_file.deltas.items():
                assert rel_err(got[layer], d) < TOL, (fmt, layer)


def test_an_awq_smoothed_nvfp4_layer_is_refused_where_comfyui_applies_its_input_scale(comfy_server, layout_set):
    """An NVFP4 layer with a ``pre_quant_scale`` (AWQ smoothing: the layer computes ``(x * s) W^T``). Where this
    ComfyUI applies that scale, the stored weight is not the layer's: the drift node fails with a sentence
    naming the layer instead of computing a wrong drift; where it ignores it, the stored weight is what runs
    and the drift is computed. The command line, which cannot know, refuses the file by name."""
    import json

    from safetensors.torch import save_file

    import comfy.quant_ops
    from casa_core.errors import CasaError
    from casa_core.formats.checkpoint import Checkpoint

    ts, files = layout_set
    applies = "pre_quant_scale" in comfy.quant_ops.QUANT_ALGOS["nvfp4"]["parameters"]
    name = "casa_qlayout_distilled_nvfp4_awq.safetensors"
    layer = "blocks.0.self_attn.q"
    out = {}
    for key, t in ts.distilled_sd.items():
        if key == layer + ".weight":
            q = comfy.quant_ops.QuantizedTensor.from_float(t.float(), "TensorCoreNVFP4Layout")
            out.update({k: v.contiguous() for k, v in q.state_dict(key).items()})
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                       dtype=torch.uint8)
            out[f"{layer}.pre_quant_scale"] = torch.linspace(0.5, 2.0, t.shape[1])
        else:
            out[key] = t.contiguous()
    save_file(out, str(ts.unet_path(name)))

    g = casa_transfer_graph(ts.base, name, ts.style_lora)
    add_save(g, "save", f"casa_tests/awq_{uuid.uuid4().hex[:6]}")
    entry = comfy_server.wait(comfy_server.post_prompt(g), timeout=300)
    if applies:
        assert entry["status"]["status_str"] == "error"
        err = next(d for kind, d in entry["status"]["messages"] if kind == "execution_error")
        assert err["node_type"] == "CASAComputeDrift", err
        msg = err["exception_message"]
        assert layer in msg and "pre_quant_scale" in msg, msg
    else:
        assert entry["status"]["status_str"] == "success", entry["status"]
    with pytest.raises(CasaError) as e:
        Checkpoint(ts.unet_path(name))
    assert f"layer {layer}" in str(e.value) and "pre_quant_scale" in str(e.value)


# -- namings ---------------------------------------------------------------------------------------------


def test_wan_base_in_diffusers_naming_with_target_in_comfyui_naming(comfy_server, tiny_set, truth_cache):
    ts = tiny_set
    base_name = f"casa_t_base_diffusers_{uuid.uuid4().hex[:6]}.safetensors"
    lf.save_checkpoint(ts.unet_path(base_name), ts.base_sd, layout="diffusers")
    g = casa_transfer_graph(base_name, ts.distilled, ts.style["diffusers"], injection="exact")
    add_save(g, "save", f"casa_tests/naming_wan_{uuid.uuid4().hex[:6]}", dtype="float32")
    add_patch_info(g, "patches", ["transfer", 0])
    entry = comfy_server.run(g, timeout=300)
    info = patch_info(entry, "patches")
    assert {f"diffusion_model.{layer}.weight" for layer in ts.block_layers()} <= set(info)
    got = saved_deltas(comfy_server, entry)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style["diffusers"]), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    assert set(got) == set(exp.deltas) == set(ts.block_layers())
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, layer
    assert "identical" not in ui_text(entry, "transfer") and "missing" not in ui_text(entry, "transfer")


@pytest.fixture(scope="module")
def hunyuan_set(comfy_server):
    """A tiny HunyuanVideo-1.5 base and distilled model in both namings, and a diffusion-pipe LoRA."""
    base = tiny_hunyuan15_state_dict(seed=3)
    layers = block_layers(base)
    g = torch.Generator().manual_seed(4)
    distilled = {k: (v + 0.01 * v.std() * torch.randn(v.shape, generator=g)
                     if k.endswith(".weight") and k[: -len(".weight")] in layers else v) for k, v in base.items()}
    unet = comfy_server.base_dir / "models" / "diffusion_models"
    files = {}
    for role, sd in (("base", base), ("distilled", distilled)):
        for naming in ("comfy", "original"):
            name = f"casa_hy15_{role}_{naming}.safetensors"
            _save(sd if naming == "comfy" else {original_name(k): v for k, v in sd.items()}, unet / name)
            files[role, naming] = name
    lora = {}
    for layer, (up, down) in lf.make_lora(lf.layer_shapes(base), rank=4, seed=6, targets=layers).items():
        module = "transformer." + original_name(layer + ".weight")[: -len(".weight")]  # diffusion-pipe
        lora[f"{module}.lora_B.weight"], lora[f"{module}.lora_A.weight"] = up, down
    lora_name = "casa_hy15_diffusion_pipe_lora.safetensors"
    _save(lora, comfy_server.base_dir / "models" / "loras" / lora_name)
    return files, lora_name, layers


@pytest.mark.parametrize("base_naming,target_naming", [("original", "comfy"), ("comfy", "original")])
def test_hunyuan15_base_and_target_in_different_namings(comfy_server, hunyuan_set, truth_cache, base_naming,
                                                        target_naming):
    files, lora_name, layers = hunyuan_set
    base, target = files["base", base_naming], files["distilled", target_naming]
    g = casa_transfer_graph(base, target, lora_name, injection="exact")
    add_save(g, "save", f"casa_tests/naming_hy_{uuid.uuid4().hex[:6]}", dtype="float32")
    add_patch_info(g, "patches", ["transfer", 0])
    entry = comfy_server.run(g, timeout=300)
    info = patch_info(entry, "patches")
    assert {f"diffusion_model.{layer}.weight" for layer in layers} <= set(info), sorted(info)[:5]
    got = saved_deltas(comfy_server, entry)
    unet = comfy_server.base_dir / "models" / "diffusion_models"
    exp = casa_expected(unet / base, comfy_server.base_dir / "models" / "loras" / lora_name, truth_cache,
                        injection="exact", target_path=unet / target)
    assert set(got) == set(exp.deltas) == set(layers)
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, layer
    text = ui_text(entry, "transfer")
    assert f"{len(layers)} layers" in text and "identical" not in text and "missing" not in text, text


def test_unresolvable_naming_mismatch_fails_with_a_sentence(comfy_server, tiny_set, hunyuan_set):
    files, _, _ = hunyuan_set
    g = casa_transfer_graph(tiny_set.base, files["distilled", "comfy"], tiny_set.style_lora)
    add_save(g, "save", "casa_tests/never")
    pid = comfy_server.post_prompt(g)
    entry = comfy_server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "error"
    err = next(d for name, d in entry["status"]["messages"] if name == "execution_error")
    assert err["node_type"] == "CASAComputeDrift", err
    msg = err["exception_message"]
    assert tiny_set.base in msg and "not in the connected MODEL" in msg and "HunyuanVideo" in msg, msg
    assert err["exception_type"].endswith("CasaError"), err["exception_type"]


def test_a_few_unplaceable_layers_warn_on_the_node_and_in_the_log(comfy_server, tiny_set):
    """An i2v LoRA on a t2v model: its k_img/v_img layers have no place; the rest transfers, the node says so."""
    ts = tiny_set
    i2v = lf.layer_shapes(lf.tiny_wan_state_dict(layers=2, seed=1, i2v=True))
    name = f"casa_t_i2v_lora_{uuid.uuid4().hex[:6]}.safetensors"
    lf.save_lora(ts.lora_path(name), lf.make_lora(i2v, rank=4, seed=8), "kohya", alpha=4.0)
    g = casa_transfer_graph(ts.base, ts.distilled, name)
    add_patch_info(g, "patches", ["transfer", 0])
    offset = comfy_server.log_size()
    entry = comfy_server.run(g, timeout=300)
    text = ui_text(entry, "transfer")
    warned = [line for line in text.splitlines() if line.startswith("warning: ")]  # the node's warning lines
    assert any("4 of its 24 layers" in w and "k_img" in w for w in warned), text
    log = comfy_server.log_since(offset)
    assert "casa-lora CASA Transfer LoRA:" in log and "4 of its 24 layers" in log
    assert len([k for k in patch_info(entry, "patches") if k.startswith("diffusion_model.blocks.")]) == 20


# -- no stale reuse --------------------------------------------------------------------------------------


def test_lora_rewritten_under_the_same_name_is_transferred_again(comfy_server, tiny_set, truth_cache):
    ts = tiny_set
    name = f"casa_t_retrained_{uuid.uuid4().hex[:6]}.safetensors"
    shapes = lf.layer_shapes(ts.base_sd)
    lf.save_lora(ts.lora_path(name), lf.make_lora(shapes, rank=4, seed=1), "kohya", alpha=4.0)
    g = casa_transfer_graph(ts.base, ts.distilled, name, injection="exact")
    add_save(g, "save", f"casa_tests/retrained_{uuid.uuid4().hex[:6]}", dtype="float32")
    first = saved_deltas(comfy_server, comfy_server.run(g, timeout=300))
    # the user retrains and saves under the same name; the very same prompt is queued again
    lf.save_lora(ts.lora_path(name), lf.make_lora(shapes, rank=4, seed=2), "kohya", alpha=4.0)
    second = saved_deltas(comfy_server, comfy_server.run(g, timeout=300))
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(name), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    for layer, d in exp.deltas.items():
        assert rel_err(second[layer], d) < TOL, f"{layer}: the rewritten LoRA was not transferred"
        assert rel_err(first[layer], d) > 0.1, layer


# -- the MODEL at the transfer is the one the drift measured ------------------------------------------------


def test_a_transfer_onto_another_model_than_the_drift_measured_is_warned_about(comfy_server, tiny_set):
    """Drift measured on the distilled model; a transfer onto that model says nothing, one onto the base model
    (a wiring slip, e.g. the two Wan2.2 experts' drifts swapped) warns, on the node and in the log; a second
    transfer chained after the first (its MODEL carries the first's patches) is still the measured model, and
    since it is the same LoRA again, that is said."""
    ts = tiny_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
    g["base_unet"] = api_node("UNETLoader", unet_name=ts.base, weight_dtype="default")
    g["onto_base"] = dict(g["transfer"], inputs=dict(g["transfer"]["inputs"], model=["base_unet", 0]))
    g["chained"] = dict(g["transfer"], inputs=dict(g["transfer"]["inputs"], model=["transfer", 0], strength=0.5))
    for nid in ("transfer", "onto_base", "chained"):
        add_patch_info(g, f"p_{nid}", [nid, 0])
    offset = comfy_server.log_size()
    entry = comfy_server.run(g, timeout=300)
    said = "not the model CASA Compute Drift measured"
    assert said not in ui_text(entry, "transfer") and said not in ui_text(entry, "chained"), entry
    warned = [line for line in ui_text(entry, "onto_base").splitlines() if line.startswith("warning: ")]
    assert any(said in w and "looks like the base model itself" in w for w in warned), warned
    assert said in comfy_server.log_since(offset)
    twice = "was already transferred onto this MODEL by an earlier CASA Transfer LoRA"
    assert twice in ui_text(entry, "chained") and twice not in ui_text(entry, "transfer") + ui_text(entry, "onto_base")
    # the chained transfer did land: two patches per layer on its MODEL, one on the first transfer's
    first, chained = patch_info(entry, "p_transfer"), patch_info(entry, "p_chained")
    assert first and all(len(chained[k]) == 2 * len(first[k]) for k in first), (first, chained)


def test_strength_zero_leaves_the_model_as_it_is_under_casa(comfy_server, tiny_set):
    """At strength 0 the patched MODEL's weights are the distilled model's, bit for bit (before, CASA's restoration
    alone moved them back towards the base), and the summary says so instead of an empty "Layers:" line."""
    ts = tiny_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora, strength=0.0, injection="exact")
    add_dump(g, "dump", ["transfer", 0], f"strength0_{uuid.uuid4().hex[:6]}")
    entry = comfy_server.run(g, timeout=300)
    w, _ = fetch_dump(comfy_server, entry, "dump")
    layers = ts.block_layers()
    assert layers and all(torch.equal(w[n], ts.distilled_sd[n + ".weight"].to(w[n].dtype)) for n in layers)
    text = ui_text(entry, "transfer")
    assert "its update is zero in every one of its" in text and "at strength 0" in text, text
    assert "Layers:" not in [line.strip() for line in text.splitlines()], text
