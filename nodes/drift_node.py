"""CASAComputeDrift: how the distilled model moved away from the base, in the base's coordinates."""
from __future__ import annotations

import time

from comfy_api.latest import io

from ..casa_core.drift import WeightDifference, drift_cache, load_or_build_drift, noise_summary
from ..casa_core.errors import CasaError
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
                "Connect the distilled model as loaded (fp8, scaled-fp8 and GGUF work: the drift is "
                "separated from their rounding noise), or the base model with a distillation LoRA "
                "(lightx2v, CausVid, Lightning …) already applied. Cached."
            ),
            inputs=[
                BasisType.Input("basis", tooltip="From CASA Load Source Basis (the base model)."),
                io.Model.Input(
                    "model",
                    tooltip="The distilled model you generate with: a distilled checkpoint (also fp8 or "
                    "GGUF through Unet Loader (GGUF)), or the base model after LoraLoaderModelOnly with a "
                    "distillation LoRA.",
                ),
            ],
            outputs=[DriftType.Output(display_name="drift")],
        )

    @classmethod
    def execute(cls, basis, model) -> io.NodeOutput:
        root = cache_dir()
        t0 = time.perf_counter()
        target = ComfyModelWeights(model)
        shared = set(basis.basis.layers) & set(target.layers)
        if len(shared) * 2 < len(basis.basis.layers):  # most of the base's layers are not in the model
            missing = sorted(set(basis.basis.layers) - shared)
            theirs = sorted(set(target.layers) - shared)
            raise CasaError(
                f"CASA Compute Drift: {len(missing)} of the {len(basis.basis.layers)} layers of the base model "
                f"{basis.name} ({getattr(basis.source, 'naming', '?')}, e.g. {missing[0]}) are not in the connected "
                f"MODEL ({target.naming}" + (f", e.g. {theirs[0]}" if theirs else "") + "); the two use namings "
                "that do not correspond, or are different models", file=basis.name)
        source = WeightDifference(basis.source, target)
        reused = drift_cache(basis.basis, source, root).complete
        drift = load_or_build_drift(
            basis.basis, source, root, device=compute_device(),
            progress=progress_callback(len(basis.basis.layers)),
        )
        handle = DriftHandle(basis, drift, reused, time.perf_counter() - t0)
        noise = noise_summary(drift, "the connected MODEL")
        summary = "\n".join([handle.describe(), *(n for n in noise if not n.startswith("WARNING"))])
        warnings = [*handle.warnings(), *(n[len("WARNING: "):] for n in noise if n.startswith("WARNING"))]
        return io.NodeOutput(handle, ui=summary_ui("CASA Compute Drift", summary, warnings))
