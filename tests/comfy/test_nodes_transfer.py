"""(c) The weights the patched MODEL really uses (read back through ComfyUI's own patching by the test node
CasaTestDumpWeights) equal W_t + ΔCASA computed independently with casa_core on the same files; the input
MODEL is unchanged afterwards. (d) The LoRA written by CASASaveLoRA, loaded by the stock
LoraLoaderModelOnly, gives the same weights. (e) KSampler runs on the patched model.

Ground truth (``_fixtures_models.casa_expected``): Checkpoint(base) -> load_or_build_basis;
WeightDifference(base, Checkpoint(distilled)) -> load_or_build_drift; read_lora; iter_transfer — in this
process, in its own cache folder, never through the pack's nodes.
"""
import re
import uuid

import pytest
import torch

from _fixtures_models import (casa_expected, fetch_dump, lora_file_deltas, load_safetensors_bytes, rel_err,
                              tiny_set, truth_cache)  # noqa: F401  (fixtures)
from graphs import (INJECTIONS, METHODS, add_dump, add_ksampler, add_patch_info, add_save, casa_transfer_graph,
                    latent_stats, patch_info, ui_text)

# Patched weights are W_t + up @ down (or + delta) computed by ComfyUI in float32; the node and casa_core
# run the same float32 maths on the same files, so they agree to float32 rounding. TOL is relative to
# the largest entry of the update; each case also checks that TOL is far below the difference between
# this method's update and direct reuse, so a wrong method could not pass.
TOL = 2e-4

CASES = [
    # (method label, injection label, rank, kept_energy, strength)
    ("CASA", "exact", 128, 0.0, 1.0),
    ("CASA", "low-rank", 6, 0.0, 1.0),
    ("CASA", "low-rank", 128, 0.0, 0.75),
    ("ProLoRA", "exact", 128, 0.0, 1.0),
    ("CASA restoration only", "low-rank", 128, 0.9, 1.0),
    ("CASA arbitration only", "exact", 128, 0.0, 1.0),
    ("direct reuse", "low-rank", 128, 0.0, 1.0),
]


def _ids(case):
    m, inj, rank, ke, s = case
    return f"{METHODS[m]}-{INJECTIONS[inj]}-r{rank}-e{ke}-s{s}"


def expected_for(ts, cache, case, lora=None, **kw):
    method, injection, rank, kept_energy, strength = case
    if not ({"target_weights", "distill_lora_path", "target_path"} & kw.keys()):
        kw["target_path"] = ts.unet_path(ts.distilled)
    return casa_expected(ts.unet_path(ts.base), ts.lora_path(lora or ts.style_lora), cache,
                         method=METHODS[method], injection=INJECTIONS[injection], rank=rank,
                         kept_energy=kept_energy, strength=strength, **kw)


def graph_for(ts, case, lora=None, target=None, **kw):
    method, injection, rank, kept_energy, strength = case
    return casa_transfer_graph(ts.base, target or ts.distilled, lora or ts.style_lora, method=method,
                               injection=injection, rank=rank, kept_energy=kept_energy, strength=strength, **kw)


@pytest.fixture(scope="module")
def direct_exact(tiny_set, truth_cache):
    return expected_for(tiny_set, truth_cache, ("direct reuse", "exact", 128, 0.0, 1.0))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_patched_weights_equal_casa_core(comfy_server, tiny_set, truth_cache, direct_exact, case):
    ts = tiny_set
    tag = uuid.uuid4().hex[:8]
    g = graph_for(ts, case)
    add_dump(g, "dump_patched", ["transfer", 0], f"patched_{tag}")
    add_dump(g, "dump_input", ["target", 0], f"input_{tag}", after=["dump_patched", 0])
    add_patch_info(g, "patches_out", ["transfer", 0])
    add_patch_info(g, "patches_in", ["target", 0])
    entry = comfy_server.run(g, timeout=300)

    exp = expected_for(ts, truth_cache, case)
    patched, meta = fetch_dump(comfy_server, entry, "dump_patched")
    original, _ = fetch_dump(comfy_server, entry, "dump_input")

    method, injection, rank, kept_energy, strength = case
    assert sorted(exp.deltas) == ts.block_layers()  # the style LoRA touches every block linear
    for layer, w in original.items():  # the input MODEL: exactly the distilled file, after the patched one ran
        assert torch.equal(w, ts.distilled_sd[layer + ".weight"].float()), f"input model changed at {layer}"
        assert meta[f"dtype.{layer}"] == "float32"
    for layer, w in patched.items():
        wt = ts.distilled_sd[layer + ".weight"].float()
        if layer not in exp.deltas:
            assert torch.equal(w, wt), f"{layer} has no LoRA update but changed"
            continue
        delta = exp.deltas[layer]
        err = rel_err(w - wt, delta)
        assert err < TOL, f"{layer}: patched - W_t differs from casa_core's update by {err:.2e} (rel)"
        if METHODS[method] != "direct":  # the comparison can tell this method from direct reuse
            assert rel_err(direct_exact.deltas[layer], delta) > 50 * TOL, layer

    # how the update is injected: a LoRAAdapter (up, down, alpha None) or a ("diff", (delta,)) patch
    info = patch_info(entry, "patches_out")
    assert patch_info(entry, "patches_in") == {}, "the input MODEL got patches"
    keys = {f"diffusion_model.{layer}.weight" for layer in exp.deltas}
    assert keys <= set(info), sorted(keys - set(info))[:3]
    for key in keys:
        (p,) = info[key]
        layer = key[len("diffusion_model."):-len(".weight")]
        assert p["strength_patch"] == 1.0 and p["strength_model"] == 1.0, p
        if injection == "exact":
            assert p["kind"] == "diff" and p["shapes"] == [list(exp.deltas[layer].shape)], p
            assert p["dtypes"] == ["float32"], p  # the model's dtype
        else:
            assert p["kind"] == "LoRAAdapter" and p["alpha"] is None, p
            out_rank = exp.outputs[layer].rank
            assert p["shapes"] == [[exp.deltas[layer].shape[0], out_rank], [out_rank, exp.deltas[layer].shape[1]]], p
    if injection == "low-rank" and kept_energy == 0.0 and rank < 16:
        assert {exp.outputs[lay].rank for lay in exp.deltas} == {rank}

    text = ui_text(entry, "transfer")
    assert text, f"CASATransferLoRA returned no ui text: {entry['outputs'].get('transfer')}"


def test_every_trainer_format_gives_the_same_transfer(comfy_server, tiny_set, truth_cache):
    """One style LoRA saved by five trainers (kohya/musubi + alpha, VideoX-Fun, diffusion_model lora_A/B
    without alpha, diffusers/PEFT with alpha in metadata, DiffSynth .default): the same patched weights,
    equal to casa_core's transfer of the kohya file."""
    ts = tiny_set
    case = ("CASA", "exact", 128, 0.0, 1.0)
    exp = expected_for(ts, truth_cache, case)
    g, tag = {}, uuid.uuid4().hex[:8]
    prev = None
    for fmt, name in ts.style.items():
        part = graph_for(ts, case, lora=name)
        g.update({k: v for k, v in part.items() if k != "transfer"})
        g[f"transfer_{fmt}"] = part["transfer"]
        add_dump(g, f"dump_{fmt}", [f"transfer_{fmt}", 0], f"fmt_{fmt}_{tag}",
                 keys="blocks.0.self_attn.q,blocks.1.ffn.2",
                 after=prev)
        prev = [f"dump_{fmt}", 0]
    entry = comfy_server.run(g, timeout=300)
    for fmt in ts.style:
        w, _ = fetch_dump(comfy_server, entry, f"dump_{fmt}")
        for layer in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
            err = rel_err(w[layer] - ts.distilled_sd[layer + ".weight"], exp.deltas[layer])
            assert err < TOL, f"{fmt}: {layer} off by {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_saved_lora_loaded_by_core_loader_gives_the_same_weights(comfy_server, tiny_set, truth_cache, dtype):
    """(d) CASASaveLoRA's file, loaded by LoraLoaderModelOnly at strength 1 on the distilled model, makes the
    same weights as CASATransferLoRA's MODEL; the file is ComfyUI's LoRA format with alpha = rank."""
    ts = tiny_set
    case = ("CASA", "low-rank", 8, 0.0, 1.0)
    prefix = f"casa_tests/saved_{dtype}_{uuid.uuid4().hex[:6]}"
    g = graph_for(ts, case)
    add_save(g, "save", prefix, dtype=dtype)
    add_dump(g, "dump_transfer", ["transfer", 0], f"{prefix.replace('/', '_')}_transfer")
    entry = comfy_server.run(g, timeout=300)
    text = ui_text(entry, "save")
    m = re.search(re.escape(prefix) + r"[^\s'\"]*\.safetensors", text)
    assert m, f"CASASaveLoRA's ui text does not name the file: {text!r}"
    saved = m.group(0)
    path = comfy_server.base_dir / "models" / "loras" / saved
    assert path.is_file(), f"{saved} is not in models/loras"
    tensors, meta = load_safetensors_bytes(path.read_bytes())

    exp = expected_for(ts, truth_cache, case)
    pre = "diffusion_model."
    want_dtype = getattr(torch, dtype)
    for layer, out in exp.outputs.items():
        up, down, alpha = (tensors[f"{pre}{layer}.lora_up.weight"], tensors[f"{pre}{layer}.lora_down.weight"],
                           tensors[f"{pre}{layer}.alpha"])
        assert up.dtype == want_dtype and down.dtype == want_dtype
        assert list(up.shape) == [out.tensors[0].shape[0], 8] and list(down.shape) == [8, out.tensors[1].shape[1]]
        assert float(alpha) == 8.0
    deltas = lora_file_deltas(tensors)
    tol = TOL if dtype == "float32" else 2e-3
    for layer, delta in exp.deltas.items():
        assert rel_err(deltas[layer], delta) < tol, layer
    stray = [k for k in tensors if not k.startswith(pre)]
    assert not stray, stray[:3]

    # the stock loader on the distilled model
    g2 = {
        "target": {"class_type": "UNETLoader", "inputs": {"unet_name": ts.distilled, "weight_dtype": "default"}},
        "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["target", 0], "lora_name": saved,
                                                                 "strength_model": 1.0}},
    }
    add_dump(g2, "dump_loaded", ["lora", 0], f"{prefix.replace('/', '_')}_loaded")
    log_at = comfy_server.log_size()
    entry2 = comfy_server.run(g2, timeout=300)
    assert "lora key not loaded" not in comfy_server.log_since(log_at)
    via_transfer, _ = fetch_dump(comfy_server, entry, "dump_transfer")
    via_loader, _ = fetch_dump(comfy_server, entry2, "dump_loaded")
    for layer, w in via_transfer.items():
        wt = ts.distilled_sd[layer + ".weight"].float()
        if layer in exp.deltas:
            assert rel_err(via_loader[layer] - wt, w - wt) < tol, layer
        else:
            assert torch.equal(via_loader[layer], w), layer


def test_ksampler_runs_on_the_patched_model(comfy_server, tiny_set):
    """(e) the transferred MODEL samples (finite latent) and differs from the unpatched model's sample."""
    ts = tiny_set
    g = graph_for(ts, ("CASA", "low-rank", 128, 0.0, 1.0))
    stats_patched = add_ksampler(g, ["transfer", 0], prefix="ks_", seed=11)
    stats_plain = add_ksampler(g, ["target", 0], prefix="ksplain_", seed=11)
    entry = comfy_server.run(g, timeout=300)
    a, b = latent_stats(entry, stats_patched), latent_stats(entry, stats_plain)
    assert a["finite"] and b["finite"] and a["shape"] == b["shape"] == [1, 16, 2, 4, 4]
    assert (a["mean"], a["std"]) != (b["mean"], b["std"]), "the transferred LoRA changed nothing in the sample"


def test_non_lowrank_keys_are_applied_like_comfyuis_loader(comfy_server, tiny_set, truth_cache):
    """A style LoRA that also carries ``.diff`` (norms, head.head) and ``.diff_b`` (biases) keys, at strength
    0.5: the transferred MODEL's block linears are W_t + ΔCASA (casa_core), and every other parameter
    (biases, norm weights, head.head) is exactly what ComfyUI's own LoraLoaderModelOnly makes of the same
    file at the same strength."""
    from safetensors.torch import load_file

    from _fixtures_models import lf

    ts = tiny_set
    name = f"casa_t_style_with_diffs_{uuid.uuid4().hex[:6]}.safetensors"
    sd = load_file(str(ts.lora_path(ts.style["kohya"])))
    extras = {k: v for k, v in lf.distill_extras(ts.base_sd, seed=9, std=2e-3).items() if not k.endswith(".diff_m")}
    sd.update(extras)
    from safetensors.torch import save_file

    save_file(sd, str(ts.lora_path(name)))
    strength = 0.5
    case = ("CASA", "exact", 128, 0.0, strength)
    g = graph_for(ts, case, lora=name)
    g["stock"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["target", 0], "lora_name": name,
                                                                  "strength_model": strength}}
    tag = uuid.uuid4().hex[:6]
    add_dump(g, "dump_casa", ["transfer", 0], f"diffs_casa_{tag}", keys="**")
    add_dump(g, "dump_stock", ["stock", 0], f"diffs_stock_{tag}", keys="**", after=["dump_casa", 0])
    add_save(g, "save", f"casa_tests/diffs_{tag}", dtype="float32")
    entry = comfy_server.run(g, timeout=300)
    casa, _ = fetch_dump(comfy_server, entry, "dump_casa")
    stock, _ = fetch_dump(comfy_server, entry, "dump_stock")
    exp = expected_for(ts, truth_cache, case, lora=name)

    moved = 0
    for key, w in casa.items():
        original = ts.distilled_sd[key].float()
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in exp.deltas:
            assert rel_err(w - original, exp.deltas[layer]) < TOL, key
        else:
            assert torch.allclose(w, stock[key], rtol=0, atol=1e-7), f"{key}: differs from LoraLoaderModelOnly"
            moved += not torch.equal(w, original)
    # the diffs really were applied (biases of 20 linears, 10 norms, head.head; not the modulation)
    assert moved >= 20 + 10 + 1, moved

    # the saved file carries them too: loaded at strength 1 by the stock loader, every parameter matches
    saved = re.search(r"casa_tests/diffs_[^\s'\"]*\.safetensors", ui_text(entry, "save")).group(0)
    g2 = {"target": {"class_type": "UNETLoader", "inputs": {"unet_name": ts.distilled, "weight_dtype": "default"}},
          "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["target", 0], "lora_name": saved,
                                                                   "strength_model": 1.0}}}
    add_dump(g2, "dump", ["lora", 0], f"diffs_saved_{tag}", keys="**")
    reloaded, _ = fetch_dump(comfy_server, comfy_server.run(g2, timeout=300), "dump")
    for key, w in casa.items():
        original = ts.distilled_sd[key].float()
        assert rel_err(reloaded[key] - original, w - original) < TOL if not torch.equal(w, original) \
            else torch.equal(reloaded[key], original), f"{key}: the saved LoRA does not reproduce the transfer"


def test_two_saves_with_one_prefix_write_two_files(comfy_server, tiny_set):
    """CASASaveLoRA numbers its files (<prefix>_<counter>): two saves never overwrite each other."""
    ts = tiny_set
    prefix = f"casa_tests/twice_{uuid.uuid4().hex[:6]}"
    g = graph_for(ts, ("CASA", "low-rank", 8, 0.0, 1.0))
    add_save(g, "save_a", prefix, dtype="float16")
    add_save(g, "save_b", prefix, dtype="float32")
    entry = comfy_server.run(g, timeout=300)
    names = []
    for nid in ("save_a", "save_b"):
        m = re.search(re.escape(prefix) + r"[^\s'\"]*\.safetensors", ui_text(entry, nid))
        assert m, ui_text(entry, nid)
        names.append(m.group(0))
    assert names[0] != names[1], names
    dtypes = set()
    for n in names:
        tensors, _ = load_safetensors_bytes((comfy_server.base_dir / "models" / "loras" / n).read_bytes())
        dtypes |= {str(t.dtype) for k, t in tensors.items() if k.endswith("lora_up.weight")}
    assert dtypes == {"torch.float16", "torch.float32"}, dtypes
