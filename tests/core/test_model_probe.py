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
