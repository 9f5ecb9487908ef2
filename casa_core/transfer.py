"""Per-LoRA transfer: stream the LoRA's layers through a method and out as patches or a file.

``iter_transfer`` yields one :class:`LayerResult` at a time so that callers (the file writer,
ComfyUI's model patcher) never hold more than one dense layer in memory.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from . import layer as L
from . import linalg
from .basis import SourceBasis
from .cache import Progress
from .drift import TargetDrift
from .errors import CasaError
from .factorize import LayerOutput, OutputSpec, realize, realize_direct
from .formats.keys import natural_key
from .methods import casa_layer, check_method, prolora_layer
from .parallel import large_side_by_side, map_layers
from .report import MOSTLY, LayerRecord, TransferReport, check_coverage, config_dict, provenance, start_report
from .routing import CasaParams
from .routing_data import RoutingSummary

__all__ = ["MOSTLY", "LayerRecord", "LayerResult", "Transfer", "TransferConfig", "TransferReport", "check_coverage",
           "config_dict", "iter_transfer", "provenance", "run_transfer_to_file", "start_report", "transfer_order"]


@dataclass(frozen=True)
class TransferConfig:
    method: str = "casa"
    params: CasaParams = CasaParams()
    output: OutputSpec = OutputSpec()
    device: str = "cpu"
    routing_data: bool = True

    def validate(self) -> None:
        check_method(self.method)
        self.params.validate()
        self.output.validate()
        linalg.check_device(self.device)


@dataclass
class LayerResult:
    """One transferred layer: its output (on the CPU), its report record and, for the CASA methods when
    the request asks for routing data, its routing summary."""

    layer: str
    output: LayerOutput
    record: LayerRecord
    summary: RoutingSummary | None = None


def iter_transfer(
    lora,  # casa_core.formats.lora.LoRAFile
    basis: SourceBasis | None,
    drift: TargetDrift | None,
    cfg: TransferConfig,
    report: TransferReport,
    progress: Progress | None = None,
) -> Iterator[LayerResult]:
    cfg.validate()
    method = cfg.method
    names = transfer_order(lora)
    if method != "direct":
        if basis is None or drift is None:
            raise ValueError(f"method {method} needs a source basis and a drift")
        missing = [n for n in names if n not in basis.layers]
        if missing:
            raise CasaError(
                f"{lora.path}, layer {missing[0]}: the source basis has no such layer "
                f"({len(missing)} LoRA layer(s) missing) — was the basis built from another model?",
                file=str(lora.path), layer=missing[0],
            )
        for n in names:
            if tuple(lora.updates[n].shape) != tuple(basis.layers[n]):
                (a, b), (c, d) = lora.updates[n].shape, basis.layers[n]
                raise CasaError(f"{lora.path}, layer {n}: the LoRA update is {a}x{b} but the source basis's layer is "
                                f"{c}x{d} — this LoRA was made for another model size", file=str(lora.path), layer=n)
        made_in = getattr(drift, "manifest", {}).get("basis")
        if made_in is not None and made_in != basis.key:
            raise CasaError("the drift was computed in another source basis (another base model, or another storage "
                            "of its basis) than the one given: compute the drift from this basis")
    dev = torch.device(cfg.device)
    total = len(names)

    def size(name: str) -> int:
        return math.prod(lora.updates[name].shape)

    def one(name: str):
        # the whole layer (cache reads, coordinates, method, output) under the per-layer thread rule
        with linalg.layer_threads(size(name), dev):
            return _transfer_layer(lora, name, basis, drift, cfg, dev)

    # small layers side by side on a small CPU (casa_core.parallel); the report is filled here, in order.
    # Closed on any exit (an interruption raised by ``progress``, an error, a consumer that stops), so the
    # layers still running are waited for and torch's thread count is restored at once
    # (on a 2-core CPU all of them, Wan-14B's included, for a low-rank output: parallel.large_side_by_side;
    # an exact one is as fast one layer at a time, its large products on both threads, at less memory)
    alone_from = math.inf if cfg.output.mode == "lowrank" and large_side_by_side(dev) else None
    with contextlib.closing(map_layers(one, names, size, dev, alone_from=alone_from)) as results:
        for i, (result, target_has) in enumerate(results):
            if target_has == "missing":
                report.missing_in_target.append(result.layer)
            elif target_has == "no drift":
                report.no_drift.append(result.layer)
            report.layers[result.layer] = result.record
            if progress is not None:
                progress(i + 1, total, result.layer)
            yield result


def _transfer_layer(lora, name: str, basis: SourceBasis | None, drift: TargetDrift | None, cfg: TransferConfig,
                    dev: torch.device) -> tuple[LayerResult, str | None]:
    """One layer of :func:`iter_transfer`: its result, and what the drift cache says of it ("missing" from
    the target, "no drift", or None). Touches no shared state: layers may run side by side."""
    method = cfg.method
    target_has = None
    upd = lora.updates[name]
    left, right = upd.factors()
    summary = stats = drift_norm = snr = storage = None
    # a layer the LoRA leaves as it is (a zero update: strength 0, alpha 0, an untrained LoRA) stays as it is
    # under every method: CASA's and ProLoRA's restoration alone would move the target back towards the base
    zero = not bool(left.any()) or (right is not None and not bool(right.any()))
    if method != "direct":
        entry = drift.entry(name)
        if entry.missing:
            target_has = "missing"
        elif entry.zero:
            target_has = "no drift"
        if entry.noise is not None:
            snr, storage = entry.noise["snr"], entry.noise.get("storage")
        else:
            storage = entry.unmodelled  # lossy, no noise model: no SNR
        drift_norm = entry.norm
    if method == "direct" or zero:
        out = realize_direct(left, right, cfg.output)
    else:
        b = basis.layer(name, dev)
        d = drift.layer(name, b, dev)
        coords = L.coordinates(b, d, left.to(dev), right.to(dev) if right is not None else None)
        if method == "prolora":
            cu = prolora_layer(coords, cfg.params)
        else:
            cu = casa_layer(coords, cfg.params, method, summary=cfg.routing_data)
            summary = cu.summary
        stats = cu.stats
        out = realize(coords, cu, cfg.output)
    lora_norm = linalg.product_norm(left, right)
    rec = LayerRecord(upd.shape, int(left.shape[1]) if right is not None else None, lora_norm, out.norm,
                      out.rel_error, out.rank, out.kind, drift_norm, snr, storage, stats)
    return LayerResult(name, LayerOutput(out.kind, tuple(t.cpu() for t in out.tensors), out.rank, out.rel_error,
                                         out.norm), rec, summary), target_has


class Transfer:
    """One LoRA's transfer as the nodes run it: the request, the report it fills and the provenance a file
    written from it carries; iterate it for the layers (:class:`LayerResult`, one at a time)."""

    def __init__(self, lora, basis: SourceBasis | None, drift: TargetDrift | None, cfg: TransferConfig,
                 strength: float, progress: Progress | None = None):
        _check_request(lora, strength)
        self.lora, self.basis, self.drift, self.cfg, self.strength = lora, basis, drift, cfg, strength
        self.progress = progress
        self.report = start_report(lora, cfg, strength)

    def provenance(self) -> dict[str, str]:
        return provenance(self.lora, self.basis, self.drift, self.cfg, self.strength)

    def __iter__(self) -> Iterator[LayerResult]:
        return iter_transfer(self.lora, self.basis, self.drift, self.cfg, self.report, self.progress)


#: the precisions a transferred LoRA is written in (torch dtypes, or their names)
OUTPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _output_dtype(dtype) -> torch.dtype:
    dt = OUTPUT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in OUTPUT_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)} (a torch dtype or its name), got {dtype!r}")
    return dt


def _check_request(lora, strength) -> None:
    """The LoRA is a read one, and ``strength`` the one it was read at: strength and alpha are applied when the
    file is read (:func:`casa_core.formats.lora.read_lora`), the value here is what the report records."""
    if not hasattr(lora, "updates") or not hasattr(lora, "path"):
        raise TypeError(f"lora must be a LoRA read by casa_core.read_lora (a LoRAFile), got {type(lora).__name__}")
    read_at = getattr(lora, "strength", None)
    if read_at is not None and not (isinstance(strength, (int, float)) and float(strength) == float(read_at)):
        raise ValueError(f"strength {strength!r} is not the strength the LoRA was read at ({read_at:g}): strength "
                         f"and alpha are applied by read_lora(..., strength=...); pass the same value here")


def run_transfer_to_file(
    lora, basis, drift, cfg: TransferConfig, strength: float, out_path: str | Path,
    *, dtype: torch.dtype = torch.float16, progress: Progress | None = None,
    summaries: dict[str, RoutingSummary] | None = None,
) -> TransferReport:
    """Transfer and write a ComfyUI-loadable LoRA file (atomically); ``summaries``, when given, receives
    each layer's routing summary (CASA methods)."""
    t0 = time.perf_counter()
    _check_request(lora, strength)
    dtype = _output_dtype(dtype)
    out = Path(out_path)
    if out.is_dir():
        raise CasaError(f"{out} is a folder: give the path of the .safetensors file to write", file=str(out))
    if not out.parent.is_dir():
        raise CasaError(f"{out}: the folder {out.parent} does not exist", file=str(out))
    report = start_report(lora, cfg, strength)
    if summaries is None and cfg.routing_data:
        # the heatmaps' routing data would be thrown away: not computing it changes nothing written
        cfg = replace(cfg, routing_data=False)
    with contextlib.closing(iter_transfer(lora, basis, drift, cfg, report, progress)) as layers:
        _write_transfer(lora, basis, drift, cfg, strength, out_path, dtype, summaries, layers)
    report.seconds = time.perf_counter() - t0
    return report


def _write_transfer(lora, basis, drift, cfg: TransferConfig, strength: float, out_path, dtype: torch.dtype,
                    summaries: dict | None, results: Iterator[LayerResult]) -> None:
    from .formats.keys import comfy_key
    from .formats.lora_write import write_comfy_lora

    if summaries is not None:
        def keep(it):
            for r in it:
                if r.summary is not None:
                    summaries[r.layer] = r.summary
                yield r
        results = keep(results)
    passthrough = lora.passthrough_at_strength()
    if cfg.output.mode == "exact":
        # shapes are known up front: stream one dense layer at a time
        entries = [(name, "diff", (lora.updates[name].shape,)) for name in transfer_order(lora)]
        # a full .diff the LoRA also carries for a transferred layer is added to its update
        extra = {n: passthrough.pop(comfy_key(n, "diff")) for n, _, _ in entries if comfy_key(n, "diff") in passthrough}
        tensors = ((r.output.tensors[0] + extra[r.layer].float(),) if r.layer in extra else r.output.tensors
                   for r in results)
        write_comfy_lora(str(out_path), entries, tensors, passthrough=passthrough,
                         metadata=provenance(lora, basis, drift, cfg, strength), dtype=dtype)
    else:
        # ranks are only known once computed (energy mode): the factors go to a spill file
        # next to the output first, so memory does not grow with the model's depth
        with _Spill(Path(out_path).parent) as spill:
            kept = [(r.layer, r.output.kind, tuple(spill.put(t.to(dtype)) for t in r.output.tensors))
                    for r in results]
            entries = [(layer, kind, tuple(ref[2] for ref in refs)) for layer, kind, refs in kept]
            tensors = (tuple(spill.get(ref) for ref in refs) for _, _, refs in kept)
            write_comfy_lora(str(out_path), entries, tensors, passthrough=passthrough,
                             metadata=provenance(lora, basis, drift, cfg, strength), dtype=dtype)


class _Spill:
    """A temporary file holding tensors written once and read back once (no pickle: raw bytes)."""

    def __init__(self, folder: Path):
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".casa-spill-")

    def __enter__(self) -> "_Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def put(self, t: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        return offset, t.dtype, tuple(t.shape)

    def get(self, ref: tuple[int, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        offset, dtype, shape = ref
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.file.seek(offset)
        raw = bytearray(self.file.read(n))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def transfer_order(lora) -> list[str]:
    return sorted(lora.updates, key=natural_key)
