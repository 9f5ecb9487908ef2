"""Command line: ``python -m casa_core demo --out DIR`` and ``python -m casa_core transfer …``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .basis import load_or_build_basis
from .drift import LoRADrift, WeightDifference, load_or_build_drift
from .errors import CasaError
from .factorize import INJECTIONS
from .methods import METHOD_LABELS, METHODS
from .request import CASA_DEFAULTS as D
from .request import DTYPES, OUTPUT_DEFAULTS, from_inputs
from .routing_data import RoutingSummary
from .transfer import TransferConfig, run_transfer_to_file

DEFAULT_CACHE = os.environ.get("CASA_CACHE_DIR") or str(Path.home() / ".cache" / "casa-lora")


class Bar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, item: str) -> None:
        now = time.perf_counter()
        if not self.tty and done != total and now - self.last < 5.0:
            return
        self.last = now
        width = 28
        fill = int(width * done / max(total, 1))
        line = f"{self.label:<10} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {now - self.t0:6.1f}s {item[:40]}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def request(a, method: str) -> TransferConfig:
    """The transfer request for ``method`` with the command line's options (:func:`casa_core.from_inputs`)."""
    return from_inputs(method, tau=a.tau, q_dom=a.q_dom, q_act=a.q_act, energy=a.energy, injection=a.injection,
                       rank=a.rank, kept_energy=a.kept_energy, max_rank=a.max_rank, device=a.device)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CASA parameters")
    g.add_argument("--tau", type=float, default=D.tau, help=f"rotation-strength threshold for clusters (default {D.tau})")
    g.add_argument("--q-dom", type=float, default=D.q_dom, help=f"quantile for dominant clusters (default {D.q_dom})")
    g.add_argument("--q-act", type=float, default=D.q_act, help=f"quantile for arbitration (default {D.q_act})")
    g.add_argument("--energy", type=float, default=D.energy, help=f"energy defining k on square layers (default {D.energy})")
    o = p.add_argument_group("output")
    o.add_argument("--injection", choices=INJECTIONS, default="lowrank", help="low-rank LoRA (default) or exact weight difference")
    o.add_argument("--rank", type=int, default=OUTPUT_DEFAULTS.rank,
                   help=f"rank of the low-rank output (default {OUTPUT_DEFAULTS.rank})")
    o.add_argument("--kept-energy", type=float, default=None, help="instead of a rank: share of the update's energy to keep")
    o.add_argument("--max-rank", type=int, default=OUTPUT_DEFAULTS.max_rank,
                   help=f"rank cap with --kept-energy (default {OUTPUT_DEFAULTS.max_rank})")
    o.add_argument("--dtype", choices=list(DTYPES), default=next(iter(DTYPES)), help="dtype of the written LoRA")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"basis/drift cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--device", default="cpu", help="torch device for the computation (default cpu)")


def summary_table(reports: dict, stream=None) -> None:
    stream = stream or sys.stdout
    head = f"{'method':<34}{'layers':>7}{'kept':>8}{'dominant':>10}{'arbitr.':>9}{'time':>8}"
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for method, rep in reports.items():
        t = rep.totals()
        dom = f"{t['dominant_share']:.1%}" if "dominant_share" in t else "-"
        arb = f"{t['arbitrated_share']:.2%}" if "arbitrated_share" in t else "-"
        kept = f"{t['kept_energy']:.1%}" if t["update_norm"] > 0 else "—"  # a zero update keeps nothing
        print(f"{METHOD_LABELS[method]:<34}{t['layers']:>7}{kept:>8}{dom:>10}{arb:>9}{rep.seconds:>7.1f}s", file=stream)


def _write_report(path: Path, reports: dict, extra: dict) -> None:
    data = {"casa_lora_version": __version__, **extra, "methods": {m: r.to_json() for m, r in reports.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _write_heatmaps(out_dir: Path, summaries: dict[str, RoutingSummary], report=None, scale: float = 2.0) -> list[Path]:
    """The demo's pictures: the whole-model overview and each interesting layer (the most arbitrated,
    the largest dominant region, the least energy kept), as PNG files at print resolution.

    ``report`` (a TransferReport or its JSON) gives the per-layer records (shape, k, shares); without
    it the CASA report the demo has just written to ``out_dir/report.json`` is read.
    """
    from .pictures import auto_layer, interesting_layers, layer_figure, overview_figure, write_png
    from .report import LayerRecord

    if not summaries:
        return []
    if report is None and (out_dir / "report.json").exists():
        report = json.loads((out_dir / "report.json").read_text()).get("methods", {}).get("casa")
    if isinstance(report, dict):  # the JSON form
        layers = {name: LayerRecord.from_json(r) for name, r in report.get("layers", {}).items()}
        config = report.get("config")
    else:
        layers = dict(report.layers) if report is not None else {}
        config = report.config if report is not None else None
    written = []
    picks = interesting_layers({n: s for n, s in layers.items() if n in summaries}) if layers else {}
    chosen = [auto_layer(layers, summaries) or next(iter(summaries))]
    for key in ("arbitrated", "dominant", "kept"):
        for name, _ in picks.get(key, [])[:1]:
            if name not in chosen:
                chosen.append(name)
    tag = {"Software": f"casa-lora {__version__}"}
    if layers:
        fig = overview_figure(layers, selected=chosen[0], scale=scale)
        p = out_dir / "heatmap_overview.png"
        write_png(p, fig.rgb, {**tag, "Title": "CASA transfer overview"})
        written.append(p)
    for name in chosen:
        fig = layer_figure(summaries[name], name, layers.get(name), config, scale=scale)
        p = out_dir / f"heatmap_{name.replace('.', '_')}.png"
        write_png(p, fig.rgb, {**tag, "Title": f"CASA routing of {name}"})
        written.append(p)
    return written


def _inputs(source, target, lora) -> dict:
    """The report's record of its input files: names only (a shared report must not carry local paths)."""
    return {"source": Path(source).name, "target": Path(target).name, "lora": Path(lora).name}


def cmd_demo(a) -> int:
    from . import synth
    from .formats.checkpoint import Checkpoint
    from .formats.lora import read_lora
    from .formats.safetensors_io import write_file

    out = Path(a.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    shape = synth.WanShape(dim=a.dim, ffn_dim=a.ffn_dim, blocks=a.blocks)
    print(f"casa-lora {__version__} demo: Wan-shaped trio, dim {shape.dim}, ffn {shape.ffn_dim}, {shape.blocks} blocks", file=sys.stderr)
    base, svd = synth.wan_state_dict(shape, seed=0)
    paths = {"base": out / "models" / "wan_base.safetensors", "distilled": out / "models" / "wan_distilled.safetensors",
             "lora": out / "loras" / "style_lora.safetensors"}
    write_file(str(paths["base"]), base)
    write_file(str(paths["distilled"]), synth.distill(base, svd, rel_drift=a.drift))
    write_file(str(paths["lora"]), synth.style_lora(svd))
    cache = out / "cache"
    source, target = Checkpoint(paths["base"], memo_dir=cache), Checkpoint(paths["distilled"], memo_dir=cache)
    basis = load_or_build_basis(source, cache, device=a.device, progress=Bar("basis"))
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=a.device, progress=Bar("drift"))
    lora = read_lora(paths["lora"], basis.layers, strength=1.0)
    reports, summaries = {}, {}
    for method in METHODS:
        cfg = request(a, method)
        reports[method] = run_transfer_to_file(
            lora, basis, drift, cfg, 1.0, out / "loras" / f"transferred_{method}.safetensors",
            progress=Bar(method[:10]), summaries=summaries if method == "casa" else None,
        )
    _write_report(out / "report.json", reports, _inputs(paths["base"], paths["distilled"], paths["lora"]))
    pngs = _write_heatmaps(out, summaries, reports["casa"])
    print()
    summary_table(reports)
    print(f"\nfiles in {out}: models/, loras/transferred_<method>.safetensors, report.json, " + ", ".join(p.name for p in pngs))
    return 0


def _drift_source(a, source, target, cache: Path):
    """What the drift is measured from: a distilled checkpoint (safetensors or GGUF, opened) or a
    distillation LoRA (read, not computed)."""
    from .formats.lora import read_lora

    if target is not None:
        return WeightDifference(source, target)
    return LoRADrift(read_lora(a.distill_lora, source.layers, strength=a.distill_strength, memo_dir=cache,
                               model_keys=source.param_names), source)


def _check_target_shapes(source, dsrc) -> None:
    """A distilled checkpoint's layers must have the base's shapes (checked on the headers, before the SVD)."""
    target = getattr(dsrc, "target", None)
    layers = getattr(target, "layers", None)
    if not isinstance(layers, dict):
        return
    for name, shape in source.layers.items():
        got = layers.get(name)
        if got is not None and tuple(got) != tuple(shape):
            raise CasaError(f"{getattr(target, 'path', target)}, layer {name}: the target weight is {got[0]}x{got[1]} "
                            f"but the base's is {shape[0]}x{shape[1]} — the two models are not the same architecture",
                            file=str(getattr(target, "path", "")), layer=name)


def cmd_transfer(a) -> int:
    from . import batch as B
    from .drift import noise_summary
    from .formats.checkpoint import open_model
    from .formats.lora import read_lora
    from .transfer import check_coverage

    cache = Path(a.cache_dir)
    if (a.target is None) == (a.distill_lora is None):
        raise CasaError("give exactly one of --target (a distilled checkpoint) or --distill-lora (a distillation LoRA)")
    methods = a.method
    # fail fast: every input file is opened and checked before the long computations start
    loras = B.expand_loras(a.lora)
    plan = B.plan_jobs(loras, methods, a.out,
                       {"--source": a.source, "--target": a.target, "--distill-lora": a.distill_lora,
                        "--report": a.report})
    for job in plan.jobs:
        B.check_writable(job.out, "the output")
    if a.report:
        B.check_writable(Path(a.report), "the report")
    source = open_model(a.source, memo_dir=cache)
    target = open_model(a.target, memo_dir=cache) if a.target is not None else None
    dsrc = None
    if any(m != "direct" for m in methods):
        dsrc = _drift_source(a, source, target, cache)
        _check_target_shapes(source, dsrc)
    dtype = DTYPES[a.dtype]
    cfgs = {m: request(a, m) for m in methods}
    # every LoRA checked against the base's layers; outputs already made from the same inputs and settings kept
    B.check_and_resume(plan, source.layers, a.strength, cache, lambda job, lora: B.expected_provenance(
        job, lora, cfgs[job.method], a.strength, source, dsrc))
    pending = [j for j in plan.jobs if j.status == "pending"]
    basis = drift = None
    if any(j.method != "direct" for j in pending):
        basis = load_or_build_basis(source, cache, device=a.device, progress=Bar("basis"))
        drift = load_or_build_drift(basis, dsrc, cache, device=a.device, progress=Bar("drift"))
    if plan.batch:
        return _run_batch(a, plan, source, basis, drift, cfgs, dtype, cache)
    lora = read_lora(loras[0], source.layers, strength=a.strength, memo_dir=cache, model_keys=source.param_names)
    # where the LoRA's layers go: most of them nowhere is an error (exit 2), a few a warning
    warnings = check_coverage(
        lora, drift, source=Path(a.source).name, target=Path(a.target or a.distill_lora).name,
        source_naming=source.naming, target_naming=getattr(target, "naming", "distillation LoRA"),
        target_layers=target.layers if target is not None and drift is None else None)
    reports = {}
    for job in plan.jobs:
        if job.status == "skipped":
            print(f"{job.out} is finished (same inputs and settings): skipped", file=sys.stderr)
            continue
        reports[job.method] = run_transfer_to_file(lora, basis, drift, cfgs[job.method], a.strength, job.out,
                                                   dtype=dtype, progress=Bar(job.method[:10]))
        reports[job.method].warnings = list(warnings)
        print(f"wrote {job.out}", file=sys.stderr)
    if a.report and reports:
        _write_report(Path(a.report), reports, _inputs(a.source, a.target or a.distill_lora, loras[0]))
    if reports:
        print()
        summary_table(reports)
    notes = list(noise_summary(drift, Path(a.target).name)) if drift is not None and a.target else []
    rep = next(iter(reports.values()), None)
    if rep is not None and rep.no_drift:
        lost = drift.lost_in_noise(rep.no_drift) if drift is not None else []
        same = len(rep.no_drift) - len(lost)
        if same:
            notes.append(f"{same} layer(s) have identical weights in both models (LoRA applied as is)")
        if lost:
            notes.append(f"{len(lost)} layer(s) differ, but their drift does not stand out from the target's "
                         f"storage noise and was estimated as zero (LoRA applied as is), e.g. {lost[0]}")
    if lora.unmatched:
        notes.append(f"{len(lora.unmatched)} LoRA key(s) matched no layer and were left out, e.g. {lora.unmatched[0]}")
    if lora.passthrough:
        how = "unchanged" if a.strength == 1.0 else f"at strength {a.strength:g}"
        notes.append(f"{len(lora.passthrough)} non-low-rank key(s) carried through {how}")
    if lora.dropped:
        key, why = next(iter(lora.dropped.items()))
        notes.append(f"{len(lora.dropped)} key(s) ComfyUI cannot load were not written, e.g. {key} ({why})")
    if lora.peft_scale_note():
        notes.append(lora.peft_scale_note())
    notes += [f"WARNING: {w}" for w in warnings]
    if notes:
        print()
    for line in notes:
        print(line)
    return 0


def _run_batch(a, plan, source, basis, drift, cfgs, dtype, cache: Path) -> int:
    """Several LoRAs: one line per LoRA (and method) while they run, a table at the end."""
    from . import batch as B
    from .formats.lora import read_lora

    plan.jobs[0].out.parent.mkdir(parents=True, exist_ok=True)
    n = len(plan.jobs)
    n_methods = len(cfgs)
    warnings = []
    try:
        lora, lora_path = None, None
        for i, job in enumerate(plan.jobs, 1):
            line = B.JobLine(B.job_prefix(i, n, job, n_methods))
            if job.status == "skipped":
                line.finish(B.job_result(job))
                continue
            try:
                if lora_path != job.lora:
                    # the model's own tensor names: keys ComfyUI could not load are dropped, as for one LoRA
                    lora = read_lora(job.lora, source.layers, strength=a.strength, memo_dir=cache,
                                     model_keys=source.param_names)
                    lora_path = job.lora
                    if lora.unmatched:
                        warnings.append(f"{job.lora.name}: {len(lora.unmatched)} LoRA key(s) matched no layer and "
                                        f"were left out, e.g. {lora.unmatched[0]}")
                t0 = time.perf_counter()
                job.report = run_transfer_to_file(lora, basis, drift, cfgs[job.method], a.strength, job.out,
                                                  dtype=dtype, progress=line)
                job.seconds = time.perf_counter() - t0
                job.status = "written"
            except CasaError as exc:
                job.status, job.detail = "failed", str(exc)
            line.finish(B.job_result(job))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        B.batch_table(plan.jobs)
        print("\ninterrupted: the finished outputs are kept; run the same command again to do the rest",
              file=sys.stderr)
        return 130
    finally:
        if a.report:
            B.write_json(Path(a.report), B.batch_report(plan.jobs, {"source": Path(a.source).name,
                                                                    "target": Path(a.target or a.distill_lora).name}))
    print()
    B.batch_table(plan.jobs)
    for w in warnings:
        print(w)
    return 2 if any(j.status == "failed" for j in plan.jobs) else 0


def build_parser() -> argparse.ArgumentParser:
    prog = "casa-lora" if Path(sys.argv[0]).name == "casa-lora" else "python -m casa_core"
    p = argparse.ArgumentParser(prog=prog, description="Transfer a base-model LoRA to a distilled model (CASA, ProLoRA, direct reuse).")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build a small Wan-shaped base/distilled/LoRA trio and transfer with every method")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--dim", type=int, default=256)
    d.add_argument("--ffn-dim", type=int, default=768)
    d.add_argument("--blocks", type=int, default=4)
    d.add_argument("--drift", type=float, default=3e-3, help="relative drift of the distilled model (default 0.003)")
    _add_common(d)
    t = sub.add_parser("transfer", help="transfer a LoRA between real checkpoint files")
    t.add_argument("--source", required=True,
                   help="base model checkpoint (.safetensors, or the *.safetensors.index.json of a model in shards, "
                   "or a folder holding one model)")
    t.add_argument("--target", help="distilled model checkpoint (.safetensors, fp8 included, a shard index or a "
                                    "folder, or .gguf with the optional gguf package)")
    t.add_argument("--distill-lora", help="instead of --target: a distillation LoRA applied to the base (lightx2v, CausVid …)")
    t.add_argument("--distill-strength", type=float, default=1.0, help="strength of --distill-lora (default 1.0)")
    t.add_argument("--lora", required=True, nargs="+",
                   help="the LoRA(s) to transfer: files and/or folders of .safetensors (all against one basis and drift)")
    t.add_argument("--strength", type=float, default=1.0, help="LoRA strength, applied before the transfer (default 1.0)")
    t.add_argument("--method", nargs="+", choices=METHODS, default=["casa"], help="one or more methods (default casa)")
    t.add_argument("--out", required=True,
                   help="output LoRA path (with several methods, _<method> is appended); with several LoRAs a folder, "
                   "each output named after its LoRA. Outputs already made with the same inputs and settings are "
                   "skipped, so an interrupted batch resumes when run again")
    t.add_argument("--report", help="write a JSON report here")
    _add_common(t)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return cmd_demo(a) if a.cmd == "demo" else cmd_transfer(a)
    except CasaError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
