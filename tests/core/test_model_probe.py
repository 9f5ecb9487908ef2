"""casa_core.model_probe: telling the model a drift measured from another one, from a few sketched layers."""
import math

import torch

from casa_core.model_probe import LIKE_BASE, SAME_MODEL, ModelProbe


def _models():
    gen = torch.Generator().manual_seed(0)
    shapes = {"big": (96, 80), "a": (64, 48), "b": (48, 64)}
    base = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
    drift = {n: 0.015 * float(base[n].norm()) * (lambda d: d / d.norm())(
        torch.randn(s[0], 4, generator=gen) @ torch.randn(4, s[1], generator=gen)) for n, s in shapes.items()}
    target = {n: base[n] + drift[n] for n in shapes}
    return shapes, base, drift, target


def test_the_measured_model_passes_and_others_are_told_apart_in_units_of_the_drift():
    shapes, base, drift, target = _models()
    probe = ModelProbe.measure(target.__getitem__, base.__getitem__, shapes)
    assert sorted(probe.measured) == ["a", "b"]  # the smallest layers
    has = shapes.__contains__
    # the same weights (a fresh copy) are the measured model
    assert probe.compare(lambda n: target[n].clone(), has) is None
    # the base: one drift away from the measured model, none from the base
    m = probe.compare(base.__getitem__, has)
    assert m is not None and abs(m.off - 1.0) < 1e-9 and m.to_base < 1e-9 < LIKE_BASE
    assert "looks like the base model itself" in ModelProbe.describe(m)
    # another model (ten drifts away) and the measured one at another distillation strength (0.6)
    gen = torch.Generator().manual_seed(5)
    other = {n: base[n] + 10 * drift[n].norm() * (lambda x: x / x.norm())(torch.randn(*shapes[n], generator=gen))
             for n in shapes}
    far = probe.compare(other.__getitem__, has)
    assert far is not None and far.off > 5 and "looks like the base" not in ModelProbe.describe(far)
    weaker = probe.compare(lambda n: base[n] + 0.6 * drift[n], has)
    # float32 weights: base + 0.6 drift is rounded to ~6e-8 of the weight, ~4e-6 of the 1.5 % drift
    assert weaker is not None and abs(weaker.off - 0.4) < 1e-5 and abs(weaker.to_base - 0.6) < 1e-5


def test_a_copy_in_another_precision_is_off_by_about_its_rounding_over_the_drift():
    """fp8 of the measured weights: the sketch's ratio estimates ||E||_F / ||dF||_F (E||X g||^2 = 4 ||X||_F^2),
    computed here directly."""
    shapes, base, drift, target = _models()
    probe = ModelProbe.measure(target.__getitem__, base.__getitem__, shapes)
    fp8 = {n: target[n].to(torch.float8_e4m3fn).float() for n in shapes}
    m = probe.compare(fp8.__getitem__, shapes.__contains__)
    truth = max(float((fp8[n] - target[n]).norm() / drift[n].norm()) for n in ("a", "b"))
    assert m is not None and m.off > SAME_MODEL and 0.5 * truth < m.off < 2.0 * truth, (m, truth)
    assert "another precision" in ModelProbe.describe(m)


def test_a_missing_layer_or_another_shape_is_a_mismatch():
    shapes, base, drift, target = _models()
    probe = ModelProbe.measure(target.__getitem__, base.__getitem__, shapes)
    gone = probe.compare(target.__getitem__, lambda n: n != "a")
    assert gone is not None and math.isinf(gone.off) and gone.layer == "a"
    reshaped = probe.compare(lambda n: target[n].T.contiguous(), shapes.__contains__)
    assert reshaped is not None and math.isinf(reshaped.off)
    assert "absent or has another shape" in ModelProbe.describe(reshaped)
    assert ModelProbe.measure(target.__getitem__, base.__getitem__, {}) is None


def test_the_drift_cache_keeps_the_sketches_of_the_weights_it_read(tmp_path):
    """A drift built from two files stores the sketches (no weight is read again for them); its probe passes the
    target's own weights, tells the base apart, and equals sketches computed here from the files."""
    from casa_core import synth
    from casa_core.basis import load_or_build_basis
    from casa_core.drift import WeightDifference, load_or_build_drift
    from casa_core.formats.checkpoint import Checkpoint
    from casa_core.formats.safetensors_io import write_file
    from casa_core.model_probe import sketch

    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "b.safetensors"), base)
    write_file(str(tmp_path / "t.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    src, tgt = Checkpoint(tmp_path / "b.safetensors"), Checkpoint(tmp_path / "t.safetensors")
    basis = load_or_build_basis(src, tmp_path / "c")
    drift = load_or_build_drift(basis, WeightDifference(src, tgt), tmp_path / "c")
    probe = drift.probe()
    assert probe is not None and len(probe.measured) == 2
    for name, s_t in probe.measured.items():
        assert torch.allclose(s_t.double(), sketch(tgt.get(name), name), rtol=1e-6, atol=1e-6)
        assert torch.allclose(probe.base[name].double(), sketch(src.get(name), name), rtol=1e-6, atol=1e-6)
    assert probe.compare(tgt.get, tgt.layers.__contains__) is None
    m = probe.compare(src.get, src.layers.__contains__)
    assert m is not None and abs(m.off - 1.0) < 1e-4 and m.to_base < 1e-4
