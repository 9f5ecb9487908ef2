"""The storage grid the nodes see in ComfyUI's own quantised weights (comfy_kitchen's QuantizedTensor, the
class ``comfy.quant_ops`` uses): per-tensor fp8 is modelled; NVFP4, MXFP8 (block scales) and INT8 are
lossy layouts without a noise model here, so the drift must say so instead of passing for a clean target."""
import importlib

import pytest
import torch

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture()
def weights(comfy_inprocess):
    comfy_inprocess.import_pack(REPO_ROOT)
    return importlib.import_module("casa_lora_pack.nodes.model_weights")


def _quantized(layout: str):
    import comfy.quant_ops

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    q = comfy.quant_ops.QuantizedTensor.from_float(w, layout)
    assert isinstance(q, comfy.quant_ops.QuantizedTensor)
    return w, q


def test_per_tensor_fp8_layout_is_modelled(weights):
    w, q = _quantized("TensorCoreFP8Layout")
    grid = weights.grid_of_weight(q)
    assert grid is not None and grid.supported and grid.kind == "float8_e4m3fn"
    deq = q.dequantize().float()
    lo, hi = grid.cells(deq)
    err = w - deq
    assert bool(((err >= lo) & (err <= hi)).all())  # the unrounded weights lie in their cells


@pytest.mark.parametrize("layout", ["TensorWiseINT8Layout", "TensorCoreNVFP4Layout", "TensorCoreMXFP8Layout"])
def test_other_lossy_layouts_are_named_and_not_modelled(weights, layout):
    w, q = _quantized(layout)
    assert float((q.dequantize().float() - w).norm()) > 0  # lossy indeed
    grid = weights.grid_of_weight(q)
    assert grid is not None and not grid.supported
    assert grid.describe() == layout
