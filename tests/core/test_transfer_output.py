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


def test_triangular_complement_decodes_to_the_same_matrix():
    """The drift cache stores an upper-triangular C_F2 as its upper triangle (triu_indices order)."""
    from casa_core import layer as L
    from casa_core.drift import decode_drift, encode_drift

    g = torch.Generator().manual_seed(4)
    n, m = 7, 19
    c_f2 = torch.randn(n, n, generator=g).triu()
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    d = L.LayerDrift("x", torch.randn(n, n, generator=g), L.Complement(c_f=c_f2, q=q))
    tensors, info = encode_drift(d, "float32")
    assert "C_F2.triu" in tensors and tensors["C_F2.triu"].numel() == n * (n + 1) // 2
    back = decode_drift("x", tensors, info)
    assert torch.equal(back.complement.c_f, c_f2)  # float32 storage: exact, zeros below the diagonal
    # and element by element where the plain index arithmetic puts them
    flat = tensors["C_F2.triu"]
    k = 0
    for i in range(n):
        for j in range(i, n):
            assert back.complement.c_f[i, j] == flat[k]
            k += 1


def test_cache_decode_scales_a_copy_never_the_stored_tensor():
    from casa_core.cache import decode, encode

    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 20, generator=g) * 1e-3
    stored = {"C" + k: v for k, v in encode(x, "float16", scaled=True).items()}
    assert stored["C"].dtype == torch.float16 and "C.scale" in stored
    expect = stored["C"].float() * float(stored["C.scale"][0])
    assert torch.equal(decode(stored, "C"), expect)
    # a float32 tensor with a scale: decoding must not scale the tensor it was handed
    given = {"C": x.clone(), "C.scale": torch.tensor([2.0])}
    out = decode(given, "C")
    assert torch.equal(given["C"], x) and torch.equal(out, x * 2.0)
