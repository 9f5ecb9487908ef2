"""A transfer's report, its totals and its provenance: what the JSON report, the node's summary, the
pictures and a written LoRA's metadata say about a transfer.

* :class:`TransferReport`: per-layer statistics (``layers``: layer -> its record, see
  :func:`casa_core.transfer.iter_transfer`) and the LoRA's keys that were not transferred;
* :func:`layer_totals`: the whole-model figures (update norm, energy kept, dominant and arbitrated
  shares), the one rule behind ``TransferReport.totals`` and the overview picture;
* :func:`config_dict` / :func:`provenance`: the request as the report and the file's metadata record it;
* :func:`check_coverage`: whether the LoRA's layers have somewhere to go.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from . import __version__
from .drift import DriftEntry
from .errors import CasaError
from .methods import METHOD_LABELS

if TYPE_CHECKING:  # pragma: no cover
    from .basis import SourceBasis
    from .drift import TargetDrift
    from .transfer import TransferConfig


@dataclass(frozen=True)
class LayerTotals:
    """Whole-model figures over per-layer records. ``kept_energy``: 1 - (lost energy / update energy),
    None when the update has no energy; ``dominant_share`` / ``arbitrated_share``: of all routing entries
    (CASA methods only; None otherwise)."""

    layers: int
    update_norm: float
    kept_energy: float | None
    dominant_share: float | None = None
    arbitrated_share: float | None = None


def layer_totals(layers: Mapping[str, dict] | Iterable[dict]) -> LayerTotals:
    """:class:`LayerTotals` of per-layer records (a report's ``layers``, or their JSON); missing or null
    fields count as zero, and routing entries count only on layers with routing statistics."""
    reps = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    sq = sum((r.get("update_norm") or 0.0) ** 2 for r in reps)
    lost = sum(((r.get("update_norm") or 0.0) * (r.get("rel_error") or 0.0)) ** 2 for r in reps)
    kept = 1.0 - lost / sq if sq > 0 else None
    ent = sum(r.get("entries", 0) or 0 for r in reps if r.get("dominant_entries") is not None)
    if not ent:
        return LayerTotals(len(reps), sq**0.5, kept)
    return LayerTotals(len(reps), sq**0.5, kept, sum(r.get("dominant_entries", 0) for r in reps) / ent,
                       sum(r.get("arbitrated_entries", 0) for r in reps) / ent)


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
        t = layer_totals(self.layers)
        out = {
            "layers": t.layers,
            "update_norm": t.update_norm,
            "kept_energy": t.kept_energy if t.kept_energy is not None else 1.0,
            "passthrough_keys": len(self.passthrough),
            "unmatched_keys": len(self.unmatched),
            "layers_without_drift": len(self.no_drift),
            "layers_missing_in_target": len(self.missing_in_target),
            "dropped_keys": len(self.dropped),
        }
        if t.dominant_share is not None:
            out["dominant_share"] = t.dominant_share
            out["arbitrated_share"] = t.arbitrated_share
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
        missing = [n for n in layers if drift is not None and n in drift.info and DriftEntry.of(drift.info[n]).missing]
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
