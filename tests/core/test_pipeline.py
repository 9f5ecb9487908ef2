"""Basis -> drift -> transfer on tiny Wan-shaped files, against independent float64 math."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from casa_core import synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import LoRADrift, WeightDifference, load_or_build_drift
from casa_core.errors import CasaError
from casa_core.factorize import OutputSpec
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.transfer import TransferConfig, run_transfer_to_file
from safetensors.torch import load_file

from helpers.device import DEVICE
from helpers.plain import plain_casa

SHAPE = synth.WanShape(dim=128, ffn_dim=256, blocks=2)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("trio")
    base, svd = synth.wan_state_dict(SHAPE, seed=0, dtype=torch.float32)
    write_file(str(d / "base.safetensors"), base)
    write_file(str(d / "distilled.safetensors"), synth.distill(base, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(d / "lora.safetensors"), synth.style_lora(svd, rank=8, alpha=4.0))
    return d


def _open(trio):
    cache = trio / "cache"
    return Checkpoint(trio / "base.safetensors", memo_dir=cache), Checkpoint(trio / "distilled.safetensors", memo_dir=cache), cache


def _dense_delta(path: Path, layer: str) -> torch.Tensor:
    """What ComfyUI would add for a file we wrote: up @ down * alpha / rank, or .diff."""
    sd = load_file(str(path))
    key = f"diffusion_model.{layer}"
    if key + ".diff" in sd:
        return sd[key + ".diff"].double()
    up, down = sd[key + ".lora_up.weight"].double(), sd[key + ".lora_down.weight"].double()
    alpha = float(sd[key + ".alpha"]) if key + ".alpha" in sd else up.shape[1]
    return up @ down * (alpha / up.shape[1])


def test_exact_casa_matches_independent_float64_computation(trio):
    source, target, cache = _open(trio)
    basis = load_or_build_basis(source, cache, storage="float32", device=DEVICE)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=DEVICE)
    lora = read_lora(trio / "lora.safetensors", basis.layers)
    out = trio / "casa_exact.safetensors"
    cfg = TransferConfig(output=OutputSpec(mode="exact", rank=None), device=DEVICE)
    run_transfer_to_file(lora, basis, drift, cfg, 1.0, out,
                         dtype=torch.float32)
    raw = load_file(str(trio / "lora.safetensors"))
    checked = 0
    for layer in ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.self_attn.v"]:
        ws = source.get(layer).double()
        wt = target.get(layer).double()
        key = "lora_unet_" + layer.replace(".", "_")
        up, down = raw[key + ".lora_up.weight"].double(), raw[key + ".lora_down.weight"].double()
        dl = up @ down * (float(raw[key + ".alpha"]) / up.shape[1])
        # The cached float32 basis, checked against the weight, then used in float64: an
        # independently computed SVD would move entries that sit on the arbitration threshold.
        b = basis.layer(layer)
        u, s, v = b.U.double(), b.S.double(), b.V.double()
        assert float(((u * s) @ v.T - ws).norm() / ws.norm()) < 1e-5
        assert float((u.T @ u - torch.eye(u.shape[1], dtype=torch.float64)).abs().max()) < 1e-5
        new, info = plain_casa(u.T @ dl @ v, u.T @ (wt - ws) @ v, s, True, 0.5, 0.5, 0.85, 0.9)
        got = u.T @ _dense_delta(out, layer) @ v  # our update in the same coordinates
        # An entry whose score is within float32 rounding of the arbitration threshold may
        # fall on either side of it; everything else must agree.
        near = np.abs(info["score"] - info["thr"]) <= 1e-4 * abs(info["thr"])
        far = torch.from_numpy(~near)
        assert int(near.sum()) <= 4
        np.testing.assert_allclose(got[far].numpy(), new[~near], rtol=0, atol=1e-5 * np.abs(new).max())
        checked += 1
    assert checked == 3


def test_lowrank_keeps_reported_share_and_is_deterministic(trio):
    source, target, cache = _open(trio)
    basis = load_or_build_basis(source, cache, device=DEVICE)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=DEVICE)
    lora = read_lora(trio / "lora.safetensors", basis.layers)
    cfg_exact = TransferConfig(output=OutputSpec(mode="exact", rank=None), device=DEVICE)
    cfg_low = TransferConfig(output=OutputSpec(mode="lowrank", rank=16), device=DEVICE)
    run_transfer_to_file(lora, basis, drift, cfg_exact, 1.0, trio / "e.safetensors", dtype=torch.float32)
    rep = run_transfer_to_file(lora, basis, drift, cfg_low, 1.0, trio / "l1.safetensors", dtype=torch.float32)
    run_transfer_to_file(lora, basis, drift, cfg_low, 1.0, trio / "l2.safetensors", dtype=torch.float32)
    h = [hashlib.sha256((trio / f).read_bytes()).hexdigest() for f in ("l1.safetensors", "l2.safetensors")]
    assert h[0] == h[1]
    for layer in ["blocks.0.ffn.0", "blocks.1.ffn.2", "blocks.0.self_attn.k"]:
        exact = _dense_delta(trio / "e.safetensors", layer)
        low = _dense_delta(trio / "l1.safetensors", layer)
        err = float((exact - low).norm() / exact.norm())
        assert abs(err - rep.layers[layer].rel_error) < 2e-3, layer
        # the best rank-16 approximation error, from the singular values of the exact update
        s = torch.linalg.svdvals(exact)
        best = float(s[16:].norm() / s.norm())
        assert err <= best * 1.01 + 1e-4, layer


def test_second_run_reuses_caches(trio, monkeypatch):
    source, target, cache = _open(trio)
    basis = load_or_build_basis(source, cache, device=DEVICE)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=DEVICE)
    import casa_core.layer as L

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(L, "compute_basis", boom)
    monkeypatch.setattr(L, "compute_drift", boom)
    basis2 = load_or_build_basis(source, cache, device=DEVICE)
    drift2 = load_or_build_drift(basis2, WeightDifference(source, target), cache, device=DEVICE)
    # the same cache folders, and the same numbers as the first build
    assert basis2.cache.final == basis.cache.final
    name = "blocks.0.ffn.0"
    first, again = basis.layer(name), basis2.layer(name)
    assert torch.equal(first.S, again.S) and torch.equal(first.U, again.U)
    assert drift2.cache.final == drift.cache.final
    assert torch.equal(drift.layer(name, first).c_f, drift2.layer(name, again).c_f)


def test_interrupted_basis_leaves_no_cache_and_resumes(tmp_path):
    base, _ = synth.wan_state_dict(SHAPE, seed=3, dtype=torch.float32)
    write_file(str(tmp_path / "b.safetensors"), base)
    src = Checkpoint(tmp_path / "b.safetensors")
    cache = tmp_path / "cache"

    class Stop(Exception):
        pass

    def stop_at_5(done, total, name):
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        load_or_build_basis(src, cache, progress=stop_at_5, device=DEVICE)
    assert not any(p.name.startswith("basis-") and not p.name.endswith(".partial") for p in cache.iterdir())
    seen = []
    basis = load_or_build_basis(src, cache, progress=lambda d, t, n: seen.append(n), device=DEVICE)
    assert len(basis.layers) == len(src.layers)
    assert len(seen) == len(src.layers)


def test_a_clear_error_on_the_inputs_leaves_no_partial_cache_behind(tmp_path):
    """A NaN in a late layer stops the basis with a CasaError: the shards of the layers before it are removed
    (the key follows the file's content, so no later run could resume them), unlike an interruption's."""
    base, _ = synth.wan_state_dict(SHAPE, seed=3, dtype=torch.float32)
    last = sorted(k for k in base if k.endswith(".weight") and base[k].dim() == 2)[-1]
    base[last] = base[last].clone()
    base[last][0, 0] = float("nan")
    write_file(str(tmp_path / "b.safetensors"), base)
    src = Checkpoint(tmp_path / "b.safetensors")
    cache = tmp_path / "cache"
    seen = []
    with pytest.raises(CasaError, match="NaN"):
        load_or_build_basis(src, cache, progress=lambda d, t, n: seen.append(n), device=DEVICE)
    assert seen, "no layer was computed before the bad one: the test would not show the clean-up"
    assert not [p.name for p in cache.iterdir() if p.name.startswith("basis-")]


def test_cache_of_another_source_is_not_reused(tmp_path):
    cache = tmp_path / "cache"
    for seed in (1, 2):
        base, _ = synth.wan_state_dict(SHAPE, seed=seed, dtype=torch.float32)
        write_file(str(tmp_path / "b.safetensors"), base)  # same path, new content
        src = Checkpoint(tmp_path / "b.safetensors", memo_dir=cache)
        basis = load_or_build_basis(src, cache, storage="float32", device=DEVICE)
        w = src.get("blocks.0.self_attn.q").double()
        b = basis.layer("blocks.0.self_attn.q")
        rebuilt = (b.U.double() * b.S.double()) @ b.V.double().T
        assert float((rebuilt - w).norm() / w.norm()) < 1e-5


def test_distillation_lora_drift_equals_checkpoint_drift(tmp_path):
    base, svd = synth.wan_state_dict(SHAPE, seed=4, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    dl = synth.style_lora(svd, rank=4, alpha=4.0, seed=9)  # used here as a "distillation LoRA"
    write_file(str(tmp_path / "distill.safetensors"), {k: v.float() for k, v in dl.items()})
    merged = dict(base)
    for key in dl:
        if key.endswith(".lora_up.weight"):
            prefix = key[: -len(".lora_up.weight")]
            layer = prefix[len("lora_unet_"):].replace("_", ".").replace("self.attn", "self_attn").replace("cross.attn", "cross_attn")
            delta = dl[prefix + ".lora_up.weight"].float() @ dl[prefix + ".lora_down.weight"].float()
            merged[layer + ".weight"] = base[layer + ".weight"] + delta * (float(dl[prefix + ".alpha"]) / 4)
    write_file(str(tmp_path / "merged.safetensors"), merged)
    cache = tmp_path / "cache"
    src = Checkpoint(tmp_path / "base.safetensors")
    basis = load_or_build_basis(src, cache, storage="float32", device=DEVICE)
    d1 = load_or_build_drift(basis, LoRADrift(read_lora(tmp_path / "distill.safetensors", src.layers), src), cache,
                             device=DEVICE)
    d2 = load_or_build_drift(basis, WeightDifference(src, Checkpoint(tmp_path / "merged.safetensors")), cache,
                             device=DEVICE)
    for layer in ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.ffn.2", "head.head"]:
        b = basis.layer(layer)
        a, c = d1.layer(layer, b), d2.layer(layer, b)
        torch.testing.assert_close(a.c_f, c.c_f, rtol=0, atol=1e-6)
    assert d1.info["head.head"]["mode"] == "zero"


def test_float16_cache_error_is_small(trio):
    source, target, cache = _open(trio)
    b16 = load_or_build_basis(source, cache, storage="float16", device=DEVICE)
    d16 = load_or_build_drift(b16, WeightDifference(source, target), cache, device=DEVICE)
    from casa_core.layer import drift_dense

    for layer in ["blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.1.ffn.2"]:
        exact = target.get(layer).double() - source.get(layer).double()
        b = b16.layer(layer)
        got = drift_dense(b, d16.layer(layer, b)).double()
        assert float((got - exact).norm() / exact.norm()) < 1e-3, layer


def test_lora_for_other_model_size_is_a_clear_error(tmp_path, trio):
    big = synth.WanShape(dim=256, ffn_dim=512, blocks=1)
    _, svd = synth.wan_state_dict(big, seed=0)
    write_file(str(tmp_path / "big_lora.safetensors"), synth.style_lora(svd, rank=4))
    source, _, _ = _open(trio)
    with pytest.raises(CasaError) as exc:
        read_lora(tmp_path / "big_lora.safetensors", source.layers)
    msg = str(exc.value)
    assert "big_lora.safetensors" in msg and "blocks.0." in msg and "256" in msg and "128" in msg


def test_nan_in_source_is_a_clear_error(tmp_path):
    base, _ = synth.wan_state_dict(SHAPE, seed=0, dtype=torch.float32)
    base["blocks.1.ffn.0.weight"][3, 4] = float("nan")
    write_file(str(tmp_path / "bad.safetensors"), base)
    with pytest.raises(CasaError) as exc:
        load_or_build_basis(Checkpoint(tmp_path / "bad.safetensors"), tmp_path / "cache", device=DEVICE)
    assert "bad.safetensors" in str(exc.value) and "blocks.1.ffn.0" in str(exc.value)
