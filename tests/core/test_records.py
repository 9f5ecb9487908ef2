"""The typed per-layer results (LayerRecord with RoutingStats / ProLoRAStats, RoutingSummary): their JSON and
tensor forms round-trip, and a real small transfer's records hold what plain maths on the files says."""
from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file, save_file

import casa_core
from casa_core import LayerRecord, ProLoRAStats, RoutingStats, RoutingSummary, synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.report import layer_totals

RANK, ALPHA = 4, 4.0


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A one-block Wan-shaped base (float32), its distilled copy stored in float32 and in bfloat16, a LoRA."""
    d = tmp_path_factory.mktemp("records")
    shape = synth.WanShape(dim=32, ffn_dim=64, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    dist = synth.distill(base, svd, rel_drift=0.02, seed=1, dtype=torch.float32)
    lora = synth.style_lora(svd, rank=RANK, alpha=ALPHA)
    save_file(base, str(d / "base.safetensors"))
    save_file(dist, str(d / "t_fp32.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in dist.items()}, str(d / "t_bf16.safetensors"))
    save_file(lora, str(d / "lora.safetensors"))
    src = Checkpoint(d / "base.safetensors", memo_dir=d / "cache")
    basis = load_or_build_basis(src, d / "cache", storage="float32")
    drifts = {t: load_or_build_drift(basis, WeightDifference(src, Checkpoint(d / f"t_{t}.safetensors")), d / "cache")
              for t in ("fp32", "bf16")}
    targets = {"fp32": dist, "bf16": {k: v.to(torch.bfloat16).float() for k, v in dist.items()}}
    return d, src, basis, drifts, base, targets, lora


def run(trio, method, target="fp32", **choices):
    d, src, basis, drifts, *_ = trio
    lora = read_lora(d / "lora.safetensors", src.layers)
    t = casa_core.Transfer(lora, basis if method != "direct" else None, drifts[target] if method != "direct" else None,
                           casa_core.from_inputs(method, **choices), 1.0)
    return t, list(t)


def lora_delta(lora: dict, layer: str) -> torch.Tensor:
    key = "lora_unet_" + layer.replace(".", "_")
    return (ALPHA / RANK) * lora[key + ".lora_up.weight"].float() @ lora[key + ".lora_down.weight"].float()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_records_round_trip_through_their_json_form(trio):
    records = []
    for method, target in (("casa", "bf16"), ("casa", "fp32"), ("prolora", "fp32"), ("direct", "fp32")):
        t, _ = run(trio, method, target, rank=3)
        data = json.loads(json.dumps(t.report.to_json()))
        for name, rec in t.report.layers.items():
            assert data["layers"][name] == rec.to_json()
            assert LayerRecord.from_json(data["layers"][name]) == rec
            records.append((method, target, rec))
        # the totals read the same from the records and from their JSON
        assert layer_totals(data["layers"]) == layer_totals(t.report.layers)
    for method, target, rec in records:
        keys = list(rec.to_json())
        assert keys[:2] == ["shape", "lora_rank"] and keys[-5:] == ["lora_norm", "update_norm", "rel_error",
                                                                      "out_rank", "kind"]
        if method == "direct":
            assert rec.stats is None and rec.drift_norm is None and len(keys) == 7
        elif method == "prolora":
            assert isinstance(rec.stats, ProLoRAStats) and rec.routing is None
            assert {"k", "phi_left", "phi_right", "drift_norm"} <= set(keys) and "clusters" not in keys
        else:
            assert isinstance(rec.stats, RoutingStats) and rec.routing is rec.stats
            assert keys[-17:-6] == [f.name for f in fields(RoutingStats)] and keys[-6] == "drift_norm"
        # a target stored in bfloat16 has storage noise, one in float32 none
        assert ("drift_snr" in keys) == ("target_storage" in keys) == (target == "bf16")
        if target == "bf16":
            assert keys[2:4] == ["drift_snr", "target_storage"] and rec.target_storage == "bf16" and rec.drift_snr > 0


def test_stats_round_trip():
    rs = RoutingStats(k=5, clusters=3, dominant_recv_clusters=1, dominant_send_clusters=2, dominant_rows=2,
                      dominant_cols=3, entries=64, dominant_entries=34, candidates=9, arbitrated_entries=2,
                      arbitration_threshold=None)
    assert RoutingStats.from_json(json.loads(json.dumps(rs.to_json()))) == rs
    assert json.loads(json.dumps(rs.to_json()))["arbitration_threshold"] is None
    ps = ProLoRAStats(k=4, phi_left=0.25, phi_right=1.0)
    assert ProLoRAStats.from_json(ps.to_json()) == ps and list(ps.to_json()) == ["k", "phi_left", "phi_right"]
    rec = LayerRecord((8, 8), None, 1.5, 2.0, 0.125, 8, "diff", 0.5, math.inf, "fp8 e4m3fn", rs)
    back = LayerRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec and back.shape == (8, 8)


def test_routing_summary_round_trips_through_a_safetensors_file(trio, tmp_path):
    _, results = run(trio, "casa")
    for r in results:
        s = r.summary
        t = s.as_tensors()
        assert list(t) == [f.name for f in fields(RoutingSummary)]
        save_file({k: v.contiguous() for k, v in t.items()}, str(tmp_path / "s.safetensors"))
        back = RoutingSummary.from_tensors(load_file(str(tmp_path / "s.safetensors")))
        for f in fields(RoutingSummary):
            a, b = getattr(s, f.name), getattr(back, f.name)
            assert a.dtype == b.dtype and torch.equal(a, b), (r.layer, f.name)


@pytest.mark.parametrize("target", ["fp32", "bf16"])
def test_a_real_transfers_records_hold_what_the_files_say(trio, target):
    _, _, _, _, base, targets, lora = trio
    t, results = run(trio, "casa", target, rank=3)
    _, exact = run(trio, "casa", target, injection="exact")
    exact = {r.layer: r.output.tensors[0].double() for r in exact}
    lost = total = 0.0
    for r in results:
        rec, name = r.record, r.layer
        assert rec is t.report.layers[name]
        w_s, w_t = base[name + ".weight"], targets[target][name + ".weight"]
        m, n = w_s.shape
        assert rec.shape == (m, n) and rec.lora_rank == RANK and rec.kind == "lowrank" and rec.out_rank == 3
        assert rel(rec.lora_norm, float(lora_delta(lora, name).norm())) < 1e-5
        if target == "fp32":  # (on a bfloat16 target the drift is the one separated from the rounding noise)
            assert rel(rec.drift_norm, float((w_t.double() - w_s.double()).norm())) < 1e-5
        # the patch against the exact update (the same transfer, injected exactly)
        patch = r.output.tensors[0].double() @ r.output.tensors[1].double()
        assert rel(rec.update_norm, float(exact[name].norm())) < 1e-5
        assert abs(rec.rel_error - float((patch - exact[name]).norm() / exact[name].norm())) < 1e-5
        lost += float((patch - exact[name]).norm()) ** 2
        total += float(exact[name].norm()) ** 2
        # CASA's counts: every entry of the layer; D = dominant rows x all columns + all rows x dominant
        # columns (rows: the longer side, where the routing works)
        st = rec.routing
        rows, cols = max(m, n), min(m, n)
        assert st.entries == m * n
        assert st.dominant_entries == st.dominant_rows * cols + st.dominant_cols * rows - st.dominant_rows * st.dominant_cols
        assert 0 < st.arbitrated_entries <= st.candidates <= st.dominant_entries < st.entries
        assert st.k <= cols and 1 <= st.clusters <= st.k
        # the routing summary counts the same entries, clusters and dominant clusters
        s = r.summary
        assert float(s.count.sum()) == st.entries and float(s.restored.sum()) == st.entries - st.dominant_entries
        assert s.labels.numel() == st.k and s.cluster_group.numel() == st.clusters
        assert int(s.recv_dominant.sum()) == st.dominant_recv_clusters
        assert int(s.send_dominant.sum()) == st.dominant_send_clusters
    totals = t.report.totals()
    assert abs(totals["kept_energy"] - (1.0 - lost / total)) < 1e-6
    assert totals["dominant_share"] == sum(r.record.routing.dominant_entries for r in results) / sum(
        r.record.routing.entries for r in results)
