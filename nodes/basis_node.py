"""CASALoadSourceBasis: the base model's singular bases, computed once and cached on disk."""
from __future__ import annotations

import os
import time

import folder_paths
from comfy_api.latest import io

from ..casa_core.basis import basis_cache, load_or_build_basis
from ..casa_core.formats.checkpoint import Checkpoint
from .common import (CATEGORY, BasisHandle, BasisType, advanced, cache_dir, compute_device, progress_callback,
                     safetensors_files, summary_ui)


class CASALoadSourceBasis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASALoadSourceBasis",
            display_name="CASA Load Source Basis",
            category=CATEGORY,
            description=(
                "Analyses the BASE model your LoRA was trained on (e.g. Wan2.1 T2V 1.3B) once: the "
                "singular directions of every linear layer. The result is cached in models/casa_cache "
                "and reused by every later transfer."
            ),
            inputs=[
                io.Combo.Input(
                    "base_model",
                    options=safetensors_files("diffusion_models"),
                    tooltip="The original model your LoRA was trained on (e.g. Wan2.1 T2V 1.3B), not the fast "
                    "distilled one. Its file is read layer by layer; it is not loaded next to the distilled model.",
                ),
                io.Combo.Input(
                    "storage",
                    options=["float16", "float32"],
                    default="float16",
                    tooltip="Precision of the cache on disk. Leave at float16 (half the disk space, about 4 GB "
                    "for Wan2.1-1.3B) unless you compare results to the last digit. Measured against float32: "
                    "the restored weights move by about 1.4e-5 of the update; a CASA decision sitting right at "
                    "its threshold can still flip. float32 is exact.",
                    **advanced(),
                ),
            ],
            outputs=[BasisType.Output(display_name="basis")],
        )

    @classmethod
    def fingerprint_inputs(cls, base_model, storage):
        path = folder_paths.get_full_path("diffusion_models", base_model)
        try:
            st = os.stat(path)
            return (path, st.st_size, st.st_mtime_ns, storage)
        except (TypeError, OSError):
            return (base_model, storage)

    @classmethod
    def execute(cls, base_model, storage) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", base_model)
        root = cache_dir()
        t0 = time.perf_counter()
        source = Checkpoint(path, memo_dir=root)
        reused = basis_cache(source, root, storage).complete
        basis = load_or_build_basis(
            source, root, storage=storage, device=compute_device(),
            progress=progress_callback(len(source.layers)),
        )
        handle = BasisHandle(basis, source, base_model, reused, time.perf_counter() - t0)
        return io.NodeOutput(handle, ui=summary_ui("CASA Load Source Basis", handle.describe()))
