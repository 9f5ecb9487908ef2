"""Per-LoRA transfer: stream the LoRA's layers through a method and out as patches or a file.

``iter_transfer`` yields one :class:`LayerResult` at a time so that callers (the file writer,
ComfyUI's model patcher) never hold more than one dense layer in memory.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__
from . import layer as L
from .basis import SourceBasis
from .drift import TargetDrift
from .errors import CasaError
from .factorize import LayerOutput, OutputSpec, realize, realize_direct
from .methods import METHOD_LABELS, casa_layer, check_method, prolora_layer
from .routing import CasaParams

Progress = Callable[[int, int, str], None]


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


@dataclass
class LayerResult:
    layer: str
    output: LayerOutput
    report: dict
    summary: dict | None = None


@dataclass
class TransferReport:
    method: str
    config: dict
    layers: dict[str, dict] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    no_drift: list[str] = field(default_factory=list)  # present in both models, identical weights
    missing_in_target: list[str] = field(default_factory=list)  # the target has no such layer
    dropped: dict[str, str] = field(default_factory=dict)  # LoRA keys left out of the output, and why
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def totals(self) -> dict:
        reps = list(self.layers.values())
        n = len(reps)
        sq = sum(r["update_norm"] ** 2 for r in reps)
        lost = sum((r["update_norm"] * r["rel_error"]) ** 2 for r in reps)
        out = {
            "layers": n,
            "update_norm": sq**0.5,
            "kept_energy": 1.0 - lost / sq if sq > 0 else 1.0,
            "passthrough_keys": len(self.passthrough),
            "unmatched_keys": len(self.unmatched),
            "layers_without_drift": len(self.no_drift),
            "layers_missing_in_target": len(self.missing_in_target),
            "dropped_keys": len(self.dropped),
        }
        ent = sum(r.get("entries", 0) for r in reps)
        if ent:
            out["dominant_share"] = sum(r.get("dominant_entries", 0) for r in reps) / ent
            out["arbitrated_share"] = sum(r.get("arbitrated_entries", 0) for r in reps) / ent
        return out

    def to_json(self) -> dict:
        return {
            "casa_lora_version": __version__,
            "method": self.method,
            "method_label": METHOD_LABELS[self.method],
            "config": self.config,
            "totals": self.totals(),
            "layers": self.layers,
            "passthrough": self.passthrough,
            "unmatched": self.unmatched,
            "layers_without_drift": self.no_drift,
            "layers_missing_in_target": self.missing_in_target,
            "dropped": self.dropped,
            "warnings": self.warnings,
        }


def start_report(lora, cfg: TransferConfig, strength: float) -> "TransferReport":
    """An empty report for transferring ``lora``, listing its pass-through and unmatched keys."""
    report = TransferReport(cfg.method, config_dict(cfg, strength))
    report.passthrough = sorted(lora.passthrough)
    report.unmatched = list(lora.unmatched)
    report.dropped = dict(getattr(lora, "dropped", {}))
    return report


#: more than this share of a LoRA's layers without a place to go fails the transfer
MOSTLY = 0.5


def check_coverage(lora, drift: TargetDrift | None, *, source: str, target: str, source_naming: str = "",
                   target_naming: str = "", not_landed: list[str] | None = None,
                   target_layers=None) -> list[str]:
    """Where the LoRA's layers go: raise a CasaError when most of them have no place (they match no
    layer of the source, the target lacks them, or their patch lands on no key of the model), return
    warnings (one sentence each) when a few do.

    ``source``/``target`` name the files (or the model); ``*_naming`` describe their key namings
    (:func:`casa_core.formats.keys.naming_of`); ``not_landed``: transferred layers whose patch found no
    weight in the model (the node).
    """
    lora_name = Path(str(lora.path)).name
    unmatched = list(getattr(lora, "unmatched_modules", []))
    layers = list(lora.updates)
    if target_layers is not None:
        missing = [n for n in layers if n not in target_layers]
    else:
        missing = [n for n in layers if drift is not None and drift.info.get(n, {}).get("missing")]
    lost = sorted(set(missing) | set(not_landed or []))
    total = len(layers) + len(unmatched)
    bad = len(unmatched) + len(lost)
    if total == 0 or bad == 0:
        return []
    src = f"{source}" + (f" ({source_naming})" if source_naming else "")
    tgt = f"{target}" + (f" ({target_naming})" if target_naming else "")
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} match no layer of the base model {src} (e.g. {unmatched[0]})")
    if missing:
        parts.append(f"{len(missing)} are layers of the base that the target {tgt} does not have (e.g. {missing[0]})")
    extra = sorted(set(not_landed or []) - set(missing))
    if extra:
        parts.append(f"{len(extra)} found no weight to patch in the target {tgt} (e.g. {extra[0]})")
    what = "; ".join(parts)
    if bad > MOSTLY * total:
        raise CasaError(f"{lora_name}: {bad} of its {total} layers cannot be transferred — {what}; the files use "
                        f"namings that do not correspond, or are for different models", file=str(lora.path))
    return [f"{lora_name}: {bad} of its {total} layers were left out — {what}"]


def config_dict(cfg: TransferConfig, strength: float) -> dict:
    p, o = cfg.params, cfg.output
    return {
        "method": cfg.method,
        "strength": strength,
        "tau": p.tau,
        "q_dom": p.q_dom,
        "q_act": p.q_act,
        "energy": p.energy,
        "injection": o.mode,
        "rank": o.rank,
        "kept_energy_target": o.energy,
        "max_rank": o.max_rank,
    }


def _lora_factors(upd) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(left, right)`` of an update: a LoRA's ``(up * scale, down)``, a dense delta and None."""
    if hasattr(upd, "up"):
        return upd.up.float() * float(upd.scale), upd.down.float()
    return upd.delta.float(), None


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
    dev = torch.device(cfg.device)
    total = len(names)
    for i, name in enumerate(names):
        upd = lora.updates[name]
        left, right = _lora_factors(upd)
        rep: dict = {"shape": list(left.shape[:1]) + [int((right if right is not None else left).shape[1])]}
        rep["lora_rank"] = int(left.shape[1]) if right is not None else None
        summary = None
        if method == "direct":
            out = realize_direct(left, right, cfg.output)
        else:
            b = basis.layer(name, dev)
            d = drift.layer(name, b, dev)
            info = drift.info[name]
            if info.get("missing"):
                report.missing_in_target.append(name)
            elif info["mode"] == "zero":
                report.no_drift.append(name)
            if "noise" in info:
                rep["drift_snr"] = info["noise"]["snr"]
                rep["target_storage"] = info["noise"].get("storage")
            coords = L.coordinates(b, d, left.to(dev), right.to(dev) if right is not None else None)
            if method == "prolora":
                cu = prolora_layer(coords, cfg.params)
            else:
                cu = casa_layer(coords, cfg.params, method, summary=cfg.routing_data)
                summary = cu.summary
            rep.update(cu.stats)
            out = realize(coords, cu, cfg.output)
            rep["drift_norm"] = float(drift.info[name].get("norm", 0.0))
        rep["lora_norm"] = float(
            torch.linalg.matrix_norm(left @ right if right is not None else left)
        )
        rep.update({"update_norm": out.norm, "rel_error": out.rel_error, "out_rank": out.rank, "kind": out.kind})
        report.layers[name] = rep
        if progress is not None:
            progress(i + 1, total, name)
        yield LayerResult(name, LayerOutput(out.kind, tuple(t.cpu() for t in out.tensors), out.rank, out.rel_error, out.norm), rep, summary)


def provenance(lora, basis: SourceBasis | None, drift: TargetDrift | None, cfg: TransferConfig, strength: float) -> dict[str, str]:
    """Safetensors metadata describing where a transferred LoRA comes from."""
    meta = {
        "casa_lora.version": __version__,
        "casa_lora.method": cfg.method,
        "casa_lora.config": json.dumps(config_dict(cfg, strength), sort_keys=True),
        "casa_lora.lora": f"{Path(str(lora.path)).name} ({lora.identity()})",
    }
    if basis is not None:
        meta["casa_lora.source"] = basis.source_identity
    if drift is not None:
        meta["casa_lora.target"] = drift.identity
        meta["casa_lora.target_description"] = drift.description
    return meta


def run_transfer_to_file(
    lora, basis, drift, cfg: TransferConfig, strength: float, out_path: str | Path,
    *, dtype: torch.dtype = torch.float16, progress: Progress | None = None,
    summaries: dict | None = None,
) -> TransferReport:
    """Transfer and write a ComfyUI-loadable LoRA file (atomically)."""
    from .formats.keys import comfy_key
    from .formats.lora_write import write_comfy_lora

    t0 = time.perf_counter()
    report = start_report(lora, cfg, strength)
    if summaries is None and cfg.routing_data:
        # the heatmaps' routing data would be thrown away: not computing it changes nothing written
        cfg = replace(cfg, routing_data=False)
    results = iter_transfer(lora, basis, drift, cfg, report, progress)
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
        entries = [(name, "diff", (_shape(lora.updates[name]),)) for name in transfer_order(lora)]
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
    report.seconds = time.perf_counter() - t0
    return report


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
    return sorted(lora.updates, key=_natural_key)


def _shape(upd) -> tuple[int, int]:
    if hasattr(upd, "up"):
        return (int(upd.up.shape[0]), int(upd.down.shape[1]))
    return tuple(int(x) for x in upd.delta.shape)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace("_", ".").split(".")]
