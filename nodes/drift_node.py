"""CASAComputeDrift: how the distilled model moved away from the base, in the base's coordinates."""
from __future__ import annotations

import time

from comfy_api.latest import io

from ..casa_core.drift import WeightDifference, drift_cache, load_or_build_drift
from .common import (
    CATEGORY,
    BasisType,
    DriftHandle,
    DriftType,
    cache_dir,
    compute_device,
    progress_callback,
    summary_ui,
)
from .model_weights import ComfyModelWeights


class CASAComputeDrift(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASAComputeDrift",
            display_name="CASA Compute Drift",
            category=CATEGORY,
            description=(
                "Measures how the fast (distilled) model differs from the base model, layer by layer. "
                "Connect the distilled model as loaded (fp8 and scaled-fp8 work), or the base model "
                "with a distillation LoRA (lightx2v, CausVid, Lightning …) already applied. Cached."
            ),
            inputs=[
                BasisType.Input("basis", tooltip="From CASA Load Source Basis (the base model)."),
                io.Model.Input(
                    "model",
                    tooltip="The distilled model you generate with: a distilled checkpoint, or the base "
                    "model after LoraLoaderModelOnly with a distillation LoRA.",
                ),
            ],
            outputs=[DriftType.Output(display_name="drift")],
        )

    @classmethod
    def execute(cls, basis, model) -> io.NodeOutput:
        root = cache_dir()
        t0 = time.perf_counter()
        target = ComfyModelWeights(model)
        source = WeightDifference(basis.source, target)
        reused = drift_cache(basis.basis, source, root).complete
        drift = load_or_build_drift(
            basis.basis, source, root, device=compute_device(),
            progress=progress_callback(len(basis.basis.layers)),
        )
        handle = DriftHandle(basis, drift, reused, time.perf_counter() - t0)
        return io.NodeOutput(handle, ui=summary_ui("CASA Compute Drift", handle.describe(), handle.warnings()))
