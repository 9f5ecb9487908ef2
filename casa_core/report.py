"""A transfer's report, its totals and its provenance: what the JSON report, the node's summary, the
pictures and a written LoRA's metadata say about a transfer.

* :class:`TransferReport`: per-layer records (``layers``: layer -> its :class:`LayerRecord`, filled by
  :func:`casa_core.transfer.iter_transfer`) and the LoRA's keys that were not transferred;
* :class:`LayerRecord`: one layer's figures (shapes, norms, the patch's rank and error, the method's
  statistics), with the JSON form the report files hold;
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
from .drift import UNMODELLED, DriftEntry
from .errors import CasaError
from .methods import METHOD_LABELS, ProLoRAStats
from .routing import RoutingStats

if TYPE_CHECKING:  # pragma: no cover
    from .basis import SourceBasis
    from .drift import TargetDrift
    from .transfer import TransferConfig


@dataclass(frozen=True)
class LayerRecord:
    """One transferred layer in a report.

    ``shape``: the layer's ``out x in``; ``lora_rank``: the LoRA's rank there (None: it carries a full
    difference); ``lora_norm`` / ``update_norm``: Frobenius norms of the LoRA's update and of the
    transferred one; ``rel_error``: the written patch's relative error against that update, ``out_rank``
    its rank, ``kind`` ``"lowrank"`` or ``"diff"``; ``drift_norm``: ``||W_t - W_s||_F`` (None for direct
    reuse, which reads no drift); ``drift_snr`` / ``target_storage``: drift/noise ratio and storage of a
    target stored on a coarse grid (None otherwise; a lossy storage without a noise model has a storage and
    no SNR); ``stats``: the method's (CASA's :class:`RoutingStats`,
    ProLoRA's :class:`ProLoRAStats`, None for direct reuse)."""

    shape: tuple[int, int]
    lora_rank: int | None
    lora_norm: float
    update_norm: float
    rel_error: float
    out_rank: int
    kind: str
    drift_norm: float | None = None
    drift_snr: float | None = None
    target_storage: str | None = None
    stats: RoutingStats | ProLoRAStats | None = None

    @property
    def routing(self) -> RoutingStats | None:
        """CASA's routing counts, None for the other methods."""
        return self.stats if isinstance(self.stats, RoutingStats) else None

    def to_json(self) -> dict:
        """The report file's form: keys only where the method has them (no drift keys for direct reuse,
        no noise keys on a target without storage noise, the method's statistics inline)."""
        out: dict = {"shape": list(self.shape), "lora_rank": self.lora_rank}
        if self.drift_snr is not None:
            out["drift_snr"] = self.drift_snr
        if self.target_storage is not None:  # also a lossy storage without a noise model (and no SNR)
            out["target_storage"] = self.target_storage
        if self.stats is not None:
            out.update(self.stats.to_json())
        if self.drift_norm is not None:
            out["drift_norm"] = self.drift_norm
        out.update({"lora_norm": self.lora_norm, "update_norm": self.update_norm, "rel_error": self.rel_error,
                    "out_rank": self.out_rank, "kind": self.kind})
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "LayerRecord":
        stats = (RoutingStats.from_json(data) if "clusters" in data
                 else ProLoRAStats.from_json(data) if "phi_left" in data else None)
        return cls(tuple(data["shape"]), data["lora_rank"], data["lora_norm"], data["update_norm"],
                   data["rel_error"], data["out_rank"], data["kind"], data.get("drift_norm"), data.get("drift_snr"),
                   data.get("target_storage"), stats)


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


def layer_totals(layers: Mapping[str, LayerRecord | dict] | Iterable[LayerRecord | dict]) -> LayerTotals:
    """:class:`LayerTotals` of per-layer records (a report's ``layers``, or their JSON form); routing
    entries count only on layers with routing statistics."""
    reps = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    reps = [r if isinstance(r, LayerRecord) else LayerRecord.from_json(r) for r in reps]
    sq = sum(r.update_norm ** 2 for r in reps)
    lost = sum((r.update_norm * r.rel_error) ** 2 for r in reps)
    kept = 1.0 - lost / sq if sq > 0 else None
    routed = [r.routing for r in reps if r.routing is not None]
    ent = sum(r.entries for r in routed)
    if not ent:
        return LayerTotals(len(reps), sq**0.5, kept)
    return LayerTotals(len(reps), sq**0.5, kept, sum(r.dominant_entries for r in routed) / ent,
                       sum(r.arbitrated_entries for r in routed) / ent)


@dataclass
class TransferReport:
    method: str
    config: dict
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    no_drift: list[str] = field(default_factory=list)  # present in both models, identical weights
    missing_in_target: list[str] = field(default_factory=list)  # the target has no such layer
    dropped: dict[str, str] = field(default_factory=dict)  # LoRA keys left out of the output, and why
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    scale_note: str | None = None  # layers scaled by a PEFT configuration ComfyUI's loader ignores

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
            "layers": {name: rec.to_json() for name, rec in self.layers.items()},
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
    note = getattr(lora, "peft_scale_note", None)
    report.scale_note = note() if note is not None else None
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
    far = _far_drift(drift, layers, source, target) + _all_zero(lora, lora_name) + _already_transferred(lora, lora_name)
    if total == 0 or bad == 0:
        return far
    src = f"{source}" + (f" ({source_naming})" if source_naming else "")
    tgt = f"{target}" + (f" ({target_naming})" if target_naming else "")
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} match no layer of the base model {src} (e.g. {unmatched[0]})")
    if missing:
        parts.append(f"{len(missing)} are layers of the base that the target {tgt} does not have (e.g. {missing[0]}; "
                     f"written as the LoRA has them)")
    extra = sorted(set(not_landed or []) - set(missing))
    if extra:
        parts.append(f"{len(extra)} found no weight to patch in the target {tgt} (e.g. {extra[0]})")
    what = "; ".join(parts)
    if bad > MOSTLY * total:
        raise CasaError(f"{lora_name}: {bad} of its {total} layers cannot be transferred — {what}; the files use "
                        f"namings that do not correspond, or are for different models", file=str(lora.path))
    return [f"{lora_name}: {bad} of its {total} layers could not be transferred — {what}"] + far


def _already_transferred(lora, lora_name: str) -> list[str]:
    """A warning when the LoRA is itself one casa-lora wrote (its provenance metadata): it is fitted to a
    distilled model already, and a second transfer moves it twice."""
    meta = getattr(lora, "metadata", None) or {}
    if "casa_lora.method" not in meta:
        return []
    made_from = str(meta.get("casa_lora.lora", "")).split(" (")[0] or "another LoRA"
    onto = meta.get("casa_lora.target_description", "")
    return [f"{lora_name} is itself a transfer casa-lora made ({meta['casa_lora.method']} of {made_from}"
            + (f", for {onto}" if onto else "") + "): transferring it again moves it twice. Transfer the LoRA "
            "trained on the base model, or load this one as it is with a LoRA loader"]


def _all_zero(lora, lora_name: str) -> list[str]:
    """A warning when every update of the LoRA is exactly zero (a LoRA saved before training: its up
    factors start at zero; alpha 0; or strength 0): there is nothing to transfer, and every method leaves such
    layers as they are (:func:`casa_core.transfer._transfer_layer`)."""
    updates = list(getattr(lora, "updates", {}).values())
    if not updates or getattr(lora, "passthrough", None):
        return []
    for u in updates:
        left, right = u.factors()
        if bool(left.any()) and (right is None or bool(right.any())):
            return []
    if getattr(lora, "strength", 1.0) == 0:
        why = "at strength 0"
    elif all(getattr(u, "alpha", None) == 0 for u in updates):
        why = "its alpha is 0 in every layer, which scales the update to zero"
    else:
        why = "an untrained LoRA? its up (or down) factors are all zero"
    return [f"{lora_name}: its update is zero in every one of its {len(updates)} layers ({why}): there is nothing "
            f"of it to transfer, and every method leaves the model as it is"]


#: a median drift above this share of the base weight's norm is no distillation's (they move weights by a
#: few per cent at most): the target is another model, another Wan2.2 expert, or a heavy fine-tune
FAR_DRIFT = 0.10


def _far_drift(drift: TargetDrift | None, layers: list[str], source: str, target: str) -> list[str]:
    """A warning when the target is far from the base: the median relative drift of the LoRA's layers (the
    drift's norm over the base weight's, recorded in the drift cache) above :data:`FAR_DRIFT`."""
    if drift is None:
        return []
    # (a lossy storage without a noise model holds its rounding in the drift: not a measure of the models)
    rel = sorted(drift.info[n]["rel"] for n in layers if n in drift.info and "rel" in drift.info[n]
                 and not any(k in drift.info[n] for k in UNMODELLED.values()))
    median = rel[len(rel) // 2] if rel else 0.0
    if median < FAR_DRIFT:
        return []
    return [f"the target {target} differs from the base {source} by {median:.0%} of the weights' norm "
            f"(median over the LoRA's layers), far more than a distillation moves them: check that it is a "
            f"distilled version of this base (for Wan2.2 A14B: the same expert, high-noise or low-noise)"]


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
