"""Test-only ComfyUI node pack used by tests/comfy (never shipped to users).

Loaded by the ComfyUI server started in tests/comfy/conftest.py (linked into its custom_nodes/ as
``casa_test_nodes``). V3 API (``io.ComfyNode``), registered through ``comfy_entrypoint``.

* ``CasaTestZeroConditioning``: CONDITIONING of zeros [1, tokens, 4096], so Wan can be sampled without
  the real umt5-xxl text encoder (comfyui-notes §1).
* ``CasaTestLatentStats``: output node; puts the LATENT's shape, mean, std and finiteness into its ui
  dict, so a test reads the sampled result from ``/history`` without saving files.
* ``CasaTestSleep``: passes a LATENT through after sleeping, checking for interruption, so tests can
  exercise ``POST /interrupt`` on a prompt that is still running.
* ``CasaTestDumpWeights`` (weights.py): loads a MODEL through ComfyUI (patches baked in) and writes the
  live weights of the requested layers to the output folder, for comparison with independent maths;
  ``CasaTestPatchInfo``: what a MODEL's patch list holds (kind, shapes, dtypes, strengths).
* ``CasaTestImageStats`` (images.py): an IMAGE's shape, dtype and value range in its ui dict.
"""
import time

import torch

try:  # pinned API version first (comfyui-notes §4), then the moving one
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # pragma: no cover - older ComfyUI
    from comfy_api.latest import ComfyExtension, io

import comfy.model_management

from .images import CasaTestImageStats
from .weights import CasaTestDumpWeights, CasaTestPatchInfo

TEXT_DIM = 4096  # Wan's text_dim is fixed (never inferred from the checkpoint)


class CasaTestZeroConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestZeroConditioning",
            display_name="CASA test: zero conditioning",
            category="testing/casa",
            inputs=[
                io.Int.Input("tokens", default=8, min=1, max=512),
                io.Int.Input("batch", default=1, min=1, max=16),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, tokens: int, batch: int) -> io.NodeOutput:
        return io.NodeOutput([[torch.zeros(batch, tokens, TEXT_DIM), {}]])


class CasaTestLatentStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestLatentStats",
            display_name="CASA test: latent stats",
            category="testing/casa",
            inputs=[io.Latent.Input("samples")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        t = samples["samples"].float()
        stats = {
            "shape": list(t.shape),
            "mean": float(t.mean()),
            "std": float(t.std()) if t.numel() > 1 else 0.0,
            "finite": bool(torch.isfinite(t).all()),
        }
        return io.NodeOutput(ui={"casa_latent_stats": [stats]})


class CasaTestSleep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CasaTestSleep",
            display_name="CASA test: sleep (interruptible)",
            category="testing/casa",
            inputs=[
                io.Latent.Input("samples"),
                io.Float.Input("seconds", default=1.0, min=0.0, max=600.0),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, samples, seconds: float) -> io.NodeOutput:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.05)
        return io.NodeOutput(samples)


class CasaTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CasaTestZeroConditioning, CasaTestLatentStats, CasaTestSleep, CasaTestDumpWeights, CasaTestPatchInfo,
                CasaTestImageStats]


async def comfy_entrypoint() -> CasaTestExtension:
    return CasaTestExtension()
