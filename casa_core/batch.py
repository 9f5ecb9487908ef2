"""Several LoRAs against one basis and drift (``casa-lora transfer --lora a.safetensors b/ …``).

The command line's batch part, kept apart from the single transfer:

* :func:`expand_loras`: the ``--lora`` arguments (files or folders of ``*.safetensors``) as a list of
  files, each named once;
* :func:`plan_jobs`: one :class:`Job` per LoRA and method with its output path;
* :func:`check_and_resume`: every LoRA read once against the base model's layer shapes *before* any long
  computation, so a mistyped path or a LoRA for another model size is reported at once;
* :func:`finished`: whether an output already exists and was made from the same inputs and settings
  (its provenance metadata, :func:`casa_core.transfer.provenance`, says so). Outputs are written
  atomically (``<path>.partial-<pid>`` renamed when complete), so a file at the output path is whole;
  :func:`remove_leftovers` deletes the partial file a killed run left behind;
* :class:`JobLine`: one line per job on the terminal (redrawn while it runs), one plain line per job
  in a log; :func:`batch_table`: the summary at the end.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CasaError
from .formats.safetensors_io import SafeTensorsFile
from .formats.sharded import model_files
from .methods import METHOD_LABELS


@dataclass
class Job:
    lora: Path
    method: str
    out: Path
    status: str = "pending"  # pending, skipped, written, failed
    detail: str = ""
    report: object | None = None  # TransferReport once written
    seconds: float = 0.0


@dataclass
class Plan:
    jobs: list[Job]
    batch: bool  # several outputs named after their LoRAs (``--out`` is a folder)
    loras: list[Path] = field(default_factory=list)


def expand_loras(args: list[str]) -> list[Path]:
    """Files as given, folders as their ``*.safetensors`` (sorted, not recursive); each file once."""
    out: list[Path] = []
    seen: set[str] = set()
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted((Path(f) for f in glob.glob(os.path.join(glob.escape(str(p)), "*.safetensors"))
                            if Path(f).is_file()), key=lambda f: f.name.lower())
            if not found:
                raise CasaError(f"{p} is a folder without .safetensors files", file=str(p))
        elif p.exists():
            found = [p]
        else:
            raise CasaError(f"{p} does not exist (--lora takes LoRA files or folders of them)", file=str(p))
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


#: file name extensions of a written LoRA that ComfyUI lists among its models (safetensors, and its short form)
LORA_SUFFIXES = (".safetensors", ".sft")
#: the options of :func:`plan_jobs`'s ``models`` that name a model (which may be shards or a folder)
MODEL_OPTIONS = ("--source", "--target")


def plan_jobs(loras: list[Path], methods: list[str], out: str, models: dict[str, str] | None = None) -> Plan:
    """Output paths: one LoRA keeps today's rule (``--out`` is the file; ``_<method>`` appended with
    several methods). Several LoRAs, or ``--out`` an existing folder or ending in a slash: ``--out`` is
    a folder and each output is named after its LoRA (``<name>.safetensors``, or
    ``<name>_<method>.safetensors`` with several methods)."""
    out_path = Path(out)
    batch = len(loras) > 1 or out_path.is_dir() or out.endswith(("/", os.sep))
    jobs: list[Job] = []
    if not batch:
        for method in methods:
            path = out_path if len(methods) == 1 else out_path.with_name(f"{out_path.stem}_{method}{out_path.suffix}")
            jobs.append(Job(loras[0], method, path))
    else:
        if out_path.suffix == ".safetensors" and not out_path.is_dir():
            raise CasaError(f"--out {out} is a file name, but {len(loras)} LoRAs need a folder for their outputs "
                            "(give a folder; each output is named after its LoRA)", file=out)
        names: dict[str, Path] = {}
        for lora in loras:
            if lora.stem in names:
                raise CasaError(f"{lora} and {names[lora.stem]} have the same name: their outputs in {out} would "
                                "overwrite each other; rename one", file=str(lora))
            names[lora.stem] = lora
            for method in methods:
                name = f"{lora.stem}.safetensors" if len(methods) == 1 else f"{lora.stem}_{method}.safetensors"
                jobs.append(Job(lora, method, out_path / name))
    inputs = {os.path.realpath(p) for p in loras}
    # a model in shards is read from its index and every shard, a model folder from the file it holds
    given = {os.path.realpath(f): opt for opt, p in (models or {}).items() if p is not None
             for f in (model_files(p) if opt in MODEL_OPTIONS else [p])}
    for job in jobs:
        if os.path.realpath(job.out) in inputs:
            raise CasaError(f"the output {job.out} would overwrite an input LoRA; choose another --out",
                            file=str(job.out))
        if os.path.realpath(job.out) in given:
            raise CasaError(f"the output {job.out} would overwrite the {given[os.path.realpath(job.out)]} file; "
                            f"choose another --out", file=str(job.out))
    if not batch and out_path.suffix.lower() not in LORA_SUFFIXES:
        raise CasaError(f"--out {out}: a LoRA file needs the .safetensors extension, or ComfyUI will not list it "
                        f"among its LoRAs (give {out_path.with_name(out_path.name + '.safetensors')}, or end "
                        f"--out with / for a folder)", file=out)
    return Plan(jobs, batch, list(loras))


def check_writable(path: Path, what: str) -> None:
    """Fail at once (CasaError) where ``path`` could not be written after the long computations: its folder
    is made if missing, then a scratch file is created in it and removed."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".casa-check-"):
            pass
    except OSError as e:
        raise CasaError(f"{what} {path} cannot be written: {e.strerror or e} ({folder})", file=str(path)) from None


def check_and_resume(plan: Plan, layer_shapes: dict[str, tuple[int, int]], strength: float, memo_dir,
                     expected, stream=None) -> None:
    """Read every LoRA once against the base model's layers, before any long computation: a file that does
    not exist, cannot be read, is no safetensors file, has no key for a layer of the model or an update of the
    wrong size is reported (CasaError naming the file and the layer) at once. Meanwhile each job whose output
    is already finished (``expected(job, lora)``: the provenance it would write) is marked ``skipped``, and
    partial files of killed runs are removed."""
    from .formats.lora import read_lora

    stream = stream or sys.stderr
    t0 = time.perf_counter()
    for path in plan.loras:
        if not os.access(path, os.R_OK):
            raise CasaError(f"{path} cannot be read (permission denied)", file=str(path))
        lora = read_lora(path, layer_shapes, strength=strength, memo_dir=memo_dir)
        for job in (j for j in plan.jobs if j.lora == path):
            for leftover in remove_leftovers(job.out):
                print(f"removed {leftover}, left unfinished by an earlier run", file=stream)
            done, why = finished(job.out, expected(job, lora))
            if done:
                job.status = "skipped"
            elif why:
                print(why, file=stream)
        del lora
    if len(plan.loras) > 1:
        print(f"checked {len(plan.loras)} LoRAs against the base model in {time.perf_counter() - t0:.1f} s",
              file=stream)


class _BasisStub:
    def __init__(self, source_identity: str):
        self.source_identity = source_identity


class _DriftStub:
    def __init__(self, drift_source):
        self.identity = drift_source.identity()
        self.description = drift_source.describe()


def expected_provenance(job: Job, lora, cfg, strength: float, source, drift_source) -> dict[str, str]:
    """The metadata ``run_transfer_to_file`` would write for this job, known before computing anything:
    the basis and drift caches record ``source.identity()`` and the drift source's identity."""
    from .transfer import provenance

    basis = drift = None
    if job.method != "direct":
        basis, drift = _BasisStub(source.identity()), _DriftStub(drift_source)
    return provenance(lora, basis, drift, cfg, strength)


def finished(path: Path, expected: dict[str, str]) -> tuple[bool, str]:
    """(True, "") when ``path`` holds a transfer with exactly this provenance; else (False, why not)."""
    if not path.exists():
        return False, ""
    try:
        with SafeTensorsFile(path) as f:
            meta = dict(f.metadata)
    except CasaError as exc:
        return False, f"replacing {path}: {exc}"
    # the version may differ; the target's description repeats its path as typed (the identity is its content)
    ignore = {"casa_lora.version", "casa_lora.target_description"}
    differs = sorted(k for k, v in expected.items() if meta.get(k) != v and k not in ignore)
    if not differs:
        return True, ""
    what = ", ".join(k.removeprefix("casa_lora.") for k in differs)
    return False, f"replacing {path}: it was made from other inputs or settings ({what})"


def remove_leftovers(path: Path) -> list[Path]:
    """Delete ``<path>.partial-<pid>`` files of runs that are no longer alive (killed mid-write)."""
    removed = []
    for f in glob.glob(glob.escape(str(path)) + ".partial-*"):
        pid = f.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue  # a run still writing it
        try:
            os.remove(f)
            removed.append(Path(f))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class JobLine:
    """A progress callback for one job: on a terminal one line redrawn in place; in a log nothing until
    :meth:`finish` prints the job's one line."""

    def __init__(self, prefix: str, stream=None):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, item: str) -> None:
        if not self.tty:
            return
        width = 20
        fill = int(width * done / max(total, 1))
        line = f"{self.prefix} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {time.perf_counter() - self.t0:5.1f}s"
        self.stream.write("\r" + line[:118].ljust(118))
        self.stream.flush()

    def finish(self, text: str) -> None:
        self.stream.write(("\r" if self.tty else "") + f"{self.prefix} {text}".ljust(118 if self.tty else 0).rstrip()
                          + "\n")
        self.stream.flush()


def job_prefix(i: int, n: int, job: Job, n_methods: int) -> str:
    width = len(str(n))
    label = job.lora.name if n_methods == 1 else f"{job.lora.name} ({job.method})"
    return f"[{i:>{width}}/{n}] {label}"


def job_result(job: Job) -> str:
    if job.status == "skipped":
        return f"skipped: {job.out} is finished (same inputs and settings)"
    if job.status == "failed":
        return f"FAILED: {job.detail}"
    t = job.report.totals()
    bits = [f"{t['layers']} layers", f"kept {t['kept_energy']:.1%}"]
    if "arbitrated_share" in t:
        bits.append(f"arbitrated {t['arbitrated_share']:.2%}")
    return f"{', '.join(bits)} in {job.seconds:.1f} s -> {job.out}"


def batch_table(jobs: list[Job], stream=None) -> None:
    """LoRA, method, layers, kept energy, dominant and arbitrated shares, time, what happened."""
    stream = stream or sys.stdout
    name_w = max([len(j.lora.name) for j in jobs] + [4])
    head = f"{'LoRA':<{name_w}}  {'method':<22}{'layers':>7}{'kept':>8}{'dominant':>10}{'arbitr.':>9}{'time':>8}  result"
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for j in jobs:
        label = METHOD_LABELS.get(j.method, j.method)[:21]
        if j.report is not None:
            t = j.report.totals()
            dom = f"{t['dominant_share']:.1%}" if "dominant_share" in t else "-"
            arb = f"{t['arbitrated_share']:.2%}" if "arbitrated_share" in t else "-"
            nums = f"{t['layers']:>7}{t['kept_energy']:>8.1%}{dom:>10}{arb:>9}{j.seconds:>7.1f}s"
        else:
            nums = f"{'-':>7}{'-':>8}{'-':>10}{'-':>9}{'-':>8}"
        result = {"written": "written", "skipped": "finished earlier, skipped",
                  "failed": f"failed: {j.detail}", "pending": "not done"}[j.status]
        print(f"{j.lora.name:<{name_w}}  {label:<22}{nums}  {result}", file=stream)
    counts = {s: sum(1 for j in jobs if j.status == s) for s in ("written", "skipped", "failed", "pending")}
    print(f"\n{counts['written']} written, {counts['skipped']} skipped (finished earlier), {counts['failed']} failed"
          + (f", {counts['pending']} not done" if counts["pending"] else ""), file=stream)


def batch_report(jobs: list[Job], extra: dict) -> dict:
    """JSON for ``--report`` in batch mode: per LoRA its outputs and per-method reports."""
    from . import __version__

    loras: dict[str, dict] = {}
    for j in jobs:
        # file names only: a report must not carry local paths
        entry = loras.setdefault(Path(j.lora).name, {"outputs": {}, "methods": {}})
        entry["outputs"][j.method] = {"file": Path(j.out).name, "status": j.status, "detail": j.detail}
        if j.report is not None:
            entry["methods"][j.method] = j.report.to_json()
    return {"casa_lora_version": __version__, **extra, "loras": loras}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
