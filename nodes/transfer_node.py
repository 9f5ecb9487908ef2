"""CASATransferLoRA: transfer a base-model LoRA onto the distilled MODEL through the model patcher."""
from __future__ import annotations

import contextlib
import time

import comfy.lora
import folder_paths
import torch
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..casa_core import CASA_DEFAULTS, INJECTION_MENU, METHOD_MENU, OUTPUT_DEFAULTS, CasaError, Transfer, from_inputs
from ..casa_core.drift import noise_summary
from ..casa_core.formats.keys import patch_key, strip_patch_prefix
from ..casa_core.formats.lora import read_lora
from ..casa_core.formats.safetensors_io import file_digest
from ..casa_core.model_probe import ModelProbe
from ..casa_core.pictures import fmt_share, verdict_kind
from ..casa_core.transfer import check_coverage
from .common import (
    CATEGORY,
    DriftType,
    ReportHandle,
    ReportType,
    advanced,
    cache_dir,
    compute_device,
    progress_callback,
    safetensors_files,
    summary_ui,
)
from .model_weights import ComfyModelWeights, applied_loras, mark_own_patches

D = CASA_DEFAULTS


def model_key_map(model) -> tuple[dict[str, str], frozenset[str]]:
    """The model's own naming: ComfyUI's LoRA key map as ``{LoRA module name: canonical layer}`` and the
    model's parameter names without the ``diffusion_model.`` prefix."""
    keys = frozenset(k for k in map(strip_patch_prefix, model.model.state_dict()) if k is not None)
    aliases = {}
    for lora_key, model_key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        bare = strip_patch_prefix(model_key) if isinstance(model_key, str) else None
        if bare is not None and bare.endswith(".weight"):
            aliases[lora_key] = bare[:-len(".weight")]
    return aliases, keys


def _exact_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its weights' dtype unless they are stored in fp8)."""
    dm = model.model
    dtype = getattr(dm, "manual_cast_dtype", None) or dm.get_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


class CASATransferLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CASATransferLoRA",
            display_name="CASA Transfer LoRA",
            category=CATEGORY,
            description=(
                "Applies a LoRA trained on the base model to the distilled model so that it keeps its "
                "style without breaking the picture. Returns a patched copy of the model (the input "
                "model is untouched) and a report for the heatmap and the LoRA saver."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The distilled model to apply the LoRA to: the same one "
                               "connected to CASA Compute Drift. Do not also load the LoRA with a normal LoRA "
                               "loader: this node applies it."),
                DriftType.Input("drift", tooltip="From CASA Compute Drift."),
                io.Combo.Input("lora_name", options=safetensors_files("loras"),
                               tooltip="Your LoRA, trained on the BASE model (any trainer's format: musubi/kohya, "
                               "diffusion-pipe, ai-toolkit, diffusers/PEFT, DiffSynth, VideoX-Fun)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="LoRA strength, as on a normal LoRA loader. It is applied before the "
                               "transfer (CASA decides what to keep at this strength), so set it here rather "
                               "than on a later loader."),
                io.Combo.Input("method", options=list(METHOD_MENU), default="CASA",
                               tooltip="CASA: keep the LoRA where distillation changed little, protect the "
                               "distilled model's strong directions, and where both push the same way keep only "
                               "the stronger. Leave at CASA unless you want to compare: the two 'CASA ... only' "
                               "ablations, ProLoRA (an earlier method) and 'direct reuse' (what a normal LoRA "
                               "loader does)."),
                io.Float.Input("tau", default=D.tau, min=0.0001, max=100.0, step=0.05,
                               tooltip="How easily the LoRA's directions are grouped into clusters: lower makes "
                               "fewer, bigger clusters. Leave at 0.5 (the CASA authors' default) unless the "
                               "heatmap shows a single huge cluster (raise it) or only tiny ones (lower it).",
                               **advanced()),
                io.Float.Input("q_dom", default=D.q_dom, min=0.0, max=1.0, step=0.01,
                               tooltip="Which of the distilled model's strong directions CASA protects: its clusters "
                               "are ranked by how much distillation changed them, and those from this point of the "
                               "ranking up are protected (0.5: the stronger half). Lower protects more. Leave at 0.5 "
                               "(the paper recommends 0.45-0.55) unless the transferred LoRA breaks the fast model's "
                               "pictures: then lower it a little.", **advanced()),
                io.Float.Input("q_act", default=D.q_act, min=0.0, max=1.0, step=0.01,
                               tooltip="Inside the protected directions, where the LoRA and the distillation push "
                               "the same way, the strongest of those spots keep only the stronger of the two pushes, "
                               "so the effect is not counted twice: 0.85 does this for the strongest 15 %. Leave at "
                               "0.85 unless the LoRA's effect looks doubled or burnt (lower it).", **advanced()),
                io.Float.Input("energy", default=D.energy, min=0.01, max=1.0, step=0.01,
                               tooltip="How many of a layer's main directions CASA groups into clusters (square "
                               "layers): the fewest that together make up this share of the layer's weight (0.9: 90 "
                               "%, counted in squared size). Leave at 0.9 (the CASA authors' default) unless you are "
                               "reproducing another setting.", **advanced()),
                io.Combo.Input("injection", options=list(INJECTION_MENU), default="low-rank",
                               tooltip="low-rank: a LoRA-sized patch (little memory; the summary says how much of "
                               "the update it keeps). exact: the full update as a weight difference, as much "
                               "memory as the model's linear weights. Leave at low-rank unless the summary "
                               "reports that the patch keeps too little and raising rank does not help."),
                io.Int.Input("rank", default=OUTPUT_DEFAULTS.rank, min=1, max=4096, step=1,
                             tooltip="Rank of the low-rank patch (not used by exact). Leave at 128 unless the "
                             "summary says the patch keeps less than about 90 % of the update (raise it) or "
                             "memory is short (lower it)."),
                io.Float.Input("kept_energy", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 uses rank. Above 0, each layer gets the smallest rank (up to 512) whose "
                               "patch keeps this share of the layer's update (counted in squared size), e.g. 0.95. "
                               "Leave at 0 unless layers differ a lot in how much rank 128 keeps.", **advanced()),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                ReportType.Output(display_name="report"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **widgets):
        """The LoRA file's content (digest memoised by size and mtime): a LoRA rewritten under the same
        name is transferred again instead of being served from ComfyUI's cache. The other inputs are
        ComfyUI's own concern (links: their nodes; widgets: compared by value)."""
        path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
        try:
            return ("lora", lora_name, file_digest(path, cache_dir()))
        except (TypeError, OSError):
            return ("lora", lora_name, None)

    @classmethod
    def execute(cls, model, drift, lora_name, strength, method, tau, q_dom, q_act, energy, injection,
                rank, kept_energy) -> io.NodeOutput:
        t0 = time.perf_counter()
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        basis = drift.basis.basis
        aliases, model_keys = model_key_map(model)
        lora = read_lora(path, basis.layers, strength=strength, memo_dir=cache_dir(), aliases=aliases,
                         model_keys=model_keys)
        # every layer must have a place to go: fail before computing when most have none
        not_landed = [n for n in lora.updates if f"{n}.weight" not in model_keys]
        warnings = check_coverage(lora, drift.drift, source=drift.basis.name, target="the connected MODEL",
                                  source_naming=getattr(drift.basis.source, "naming", ""),
                                  not_landed=not_landed)
        probe = drift.drift.probe()
        if probe is not None:  # the MODEL here must be the one the drift measured
            weights = ComfyModelWeights(model)
            off = probe.compare(weights.without_own, lambda n: n in weights.layers)
            if off is not None:
                warnings.append(ModelProbe.describe(off))
        earlier = applied_loras(model).get(lora.digest())
        if earlier is not None:
            warnings.append(f"{lora_name} was already transferred onto this MODEL by an earlier CASA Transfer LoRA"
                            + (f" (as {earlier})" if earlier != lora_name else "") + ": it now applies twice; "
                            "chain each LoRA once (for more of it, raise its strength)")
        cfg = from_inputs(method, tau=tau, q_dom=q_dom, q_act=q_act, energy=energy, injection=injection, rank=rank,
                          kept_energy=kept_energy, device=compute_device())
        transfer = Transfer(lora, basis, drift.drift, cfg, strength, progress_callback(len(lora.updates)))
        report = transfer.report
        passthrough = lora.passthrough_at_strength()
        handle = ReportHandle(report, lora_name, strength, transfer.provenance(), passthrough=passthrough)
        dtype = _exact_dtype(model)
        patches = {}
        with contextlib.closing(iter(transfer)) as layers:  # layers still running are waited for on any exit
            for res in layers:
                out = res.output
                handle.outputs[res.layer] = out
                if res.summary is not None:
                    handle.summaries[res.layer] = res.summary
                if out.norm == 0:  # nothing to patch (a layer the LoRA leaves as it is)
                    continue
                if out.kind == "diff":
                    out.tensors = (out.tensors[0].to(dtype),)
                    patches[patch_key(res.layer)] = ("diff", out.tensors)
                else:
                    up, down = out.tensors
                    patches[patch_key(res.layer)] = LoRAAdapter(set(), (up, down, None, None, None, None))
        patched = model.clone()
        before = {k: len(v) for k, v in patched.patches.items()}
        added = set(patched.add_patches(patches, 1.0))
        missing = sorted(set(patches) - added)
        if patches and not added:
            raise CasaError(f"{lora_name}: none of its {len(patches)} transferred layers has a weight to patch in the "
                            f"connected MODEL (e.g. {next(iter(patches))})", file=path)
        if passthrough:
            key_map = comfy.lora.model_lora_keys_unet(patched.model, {})
            patched.add_patches(comfy.lora.load_lora(passthrough, key_map), 1.0)
        mark_own_patches(patched, before, lora.digest(), lora_name)  # a transfer chained after this one still
        # sees the measured model, and knows this LoRA is on it
        report.warnings = warnings  # logged once, with the node's name, by summary_ui
        report.seconds = time.perf_counter() - t0
        text, warnings = _summary(handle, method, injection, rank, q_act, missing, drift.drift)
        return io.NodeOutput(patched, handle, ui=summary_ui("CASA Transfer LoRA", text, warnings))


def _summary(h: ReportHandle, method: str, injection: str, rank: int, q_act: float,
             missing: list[str], drift=None) -> tuple[str, list[str]]:
    """The node's summary in plain words, and its warnings."""
    t = h.report.totals()
    held = sum(x.numel() * x.element_size() for out in h.outputs.values() for x in out.tensors)
    lines = [(f"{method} transfer of {h.lora_name} at strength {h.strength:g}: {t['layers']} layers in "
              f"{h.report.seconds:.1f} s")]
    warnings = []
    if "dominant_share" in t:
        layers = h.report.layers.values()
        lines.append(f"What CASA did with the LoRA's routing entries: restored {fmt_share(1 - t['dominant_share'])}, "
                     f"preserved {fmt_share(t['dominant_share'] - t['arbitrated_share'])}, arbitrated "
                     f"{fmt_share(t['arbitrated_share'])}")
        routed = [r.routing for r in layers if r.routing is not None]
        ent = sum(r.entries for r in routed)
        cand = sum(r.candidates for r in routed)
        if ent and cand:
            lines.append(f"(as q_act {q_act:g} asks: the top {fmt_share(1 - q_act)} of the {fmt_share(cand / ent)} "
                         "where both push the same way in protected directions; expected)")
        kinds = [verdict_kind(r) for r in layers]
        parts = [(kinds.count("little") + kinds.count("unchanged"),
                  "barely moved by distillation (LoRA kept nearly as trained)"), (kinds.count("similar"), "similar in size"),
                 (kinds.count("larger"), "changed far more by distillation than by the LoRA (protected)"),
                 (kinds.count("no_lora"), "not changed by the LoRA (left as they are)"),
                 (kinds.count("unknown"), "without a drift to compare the LoRA with")]
        if any(n for n, _ in parts):
            lines.append("Layers: " + ", ".join(f"{n} {what}" for n, what in parts if n))
    patch = f"the low-rank patch (rank {rank})" if injection == "low-rank" else "the exact update"
    kept = f"keeps {fmt_share(t['kept_energy'])} of the update" if t["update_norm"] > 0 else "is zero in every layer"
    lines.append(f"{patch[0].upper()}{patch[1:]} {kept} and holds {held / 2**20:.1f} MiB")
    if injection == "low-rank" and t["kept_energy"] < 0.9:
        warnings.append(f"the low-rank patch keeps only {fmt_share(t['kept_energy'])} of the update: raise rank "
                        "(or set kept_energy, or use exact injection)")
    if h.report.no_drift:
        lost = drift.lost_in_noise(h.report.no_drift) if drift is not None else []
        if len(lost) < len(h.report.no_drift):
            lines.append(f"{len(h.report.no_drift) - len(lost)} layer(s) identical in both models: the LoRA applies "
                         f"there as trained")
        if lost:
            lines.append(f"{len(lost)} layer(s) whose drift does not stand out from the storage noise (estimated "
                         f"as zero, e.g. {lost[0]}): the LoRA applies there as trained")
    if h.report.missing_in_target:
        warnings.append(f"{len(h.report.missing_in_target)} layer(s) missing from the target model, e.g. "
                        f"{h.report.missing_in_target[0]}")
    if drift is not None:
        for line in noise_summary(drift, "the target", layers=h.report.layers):
            if line.startswith("WARNING: "):
                warnings.append(line[len("WARNING: "):])
            else:
                lines.append(line)
    if h.report.passthrough:
        lines.append(f"{len(h.report.passthrough)} non-low-rank key(s) carried through unchanged")
    if missing:
        warnings.append(f"{len(missing)} layer(s) of the transfer were not found in the model, e.g. {missing[0]}")
    if h.report.dropped:
        key, why = next(iter(h.report.dropped.items()))
        lines.append(f"{len(h.report.dropped)} key(s) left out (ComfyUI cannot load them), e.g. {key}: {why}")
    if h.report.scale_note:
        lines.append(h.report.scale_note)
    warnings += list(h.report.warnings)
    return "\n".join(lines), warnings
