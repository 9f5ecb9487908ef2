"""What the nodes share: custom socket types, the cache folder, device and progress plumbing, and the
summary each node shows on itself (``summary_ui``; drawn by web/casa_summary.js)."""
from __future__ import annotations

import inspect
import logging
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

LOG = logging.getLogger("casa-lora")
SUMMARY_KEY = "casa_summary"

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


def summary_ui(node: str, summary: str, warnings=(), **extra) -> dict:
    """A node's ui output: ``text`` (its summary, then one ``warning: ...`` line per warning; in /history)
    and ``casa_summary`` (the same, structured, for the text area web/casa_summary.js draws on the node).
    Warnings also go to the server log, naming the node."""
    warnings = [w for w in warnings if w]
    for w in warnings:
        LOG.warning("casa-lora %s: %s", node, w)
    text = "\n".join([summary, *(f"warning: {w}" for w in warnings)])
    return {"text": (text,), SUMMARY_KEY: [{"node": node, "summary": summary, "warnings": warnings}], **extra}


#: what the nodes' file lists offer: the files casa-lora reads (never a pickle: .pt, .ckpt, .bin)
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of one of ComfyUI's model folders (``loras``, ``diffusion_models``)."""
    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(SAFETENSORS_SUFFIXES)]


def advanced() -> dict:
    """Keyword arguments that mark an input as advanced (listed under "Advanced inputs" in the properties panel,
    hidden by Vue nodes until "show advanced"): ComfyUI 0.33.0 has the ``advanced`` argument, 0.8.0 does not."""
    if "advanced" in inspect.signature(io.Float.Input.__init__).parameters:
        return {"advanced": True}
    return {}


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
        how = (f"reused from the cache in {self.seconds:.1f} s" if self.reused else
               f"computed in {self.seconds:.1f} s and cached in models/{CACHE_FOLDER}: later runs reuse it")
        return f"Base model {self.name} analysed: {len(self.basis.layers)} layers, {how}"


@dataclass
class DriftHandle:
    """Payload of a CASA_DRIFT socket."""

    basis: BasisHandle
    drift: TargetDrift
    reused: bool
    seconds: float

    def moved(self) -> int:
        return self.drift.moved()

    def describe(self) -> str:
        how = f"reused from the cache in {self.seconds:.1f} s" if self.reused else f"computed in {self.seconds:.1f} s, cached"
        text = (f"Distilled model compared with the base {self.basis.name}: {self.moved()} of {len(self.drift.info)} "
                f"layers differ ({how})")
        same, missing, lost = self.drift.identical(), self.drift.missing(), self.drift.lost_in_noise()
        if same:
            text += f"; {len(same)} identical in both models"
        if lost:
            text += (f"; {len(lost)} differ but their drift does not stand out from the storage noise "
                     f"(estimated as zero, e.g. {lost[0]})")
        if missing:
            text += f"; {len(missing)} not in the connected MODEL (e.g. {missing[0]})"
        return text

    def warnings(self) -> list[str]:
        if self.drift.info and self.moved() == 0 and not self.drift.missing():
            return [(f"the model is identical to the base {self.basis.name} in every layer: connect the distilled "
                     "model (or the base with a distillation LoRA), else CASA has nothing to work with")]
        return []


@dataclass
class ReportHandle:
    """Payload of a CASA_REPORT socket: the report, the routing data and the transferred layers."""

    report: object  # casa_core.transfer.TransferReport
    lora_name: str
    strength: float
    metadata: dict
    outputs: dict = field(default_factory=dict)  # layer -> LayerOutput
    summaries: dict = field(default_factory=dict)  # layer -> casa_core RoutingSummary
    passthrough: dict = field(default_factory=dict)
