"""Float16 basis storage against float32 storage, through the real caches and transfer.

A float16 cache reads ``U`` and ``V`` back orthonormal only to ~5e-4; plain projections would
rebuild the drift and the LoRA with that error and move restoration by ~4e-4 of the update.
The basis read from a float16 cache solves for its coordinates instead (casa_core/layer.py).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from casa_core import synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.factorize import OutputSpec
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.layer import coordinates
from casa_core.transfer import TransferConfig, run_transfer_to_file

SHAPE = synth.WanShape(dim=128, ffn_dim=384, blocks=1)
LAYERS = ["blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("storage")
    base, svd = synth.wan_state_dict(SHAPE, seed=4, dtype=torch.float32)
    write_file(str(d / "base.safetensors"), base)
    write_file(str(d / "distilled.safetensors"), synth.distill(base, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(d / "lora.safetensors"), synth.style_lora(svd, rank=8, alpha=4.0))
    return d


def _transfer(trio, storage, method):
    cache = trio / "cache"
    source = Checkpoint(trio / "base.safetensors", memo_dir=cache)
    target = Checkpoint(trio / "distilled.safetensors", memo_dir=cache)
    basis = load_or_build_basis(source, cache, storage=storage, layers=LAYERS)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, layers=LAYERS)
    lora = read_lora(trio / "lora.safetensors", basis.layers)
    lora.updates = {k: v for k, v in lora.updates.items() if k in LAYERS}
    out = trio / f"{method}_{storage}.safetensors"
    run_transfer_to_file(lora, basis, drift, TransferConfig(method=method, output=OutputSpec(mode="exact", rank=None)),
                         1.0, out, dtype=torch.float32)
    sd = load_file(str(out))
    return {name: sd[f"diffusion_model.{name}.diff"].double() for name in LAYERS}, basis, drift, lora


def test_float16_restoration_matches_float32_storage(trio):
    """Restoration only (no entry-wise decision to flip): the float16 cache's update equals the
    float32 cache's to float32 rounding, not to float16's 5e-4."""
    got16, *_ = _transfer(trio, "float16", "restoration_only")
    got32, *_ = _transfer(trio, "float32", "restoration_only")
    for name in LAYERS:
        rel = float((got16[name] - got32[name]).norm() / got32[name].norm())
        print(f"\n{name}: restoration, float16 vs float32 storage {rel:.1e}")
        assert rel < 5e-5, name


def test_float16_basis_rebuilds_lora_and_drift(trio):
    _, basis, drift, lora = _transfer(trio, "float16", "restoration_only")
    source = Checkpoint(trio / "base.safetensors")
    target = Checkpoint(trio / "distilled.safetensors")
    for name in LAYERS:
        b = basis.layer(name)
        assert b.refine
        d = drift.layer(name, b)
        upd = lora.updates[name]
        left, right = upd.up.float() * float(upd.scale), upd.down.float()
        co = coordinates(b, d, left, right)
        dl = left.double() @ right.double()
        lora_err = float((co.to_dense(co.c_l()).double() - dl).norm() / dl.norm())
        exact = target.get(name).double() - source.get(name).double()
        # C_F is stored in float32; an FFN layer's complement basis Q2 in float16 (4e-5 of the drift)
        drift_err = float((co.to_dense(co.c_f()).double() - exact).norm() / exact.norm())
        print(f"\n{name}: LoRA rebuilt to {lora_err:.1e}, drift to {drift_err:.1e}")
        assert lora_err < 1e-5, name
        assert drift_err < (1e-5 if b.square else 1e-4), name


def test_same_target_read_two_ways_gives_the_same_transfer(trio, tmp_path):
    """A distillation LoRA as a dense delta (LoRADrift) and as W_t - W_s of the model it makes
    differ by float32 rounding only (~5e-6 of the drift); with a float16 basis the transfer must
    not turn that into different arbitration decisions (float16-rounded drift coordinates did:
    one ulp moved the threshold by 5e-4 and flipped entries).  FFN layers keep one float16 part,
    the drift's complement basis Q2: its rounding (5e-4 of the drift's complement part, here as
    large as the LoRA) differs between the two readings."""
    from casa_core.drift import LoRADrift

    cache = trio / "cache"
    source = Checkpoint(trio / "base.safetensors", memo_dir=cache)
    base = load_file(str(trio / "base.safetensors"))
    distill = read_lora(trio / "lora.safetensors", source.layers)  # any LoRA serves as the drift here
    target_sd = dict(base)
    for name in LAYERS:
        target_sd[name + ".weight"] = base[name + ".weight"] + distill.updates[name].dense().float()
    write_file(str(tmp_path / "made.safetensors"), target_sd)
    made = Checkpoint(tmp_path / "made.safetensors", memo_dir=cache)
    basis = load_or_build_basis(source, cache, storage="float16", layers=LAYERS)
    style = read_lora(trio / "lora.safetensors", basis.layers, strength=0.7)
    style.updates = {k: v for k, v in style.updates.items() if k in LAYERS}
    outs = []
    for i, dsrc in enumerate((LoRADrift(distill, source), WeightDifference(source, made))):
        drift = load_or_build_drift(basis, dsrc, cache, layers=LAYERS)
        out = tmp_path / f"two_ways_{i}.safetensors"
        run_transfer_to_file(style, basis, drift, TransferConfig(output=OutputSpec(mode="exact", rank=None)),
                             0.7, out, dtype=torch.float32)
        outs.append(load_file(str(out)))
    for name in LAYERS:
        key = f"diffusion_model.{name}.diff"
        a, b = outs[0][key].double(), outs[1][key].double()
        rel = float((a - b).norm() / a.norm())
        print(f"\n{name}: transfer, dense delta vs W_t - W_s {rel:.1e}")
        assert rel < (2e-5 if basis.layers[name][0] == basis.layers[name][1] else 5e-4), name
