"""One drift, two routes: base + distillation LoRA applied by ComfyUI's LoraLoaderModelOnly and read by the
node's weight provider, versus casa_core's LoRADrift on the same two files (what the command line does).

CASA's thresholds (quantiles, cluster edges, the complement's rank) can flip on last-bit differences of
the drift, so the two routes must give the same float32 drift, not two roundings of it: both form the
target in float64 and subtract through casa_core.drift.weight_difference."""
import pytest
import torch

from _fixtures_models import tiny_set_in

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_node_and_cli_drift_are_the_same_numbers(comfy_inprocess, strength):
    from casa_core.drift import LoRADrift, WeightDifference
    from casa_core.formats.checkpoint import Checkpoint
    from casa_core.formats.lora import read_lora

    c = comfy_inprocess
    ts = tiny_set_in(c.base_dir, "casa_dp")
    import importlib

    c.import_pack(REPO_ROOT)
    weights = importlib.import_module("casa_lora_pack.nodes.model_weights")
    base = c.load_unet(ts.base)
    (model,) = c.nodes.LoraLoaderModelOnly().load_lora_model_only(base, ts.distill_lora, strength)
    node_drift = WeightDifference(Checkpoint(ts.unet_path(ts.base)), weights.ComfyModelWeights(model))

    source = Checkpoint(ts.unet_path(ts.base))
    cli_drift = LoRADrift(read_lora(ts.lora_path(ts.distill_lora), source.layers, strength=strength), source)
    compared = 0
    for layer, shape in source.layers.items():
        a, b = node_drift.delta(layer, shape), cli_drift.delta(layer, shape)
        assert a is not None and b is not None, layer
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), (f"{layer}: {int((a != b).sum())} of {a.numel()} entries differ, "
                                   f"max {float((a - b).abs().max()):.3g}")
        compared += bool(a.any())
    assert compared >= len(ts.block_layers())  # the LoRA moved every block linear
