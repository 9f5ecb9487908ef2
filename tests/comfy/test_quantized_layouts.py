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


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout, kwargs, kind", [
    ("TensorWiseINT8Layout", {}, "int8"),
    ("TensorWiseINT8Layout", {"per_channel": True}, "int8"),
    ("TensorCoreMXFP8Layout", {}, "mxfp8"),
    ("TensorCoreNVFP4Layout", {}, "nvfp4"),
], ids=["int8", "int8-per-row", "mxfp8", "nvfp4"])
def test_int8_and_block_scaled_layouts_are_modelled(weights, layout, kwargs, kind, source):
    """comfy_kitchen's own quantisers, from float32 and from bfloat16 weights (what a model holds): the
    weight the nodes read (dequantised in float32) with the cells of its grid holds the unrounded weight,
    and the grid's noise energy is the error's (a row of 200 values ends in a partial block)."""
    import comfy.quant_ops

    w = (torch.randn(96, 200, generator=torch.Generator().manual_seed(1)) * 0.02).to(source)
    q = comfy.quant_ops.QuantizedTensor.from_float(w, layout, **kwargs)
    grid = weights.grid_of_weight(q)
    assert grid is not None and grid.supported and grid.kind == kind
    read = weights._plain(q)
    assert read.dtype == torch.float32 and tuple(read.shape) == (96, 200)
    lo, hi, var = grid.cells_and_variance(read)
    err = w.float() - read
    assert float(err.norm()) > 0
    assert bool(((err >= lo) & (err <= hi)).all())
    ratio = float(var.sum().sqrt() / err.norm())
    assert 0.85 < ratio < 1.15, ratio


@pytest.mark.parametrize("layout, kwargs", [
    ("TensorWiseINT8Layout", {"per_channel": True, "convrot": True}),
    ("AsymW4A8Int8Layout", {}),
], ids=["int8-rotated", "w4a8"])
def test_other_lossy_layouts_are_named_and_not_modelled(weights, layout, kwargs):
    """A rotated INT8 layout (its integers are not the weight's coordinates) and a 4-bit one stored in int8
    bytes: lossy, named, and not passed off as a modelled grid."""
    import comfy.quant_ops

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    q = comfy.quant_ops.QuantizedTensor.from_float(w, layout, **kwargs)
    assert float((q.dequantize().float() - w).norm()) > 0  # lossy indeed
    grid = weights.grid_of_weight(q)
    assert grid is not None and not grid.supported
    assert grid.describe() == layout
