"""Per-LoRA work that nothing reads is skipped without changing a byte of what is written (issue 11)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from helpers.device import DEVICE

from casa_core import synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.factorize import OutputSpec
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.transfer import TransferConfig, run_transfer_to_file

SHAPE = synth.WanShape(dim=128, ffn_dim=256, blocks=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    base, svd = synth.wan_state_dict(SHAPE, seed=21, dtype=torch.float32)
    write_file(str(d / "base.safetensors"), base)
    write_file(str(d / "distilled.safetensors"), synth.distill(base, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(d / "lora.safetensors"), synth.style_lora(svd, rank=8, alpha=4.0))
    return d


@pytest.mark.parametrize("mode", ["lowrank", "exact"])
def test_routing_data_is_computed_only_when_asked_for(files, monkeypatch, mode):
    import casa_core.methods.casa as casa_mod

    cache = files / "cache"
    source, target = Checkpoint(files / "base.safetensors"), Checkpoint(files / "distilled.safetensors")
    basis = load_or_build_basis(source, cache, device=DEVICE)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=DEVICE)
    lora = read_lora(files / "lora.safetensors", basis.layers)
    spec = OutputSpec(mode=mode, rank=8 if mode == "lowrank" else None)
    cfg = TransferConfig(output=spec, device=DEVICE)
    calls = []
    real = casa_mod.routing_summary
    monkeypatch.setattr(casa_mod, "routing_summary", lambda *a, **k: calls.append(1) or real(*a, **k))

    summaries: dict = {}
    with_data = run_transfer_to_file(lora, basis, drift, cfg, 1.0, files / f"a_{mode}.safetensors",
                                     summaries=summaries)
    assert len(calls) == len(lora.updates) == len(summaries)
    calls.clear()
    without = run_transfer_to_file(lora, basis, drift, cfg, 1.0, files / f"b_{mode}.safetensors")
    assert calls == []
    digest = [hashlib.sha256((files / f"{p}_{mode}.safetensors").read_bytes()).hexdigest() for p in "ab"]
    assert digest[0] == digest[1]
    assert with_data.to_json()["layers"] == without.to_json()["layers"]
