"""What the nodes share: custom socket types, the cache folder, device and progress plumbing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..casa_core.basis import SourceBasis
from ..casa_core.drift import TargetDrift
from ..casa_core.formats.checkpoint import Checkpoint

CATEGORY = "casa-lora"
CACHE_FOLDER = "casa_cache"

BasisType = io.Custom("CASA_BASIS")
DriftType = io.Custom("CASA_DRIFT")
ReportType = io.Custom("CASA_REPORT")


def cache_dir() -> str:
    """The basis/drift cache folder, registered with ComfyUI as ``casa_cache`` (models/casa_cache)."""
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    path = folder_paths.get_folder_paths(CACHE_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def compute_device() -> torch.device:
    """ComfyUI's device (CUDA, MPS, XPU, NPU or CPU); linear algebra falls back to the CPU."""
    return mm.get_torch_device()


def progress_callback(total_hint: int = 1):
    """A casa_core progress callback that drives ComfyUI's progress bar and honours /interrupt."""
    bar = comfy.utils.ProgressBar(max(total_hint, 1))

    def update(done: int, total: int, _item: str) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


@dataclass
class BasisHandle:
    """Payload of a CASA_BASIS socket."""

    basis: SourceBasis
    source: Checkpoint
    name: str
    reused: bool
    seconds: float

    def describe(self) -> str:
        how = "reused from the cache" if self.reused else "computed"
        return f"source basis of {self.name}: {len(self.basis.layers)} layers, {how} in {self.seconds:.1f} s"


@dataclass
class DriftHandle:
    """Payload of a CASA_DRIFT socket."""

    basis: BasisHandle
    drift: TargetDrift
    reused: bool
    seconds: float

    def describe(self) -> str:
        how = "reused from the cache" if self.reused else "computed"
        moved = sum(1 for i in self.drift.info.values() if i.get("mode") != "zero")
        text = (f"drift of the target against {self.basis.name}: {moved}/{len(self.drift.info)} layers differ, "
                f"{how} in {self.seconds:.1f} s")
        same, missing = self.drift.identical(), self.drift.missing()
        if same:
            text += f"; {len(same)} identical in both models"
        if missing:
            text += f"; {len(missing)} not in the connected MODEL (e.g. {missing[0]})"
        return text


@dataclass
class ReportHandle:
    """Payload of a CASA_REPORT socket: the report, the routing data and the transferred layers."""

    report: object  # casa_core.transfer.TransferReport
    lora_name: str
    strength: float
    metadata: dict
    outputs: dict = field(default_factory=dict)  # layer -> LayerOutput
    summaries: dict = field(default_factory=dict)  # layer -> routing summary
    passthrough: dict = field(default_factory=dict)
