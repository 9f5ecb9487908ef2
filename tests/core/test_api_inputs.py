"""The library's entry points refuse bad arguments in one sentence, before any work, instead of a raw torch error
deep inside, a silent no-op or a wrong file."""
import pytest
import torch

from casa_core import synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.errors import CasaError
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.linalg import check_device
from casa_core.request import from_inputs
from casa_core.transfer import Transfer, run_transfer_to_file
from safetensors.torch import load_file


def _trio(tmp_path, dim=64, name=""):
    base, svd = synth.wan_state_dict(synth.WanShape(dim=dim, ffn_dim=2 * dim, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / f"b{name}.safetensors"), base)
    write_file(str(tmp_path / f"t{name}.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    write_file(str(tmp_path / f"l{name}.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    src, tgt = Checkpoint(tmp_path / f"b{name}.safetensors"), Checkpoint(tmp_path / f"t{name}.safetensors")
    basis = load_or_build_basis(src, tmp_path / "c")
    return src, tgt, basis, load_or_build_drift(basis, WeightDifference(src, tgt), tmp_path / "c")


def test_the_strength_is_the_one_the_lora_was_read_at_and_the_dtype_one_of_three(tmp_path):
    src, _, basis, drift = _trio(tmp_path)
    lora = read_lora(tmp_path / "l.safetensors", basis.layers, strength=0.5)
    cfg = from_inputs("casa", rank=8)
    for bad in (1.0, 0.0, float("nan"), None, "0.5"):  # before, recorded but never applied: a wrong file
        with pytest.raises(ValueError, match="not the strength the LoRA was read at"):
            run_transfer_to_file(lora, basis, drift, cfg, bad, tmp_path / "o.safetensors")
        with pytest.raises(ValueError, match="not the strength the LoRA was read at"):
            Transfer(lora, basis, drift, cfg, bad)
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32"):  # was an all-zero file
        run_transfer_to_file(lora, basis, drift, cfg, 0.5, tmp_path / "o.safetensors", dtype=torch.int8)
    run_transfer_to_file(lora, basis, drift, cfg, 0.5, tmp_path / "o.safetensors", dtype="bfloat16")
    ups = [v for k, v in load_file(str(tmp_path / "o.safetensors")).items() if k.endswith("lora_up.weight")]
    assert ups and all(v.dtype == torch.bfloat16 and bool(v.any()) for v in ups)
    with pytest.raises(TypeError, match="lora must be a LoRA read by casa_core.read_lora"):
        run_transfer_to_file(str(tmp_path / "l.safetensors"), basis, drift, cfg, 0.5, tmp_path / "o.safetensors")
    for where, said in ((tmp_path, "is a folder"), (tmp_path / "no" / "o.safetensors", "does not exist")):
        with pytest.raises(CasaError, match=said):
            run_transfer_to_file(lora, basis, drift, cfg, 0.5, where)


def test_numbers_of_the_request_are_checked_by_name():
    for kw, said in (({"rank": 2.5}, "rank must be a whole number"), ({"rank": True}, "rank must be a whole number"),
                     ({"kept_energy": 0.9, "max_rank": 0}, "max_rank must be at least 1"),
                     ({"tau": "0.5"}, "tau must be a number"), ({"q_act": None}, "q_act must be a number")):
        with pytest.raises(ValueError, match=said):
            from_inputs("casa", **kw).validate()
    with pytest.raises(ValueError, match="unknown transfer method"):
        from_inputs({}).validate()


def test_a_device_this_machine_cannot_use_is_named_up_front(tmp_path):
    assert check_device("cpu:0") == torch.device("cpu", 0)
    unusable = [d for d in ("cuda", "mps", "xpu") if not getattr(torch, d).is_available()]
    assert unusable, "every accelerator is available: nothing to check here"
    for d in [*unusable, "gpu", None]:
        with pytest.raises(CasaError, match="device"):
            check_device(d)
        with pytest.raises(CasaError, match="device"):
            from_inputs("casa", device=d).validate()
    base, _ = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "b.safetensors"), base)
    with pytest.raises(CasaError, match=f"device '{unusable[0]}' is not available here"):
        load_or_build_basis(Checkpoint(tmp_path / "b.safetensors"), tmp_path / "c", device=unusable[0])
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing started


def test_a_lora_basis_and_drift_that_do_not_belong_together_are_named(tmp_path):
    src, _, basis, drift = _trio(tmp_path)
    _, _, big_basis, big_drift = _trio(tmp_path, dim=128, name="_big")
    cfg = from_inputs("casa", rank=8)
    big_lora = read_lora(tmp_path / "l_big.safetensors", big_basis.layers)
    with pytest.raises(CasaError, match="made for another model size"):  # was a raw matmul shape error
        run_transfer_to_file(big_lora, basis, drift, cfg, 1.0, tmp_path / "o.safetensors")
    lora = read_lora(tmp_path / "l.safetensors", basis.layers)
    with pytest.raises(CasaError, match="the drift was computed in another source basis"):
        run_transfer_to_file(lora, basis, big_drift, cfg, 1.0, tmp_path / "o.safetensors")
    with pytest.raises(CasaError, match="the model has no layer no.such.layer"):  # was a bare KeyError
        load_or_build_basis(src, tmp_path / "c", layers=["no.such.layer"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CasaError, match="cannot hold the cache"):  # was NotADirectoryError
        load_or_build_basis(Checkpoint(tmp_path / "b.safetensors"), tmp_path / "afile", storage="float32")
