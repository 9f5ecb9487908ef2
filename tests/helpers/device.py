"""The torch device the core tests compute on: ``CASA_TEST_DEVICE`` (default ``cpu``).

``CASA_TEST_DEVICE=cuda`` (what benchmarks/gpu_check.sh sets on a GPU machine) runs the basis, the
drift and the transfer of the tests that take a device on the GPU; what they compare against stays
independent float64 math on the CPU. A device that is asked for but cannot be used is an error, never
a silent fall back to the CPU.
"""
from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("CASA_TEST_DEVICE", "").strip() or "cpu"

try:
    torch.empty(1, device=DEVICE)
except (RuntimeError, AssertionError) as exc:  # e.g. a CPU-only torch asked for cuda
    raise RuntimeError(f"CASA_TEST_DEVICE={DEVICE!r} cannot be used by this torch ({torch.__version__}): "
                       f"{exc}") from exc
