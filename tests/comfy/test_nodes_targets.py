"""(i) Targets of CASAComputeDrift other than a float32 checkpoint: a distilled model stored in fp8 (plain
float8_e4m3fn, ComfyUI's scaled fp8), a float32 file loaded with weight_dtype fp8_e4m3fn, and the base model
with a distillation LoRA applied by the stock LoraLoaderModelOnly. In each case the drift must be
W_t - W_s with W_t = the weights the MODEL really uses, so the transferred update (read from CASASaveLoRA's
float32 file) must equal casa_core's transfer computed from the files:

* fp8: casa_core's Checkpoint dequantises the file; the weights ComfyUI uses (read back by
  CasaTestDumpWeights) must be those same values, and the transfer must match casa_core's;
* distillation LoRA: casa_core's LoRADrift on the same LoRA file at the same strength.

Also: a drift computed while the shared module still holds ANOTHER clone's patched weights (ComfyUI keeps
the last sampled model loaded) must not see those patches.
"""
import re
import uuid

import pytest
import torch

from _fixtures_models import (casa_expected, copy_model, fetch_dump, lora_file_deltas, load_safetensors_bytes,
                              rel_err, tiny_set, truth_cache)  # noqa: F401  (fixtures)
from graphs import add_dump, add_ksampler, add_patch_info, add_save, casa_transfer_graph, patch_info, ui_text

TOL = 2e-4  # float32 maths on identical inputs (see test_nodes_transfer.py)
FP8_MAX_REL_STEP = 2.0 ** -3  # float8_e4m3fn: 3 mantissa bits
FP8_SUBNORMAL_STEP = 2.0 ** -9  # float8_e4m3fn spacing below its smallest normal 2^-6


def saved_deltas(client, entry, node_id="save"):
    text = ui_text(entry, node_id)
    m = re.search(r"[\w./-]+\.safetensors", text)
    assert m, f"no file name in CASASaveLoRA's ui text {text!r}"
    path = client.base_dir / "models" / "loras" / m.group(0)
    tensors, _ = load_safetensors_bytes(path.read_bytes())
    return lora_file_deltas(tensors)


def stored_grids(meta, path) -> dict:
    """The storage grid of each dumped layer, from how ComfyUI held it (``class.``/``dtype.`` metadata)."""
    from casa_core.formats.checkpoint import Checkpoint
    from casa_core.quantnoise import StorageGrid

    grids = {}
    for key, cls in meta.items():
        if not key.startswith("class."):
            continue
        layer = key[len("class."):]
        dtype = meta.get(f"dtype.{layer}", "")
        if cls == "QuantizedTensor":
            with Checkpoint(path) as f:
                grids[layer] = f.grid(layer)
        elif dtype in ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"):
            grids[layer] = StorageGrid.of_dtype(getattr(torch, dtype))
    return grids


def run_target(client, ts, target, tag, method="CASA", injection="exact", **kw):
    g = casa_transfer_graph(ts.base, target, ts.style_lora, method=method, injection=injection, **kw)
    add_save(g, "save", f"casa_tests/target_{tag}", dtype="float32")
    add_dump(g, "dump_target", ["distill", 0] if "distill" in g else ["target", 0], f"target_{tag}")
    add_dump(g, "dump_patched", ["transfer", 0], f"patched_{tag}", after=["dump_target", 0])
    add_patch_info(g, "patches", ["transfer", 0])
    entry = client.run(g, timeout=300)
    w_t, meta = fetch_dump(client, entry, "dump_target")
    patched, pmeta = fetch_dump(client, entry, "dump_patched")
    return entry, w_t, meta, patched, pmeta


@pytest.mark.parametrize("variant", ["fp8_file", "fp8_scaled_file", "fp8_weight_dtype"])
def test_fp8_target(comfy_server, tiny_set, truth_cache, variant):
    ts = tiny_set
    from casa_core.formats.checkpoint import Checkpoint

    tag = f"{variant}_{uuid.uuid4().hex[:6]}"
    if variant == "fp8_file":
        target, kw = ts.distilled_fp8, {}
    elif variant == "fp8_scaled_file":
        target, kw = ts.distilled_fp8_scaled, {}
    else:
        target, kw = ts.distilled, {"weight_dtype": "fp8_e4m3fn"}
    entry, w_t, meta, patched, pmeta = run_target(comfy_server, ts, target, tag, **kw)

    # 1. what ComfyUI uses are the dequantised fp8 weights (independent dequantisation)
    worst = 0.0
    for layer in ts.block_layers():
        w32 = ts.distilled_sd[layer + ".weight"].float()
        if variant == "fp8_weight_dtype":
            truth = w32.to(torch.float8_e4m3fn).float()
        else:
            truth = Checkpoint(ts.unet_path(target)).get(layer)
        worst = max(worst, rel_err(w_t[layer], truth))
        assert rel_err(w_t[layer], truth) < 1e-2 * FP8_MAX_REL_STEP, (layer, meta.get(f"dtype.{layer}"))
        assert rel_err(w_t[layer], w32) < FP8_MAX_REL_STEP  # sanity: these are fp8 roundings of W_t

    # 2. the transferred update uses the drift of exactly those weights, separated from the rounding noise
    #    of the grid they are stored on (fp8: the file's scale, or none) ...
    got = saved_deltas(comfy_server, entry)
    exp_model = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache,
                              target_weights=w_t, target_grids=stored_grids(meta, ts.unet_path(target)),
                              injection="exact")
    for layer, d in exp_model.deltas.items():
        assert rel_err(got[layer], d) < TOL, f"{layer}: transfer differs from casa_core on the model's weights"
    # ... which, for fp8 files, are casa_core's dequantisation of the file (same numbers, same result)
    if variant != "fp8_weight_dtype":
        exp_file = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache,
                                 target_path=ts.unet_path(target), injection="exact")
        for layer, d in exp_file.deltas.items():
            assert rel_err(got[layer], d) < 1e-2, f"{layer}: transfer differs from casa_core on the fp8 file"
    # the fp8 rounding of the target is part of its drift: the transfer differs from the one on the fp32 file
    exp_fp32 = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache,
                             target_path=ts.unet_path(ts.distilled), injection="exact")
    assert max(rel_err(exp_fp32.deltas[k], exp_model.deltas[k]) for k in exp_model.deltas) > 50 * TOL

    # 3. the patched fp8 model: W_t + update, up to the fp8 rounding of the patched weight
    for layer, d in exp_model.deltas.items():
        want = w_t[layer] + d
        err = (patched[layer] - want).abs()
        # one fp8 step: 2^-3 relative for normal numbers, 2^-9 absolute below 2^-6 (subnormals)
        bound = FP8_MAX_REL_STEP * want.abs() + FP8_SUBNORMAL_STEP + 1e-7
        assert bool((err <= bound).all()), f"{layer}: patched fp8 weight off by more than one fp8 step"
        # unbiased: on average the weight moved by the update (stochastic or nearest rounding)
        moved = patched[layer] - w_t[layer]
        cos = float((moved * d).sum() / (moved.norm() * d.norm()))
        assert cos > 0.3, f"{layer}: patched weight does not follow the update (cos {cos:.2f})"
        print(f"{variant} {layer}: live dtype {pmeta.get(f'dtype.{layer}')}, cos(moved, update) {cos:.3f}")
    info = patch_info(entry, "patches")
    assert any(k.endswith("blocks.0.self_attn.q.weight") for k in info), sorted(info)[:3]


@pytest.mark.parametrize("distill_strength", [1.0, 0.6])
def test_distill_lora_target(comfy_server, tiny_set, truth_cache, distill_strength):
    ts = tiny_set
    tag = f"dl{distill_strength}_{uuid.uuid4().hex[:6]}"
    entry, w_t, _, patched, _ = run_target(comfy_server, ts, ts.base, tag, distill_lora=ts.distill_lora,
                                           distill_strength=distill_strength)
    from safetensors.torch import load_file

    # W_t as ComfyUI applies the distillation LoRA, stated independently (scale alpha / rank, .diff keys)
    dl = load_file(str(ts.lora_path(ts.distill_lora)))
    for layer in ts.block_layers():
        up = dl[f"diffusion_model.{layer}.lora_up.weight"]
        down = dl[f"diffusion_model.{layer}.lora_down.weight"]
        alpha = float(dl[f"diffusion_model.{layer}.alpha"])
        want = ts.base_sd[layer + ".weight"] + distill_strength * alpha / down.shape[0] * (up @ down)
        assert rel_err(w_t[layer], want) < 1e-5, layer
    head = ts.base_sd["head.head.weight"] + distill_strength * dl["diffusion_model.head.head.diff"]
    assert rel_err(w_t["head.head"], head) < 1e-5

    got = saved_deltas(comfy_server, entry)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        distill_lora_path=ts.lora_path(ts.distill_lora), distill_strength=distill_strength)
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, f"{layer}: transfer differs from casa_core with LoRADrift"
        assert rel_err(patched[layer] - w_t[layer], d) < TOL, f"{layer}: patched model is not W_t + update"
    # the drift matters: without the distillation LoRA (zero drift) the transfer would be different
    exp_plain = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                              target_path=ts.unet_path(ts.base))
    assert max(rel_err(exp_plain.deltas[k], exp.deltas[k]) for k in exp.deltas) > 50 * TOL


def test_drift_ignores_patches_another_clone_left_in_the_shared_module(comfy_server, tiny_set, truth_cache):
    """ComfyUI keeps the last sampled model loaded: the module shared by every clone then holds that clone's
    patched weights. A drift computed next on the plain UNETLoader output must still be W_t - W_s."""
    ts = tiny_set
    name = f"casa_t_distilled_copy_{uuid.uuid4().hex[:6]}.safetensors"
    copy_model(ts, ts.distilled, name)
    first = {
        "target": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
        "style": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["target", 0],
                                                                  "lora_name": ts.style_lora, "strength_model": 1.0}},
    }
    add_ksampler(first, ["style", 0], seed=3)
    comfy_server.run(first, timeout=300)  # leaves target+style loaded (patched) in the shared module

    g = casa_transfer_graph(ts.base, name, ts.style_lora, injection="exact")
    add_save(g, "save", f"casa_tests/stale_{uuid.uuid4().hex[:6]}", dtype="float32")
    entry = comfy_server.run(g, timeout=300)
    got = saved_deltas(comfy_server, entry)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, f"{layer}: the drift saw another clone's LoRA patches"
