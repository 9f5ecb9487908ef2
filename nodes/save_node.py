"""CASASaveLoRA: write the transferred LoRA so that the stock LoRA loaders use it later."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..casa_core import DTYPES
from ..casa_core.formats.lora_write import write_comfy_lora
from .common import CATEGORY, ReportType, advanced, summary_ui


#: characters a Windows file name cannot hold, and the longest file or folder name (bytes) most file systems allow
WINDOWS_RESERVED = frozenset('<>:"|?*')
MAX_NAME_BYTES = 255


def next_path(folder: str, prefix: str) -> tuple[str, str]:
    """``<folder>/<prefix>_00001.safetensors`` with the first free counter; also the name relative to folder."""
    prefix = prefix.strip().replace("\\", "/").lstrip("/") or "casa/transferred"
    parts = prefix.split("/")
    if ".." in parts:
        raise ValueError(f"filename_prefix must stay inside the loras folder, got {prefix!r}")
    bad = sorted({c for c in prefix if c in WINDOWS_RESERVED or ord(c) < 32})
    if bad:
        raise ValueError(f"filename_prefix {prefix!r} holds {' '.join(repr(c) for c in bad)}, which Windows cannot "
                         "have in a file name: leave them out, so that the workflow works on every machine")
    if prefix.endswith("/"):  # a folder: the default file name inside it
        prefix += "transferred"
    too_long = [p for p in parts[:-1] + [parts[-1] + "_00001.safetensors"] if len(p.encode()) > MAX_NAME_BYTES]
    if too_long:
        raise ValueError(f"filename_prefix is too long: {too_long[0][:40]!r}… has {len(too_long[0].encode())} "
                         f"bytes, and a file or folder name may have at most {MAX_NAME_BYTES}")
    sub, base = os.path.split(prefix)
    target = os.path.join(folder, sub)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"filename_prefix {prefix!r}: cannot make the folder {target} ({exc.strerror})") from None
    n = 1
    while os.path.exists(os.path.join(target, f"{base}_{n:05d}.safetensors")):
        n += 1
    rel = os.path.join(sub, f"{base}_{n:05d}.safetensors") if sub else f"{base}_{n:05d}.safetensors"
    return os.path.join(folder, rel), rel


class CASASaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASASaveLoRA",
            display_name="CASA Save LoRA",
            category=CATEGORY,
            description="Saves the transferred LoRA into your loras folder; load it later with the normal "
                        "LoRA loader (LoraLoaderModelOnly) at strength 1.",
            inputs=[
                ReportType.Input("report", tooltip="From CASA Transfer LoRA."),
                io.String.Input("filename_prefix", default="casa/transferred",
                                tooltip="File name inside the loras folder (a subfolder is allowed, e.g. casa/my_style); "
                                "_00001.safetensors is added, counting up so that no file is overwritten. The node "
                                "shows the path it wrote."),
                io.Combo.Input("dtype", options=list(DTYPES), default=next(iter(DTYPES)),
                               tooltip="Precision of the saved file. Leave at float16 (what LoRAs usually are) "
                               "unless you need bfloat16 or float32 for another tool.", **advanced()),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, filename_prefix, dtype) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        path, rel = next_path(folder, filename_prefix)
        layers = list(report.outputs)
        entries = [(name, report.outputs[name].kind, tuple(tuple(t.shape) for t in report.outputs[name].tensors))
                   for name in layers]
        write_comfy_lora(path, entries, (report.outputs[name].tensors for name in layers),
                         passthrough=report.passthrough, metadata=report.metadata, dtype=DTYPES[dtype])
        size = os.path.getsize(path)
        rel = rel.replace(os.sep, "/")
        text = (f"Saved {rel} in the loras folder ({len(layers)} layers, {dtype}, {size / 2**20:.1f} MiB).\n"
                "Load it on the distilled model with LoraLoaderModelOnly at strength 1.\n"
                f"Written to {path}")
        return io.NodeOutput(ui=summary_ui("CASA Save LoRA", text, saved=[{"path": path, "name": rel}]))
