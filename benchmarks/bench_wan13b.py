"""Benchmark of the transfer engine on whole-model synthetic weights with Wan2.1-1.3B and -14B shapes.

    python benchmarks/bench_wan13b.py --out bench_out [--blocks 30] [--blocks-14b 1] [--reference DIR]
                                      [--device cpu|cuda] [--keep]

**1.3B shapes** (``--blocks``, default 30; 0 skips): builds a source and a target checkpoint (bf16,
blocks x {8 attention 1536x1536, ffn.0 8960x1536, ffn.2 1536x8960}) and a rank-32 musubi-style LoRA,
then prints: one-time basis time, one-time drift time, per-LoRA transfer time (cache reads included)
in the low-rank and the exact modes, cache bytes on disk, peak extra RSS during a transfer, the
whole-model figures (30 blocks) scaled from the measured per-block ones, the relative error of the
drift against a float64 computation at drift norms 1e-2, 3e-3 and 1e-3, and today's projection for
Wan2.1-14B shapes (width^3 scaling).

**14B shapes, measured** (``--blocks-14b``, default 1; 0 skips): the same steps on whole blocks of
Wan2.1-14B shapes (8 x 5120x5120, 13824x5120, 5120x13824), extrapolated to the model's 40 blocks from
the measured per-block figures; peak extra RSS of every step; the cost of a warm drift-cache hit (what
the drift node does when the drift is cached: file digests from the memo, the manifests, the spot check
of a few layers and the hash of a rank-64 distillation LoRA's patches) beside what hashing every weight
cost before. One line reads exactly ``14B per-LoRA (measured on 14B shapes, whole model): N s``.

**The reference side by side** (``--reference DIR``, DIR holding the authors' ``transfer.py`` and
``utils.py`` from github Noahwangyuchen/CASA, imported at run time and never copied here; its
``transfer.py`` needs scipy): on ``--reference-blocks`` blocks of the same 1.3B synthetic layers, in
this process, the reference's one-time steps as its examples describe them (a full SVD in float32,
stored in bfloat16; the drift ``U^T (W_t - U S Vh) Vh^T`` with ``W_s`` rebuilt from that SVD, stored in
bfloat16) and its per-layer function ``cluster_aware_spectral_arbitration`` with the conversions its
``transfer_lora`` does; whole-model figures (30 blocks) from per block, plus reading its caches
(timed on a copy written here, warm: a lower bound); the ratios reference / casa-lora for per-LoRA,
basis and drift; and the parity of the updates: the reference run on casa-lora's own basis and drift
(square layers: the same inputs; FFN layers: the reference's full float32 bases, which differ from
casa-lora's completion by design until issue 10 lands), its routing update ``C_new`` taken before its
randomised rank-32 truncation, against casa-lora's exact update.

Each step runs in a fresh process so that its peak RSS is its own (``--in-process``: all in this one,
quicker to start). ``--device cuda`` computes on a GPU
(peak GPU memory is printed too). ``--dims`` / ``--dims-14b`` change the widths (the CPU dry run of
benchmarks/gpu_check.sh uses tiny ones). Figures are printed, never asserted; timings depend on the
machine's load, printed with them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casa_core import layer as L  # noqa: E402
from casa_core.basis import load_or_build_basis  # noqa: E402
from casa_core.drift import (  # noqa: E402
    WeightDifference,
    decode_drift,
    encode_drift,
    load_or_build_drift,
    weight_difference,
)
from casa_core.factorize import OutputSpec, realize  # noqa: E402
from casa_core.fingerprint import feed  # noqa: E402
from casa_core.formats.checkpoint import Checkpoint  # noqa: E402
from casa_core.formats.lora import read_lora  # noqa: E402
from casa_core.formats.safetensors_io import SafeTensorsFile, StreamingWriter, write_file  # noqa: E402
from casa_core.methods import casa_layer  # noqa: E402
from casa_core.routing import CasaParams  # noqa: E402
from casa_core.synth import WAN21_1_3B, WAN21_14B, WanShape  # noqa: E402
from casa_core.transfer import TransferConfig, run_transfer_to_file  # noqa: E402

GIB = 1024**3
SPOT_LAYERS = 4  # as nodes/model_identity.py: layers the drift node compares with the file on a cache hit
DISTILL_RANK_14B = 64  # the distillation LoRA whose patches a warm hit hashes (lightx2v ships rank 64)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples the resident set every 20 ms in a background thread."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def load_average() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def synthetic_weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A weight with a decaying spectrum (columns scaled by (j+1)^-0.5), cheap to make."""
    d = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    d = d[torch.randperm(n, generator=gen)]
    return torch.randn(m, n, generator=gen) * d / math.sqrt(m) * 4.0


def drift_of(w: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    """80 % low-rank (rank 16) + 20 % full-rank noise, scaled to ``rel * ||w||``."""
    m, n = w.shape
    low = torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen)
    noise = torch.randn(m, n, generator=gen)
    d = 0.8 * low / low.norm() + 0.2 * noise / noise.norm()
    return d * (rel * float(w.norm()) / float(d.norm()))


def build_files(out: Path, shape: WanShape, rel_drift: float, lora_rank: int) -> tuple[Path, Path, Path]:
    layers = shape.block_layers()
    entries = [(f"{k}.weight", torch.bfloat16, v) for k, v in layers.items()]
    src, tgt, lora = out / "source.safetensors", out / "target.safetensors", out / "lora.safetensors"
    gen = torch.Generator().manual_seed(0)
    with StreamingWriter(str(src), entries) as ws, StreamingWriter(str(tgt), entries) as wt:
        for name, (m, n) in layers.items():
            w = synthetic_weight(m, n, gen).to(torch.bfloat16)
            ws.write(f"{name}.weight", w)
            wt.write(f"{name}.weight", (w.float() + drift_of(w.float(), rel_drift, gen)).to(torch.bfloat16))
            del w
    lentries = []
    for name, (m, n) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        lentries += [(key + ".lora_down.weight", torch.bfloat16, (lora_rank, n)),
                     (key + ".lora_up.weight", torch.bfloat16, (m, lora_rank)),
                     (key + ".alpha", torch.float32, ())]
    with StreamingWriter(str(lora), lentries) as wl:
        for name, (m, n) in layers.items():
            key = "lora_unet_" + name.replace(".", "_")
            wl.write(key + ".lora_down.weight", torch.randn(lora_rank, n, generator=gen) / math.sqrt(n))
            wl.write(key + ".lora_up.weight", torch.randn(m, lora_rank, generator=gen) * 0.02)
            wl.write(key + ".alpha", torch.tensor(float(lora_rank) / 2))
    return src, tgt, lora


def drift_error_table(shape: WanShape) -> list[dict]:
    """Relative error of the drift as the transfer sees it, against float64, per drift norm."""
    gen = torch.Generator().manual_seed(5)
    rows = []
    samples = {"attention": (shape.dim, shape.dim), "ffn.0": (shape.ffn_dim, shape.dim),
               "ffn.2": (shape.dim, shape.ffn_dim)}
    for label, (m, n) in samples.items():
        ws = synthetic_weight(m, n, gen).to(torch.bfloat16)
        basis32 = L.compute_basis(label, ws.float())
        # what the cache stores: U, V in float16, S in float32
        stored = L.LayerBasis(label, basis32.shape, basis32.U.half().float(), basis32.S, basis32.V.half().float())
        for rel in (1e-2, 3e-3, 1e-3):
            wt = (ws.float() + drift_of(ws.float(), rel, gen)).to(torch.bfloat16)
            d64 = wt.double() - ws.double()
            drift = L.compute_drift(stored, (wt.float() - ws.float()))
            # round-trip the drift through the cache encoding
            tensors, info = encode_drift(drift, "float16")
            cached = decode_drift(label, tensors, info)
            c_f = cached.c_f
            d_ours = L.drift_dense(stored, cached).double()
            err_w = float((d_ours - d64).norm() / d64.norm())
            # routing coordinates against float64 with the float32 basis
            u64, v64 = basis32.U.double(), basis32.V.double()
            dt = d64.T if basis32.transposed else d64
            cf64 = u64.T @ dt @ v64
            err_c = float((c_f.double() - cf64).norm() / cf64.norm())
            # the reference's way: rebuild W_s from a bfloat16 SVD, then subtract
            u_b, s_b, v_b = (t.bfloat16().double() for t in (basis32.U, basis32.S, basis32.V))
            ws_rebuilt = (u_b * s_b) @ v_b.T
            ws_rebuilt = ws_rebuilt.T if basis32.transposed else ws_rebuilt
            err_ref = float(((wt.double() - ws_rebuilt) - d64).norm() / d64.norm())
            rows.append({"layer": f"{label} {m}x{n}", "drift_norm": rel, "weight_space_error": err_w,
                         "routing_error": err_c, "reference_method_error": err_ref})
    return rows


def projection_14b(per_layer: dict, small: WanShape, big: WanShape) -> dict:
    """Scale measured per-layer costs to 14B shapes (cubic in width for SVD/matmul)."""
    def flops(shape: WanShape) -> float:
        d, f = shape.dim, shape.ffn_dim
        return shape.blocks * (8 * d**3 + 2 * f * d * d)

    ratio = flops(big) / flops(small)

    def elems(shape):
        d, f = shape.dim, shape.ffn_dim
        return shape.blocks * (8 * d * d + 2 * f * d)
    return {"flop_ratio": ratio, "elem_ratio": elems(big) / elems(small),
            "largest_layer_ratio": (big.ffn_dim * big.dim) / (small.ffn_dim * small.dim)}


# ---------------------------------------------------------------------------------------------------
# one step in a child process (its peak RSS is its own)
# ---------------------------------------------------------------------------------------------------

def _providers(out: Path):
    cache = out / "cache"
    return Checkpoint(out / "source.safetensors", memo_dir=cache), Checkpoint(out / "target.safetensors",
                                                                             memo_dir=cache), cache


def run_step(out: Path, step: str, rank: int, device: str) -> dict:
    """basis | drift | lowrank | exact: seconds, peak extra RSS (and GPU memory), bytes written."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    source, target, cache = _providers(out)
    result: dict = {}
    gc.collect()
    with PeakRSS() as peak:
        t = time.perf_counter()
        if step == "basis":
            basis = load_or_build_basis(source, cache, device=device)
            result["bytes"] = basis.bytes_on_disk()
        else:
            basis = load_or_build_basis(source, cache)
            if step == "drift":
                t = time.perf_counter()
            drift = load_or_build_drift(basis, WeightDifference(source, target), cache, device=device)
            if step == "drift":
                result["bytes"] = drift.bytes_on_disk()
            else:
                t = time.perf_counter()  # per-LoRA: reading the LoRA and the caches, the transfer, the file
                spec = OutputSpec(mode="lowrank", rank=rank) if step == "lowrank" else OutputSpec("exact", rank=None)
                lora = read_lora(out / "lora.safetensors", basis.layers)
                cfg = TransferConfig(method="casa", output=spec, device=device)
                rep = run_transfer_to_file(lora, basis, drift, cfg, 1.0, out / f"transferred_{step}.safetensors")
                result["kept_energy"] = rep.totals()["kept_energy"]
                result["file_bytes"] = (out / f"transferred_{step}.safetensors").stat().st_size
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - t
    result["peak_extra_rss"] = peak.extra
    if cuda:
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    return result


def run_child(out: Path, step: str, a) -> dict:
    if a.in_process:
        return run_step(out, step, a.rank, a.device)
    threads = ["--threads", str(a.threads)] if a.threads else []
    child = subprocess.run(
        [sys.executable, __file__, "--child", step, "--out", str(out), "--rank", str(a.rank), "--device", a.device,
         *threads], capture_output=True, text=True,
    )
    if child.returncode != 0:
        sys.stderr.write(child.stdout + child.stderr)
        raise SystemExit(f"the {step} step failed (exit {child.returncode})")
    return json.loads(child.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# one model size end to end
# ---------------------------------------------------------------------------------------------------

def _gpu(r: dict) -> str:
    return f"   peak GPU {r['peak_gpu'] / GIB:.2f} GiB" if "peak_gpu" in r else ""


def measure_model(label: str, shape: WanShape, out: Path, a) -> dict:
    """Files, basis, drift and per-LoRA transfers for ``shape``; prints today's lines, returns figures."""
    out.mkdir(parents=True)
    print(f"\n== {label} shapes: {shape.blocks} blocks x 8 x {shape.dim}x{shape.dim} + {shape.ffn_dim}x{shape.dim} "
          f"+ {shape.dim}x{shape.ffn_dim} ({load_average()})", flush=True)
    t = time.perf_counter()
    src, _, _ = build_files(out, shape, a.rel_drift, a.lora_rank)
    gc.collect()
    print(f"generated source/target/LoRA in {time.perf_counter() - t:.0f}s "
          f"({src.stat().st_size / GIB:.2f} GiB each checkpoint)", flush=True)
    res: dict = {"blocks": shape.blocks}
    for step in ("basis", "drift"):
        r = run_child(out, step, a)
        res[f"{step}_s"], res[f"{step}_rss"], res[f"{step}_bytes"] = r["seconds"], r["peak_extra_rss"], r["bytes"]
        print(f"{step} (one-time):  {r['seconds']:7.1f} s   {r['bytes'] / GIB:.2f} GiB   "
              f"peak extra RSS {r['peak_extra_rss'] / GIB:.2f} GiB{_gpu(r)}", flush=True)
    res["cache_bytes"] = res["basis_bytes"] + res["drift_bytes"]
    for mode in ["lowrank"] + ([] if a.skip_exact else ["exact"]):
        r = run_child(out, mode, a)
        res[f"transfer_{mode}_s"], res[f"transfer_{mode}_rss"] = r["seconds"], r["peak_extra_rss"]
        res[f"transfer_{mode}_kept"] = r["kept_energy"]
        print(f"per-LoRA CASA {mode:7s}: {r['seconds']:7.1f} s   peak extra RSS {r['peak_extra_rss'] / GIB:.2f} GiB   "
              f"energy kept {r['kept_energy']:.1%}   file {r['file_bytes'] / GIB:.2f} GiB{_gpu(r)}", flush=True)
    print(f"cache on disk (basis + drift): {res['cache_bytes'] / GIB:.2f} GiB", flush=True)
    return res


def whole_model(res: dict, full_blocks: int) -> dict:
    """Whole-model figures from the measured per-block ones."""
    f = full_blocks / res["blocks"]
    keys = ["basis_s", "drift_s", "cache_bytes", "transfer_lowrank_s", "transfer_exact_s"]
    return {k: res[k] * f for k in keys if k in res}


def print_whole(label: str, res: dict, full_blocks: int) -> dict:
    w = whole_model(res, full_blocks)
    exact = f", exact {w['transfer_exact_s']:.1f} s" if "transfer_exact_s" in w else ""
    print(f"{label} whole model ({full_blocks} blocks, from {res['blocks']} measured): basis {w['basis_s']:.0f} s, "
          f"drift {w['drift_s']:.0f} s, per-LoRA low-rank {w['transfer_lowrank_s']:.1f} s{exact}, "
          f"cache {w['cache_bytes'] / GIB:.1f} GiB", flush=True)
    return w


# ---------------------------------------------------------------------------------------------------
# a warm drift-cache hit (what the drift node does when the drift is cached)
# ---------------------------------------------------------------------------------------------------

def warm_hit(out: Path, shape: WanShape, full_blocks: int) -> dict:
    """Seconds of a drift-cache hit for the whole model, and of hashing every weight (the old identity)."""
    gc.collect()
    t = time.perf_counter()
    source, target, cache = _providers(out)  # fresh objects: digests come from the on-disk memo
    basis = load_or_build_basis(source, cache)
    load_or_build_drift(basis, WeightDifference(source, target), cache)
    fixed = time.perf_counter() - t
    names = sorted(target.layers, key=_natural)
    # as nodes/model_identity.spot_layers: spread over the model, among its smaller half by size
    by_size = sorted(names, key=lambda n: (math.prod(target.layers[n]), _natural(n)))
    small = sorted(by_size[: max(SPOT_LAYERS, (len(by_size) + 1) // 2)], key=_natural)
    picks = sorted({small[(i * len(small)) // SPOT_LAYERS] for i in range(SPOT_LAYERS)}, key=_natural)
    t = time.perf_counter()
    for name in picks:  # read from the file and compared with the loaded weight
        w = target.get(name)
        bool(torch.equal(w.to(torch.bfloat16).float(), w))
    spot = time.perf_counter() - t
    # the patches: a rank-64 distillation LoRA on every block linear (bf16, as ComfyUI loads it)
    gen = torch.Generator().manual_seed(3)
    patches = {}
    for name, (m, n) in shape.block_layers().items():
        up = torch.randn(m, DISTILL_RANK_14B, generator=gen).bfloat16()
        down = torch.randn(DISTILL_RANK_14B, n, generator=gen).bfloat16()
        patches[f"diffusion_model.{name}.weight"] = [(1.0, (up, down, 64.0, None, None, None), 1.0, None, None)]
    t = time.perf_counter()
    h = hashlib.blake2b(digest_size=20)
    for key in sorted(patches):
        h.update(key.encode())
        feed(h, patches[key])
    patch_s = (time.perf_counter() - t) * full_blocks / shape.blocks
    del patches
    # before: every original weight converted to float32 and hashed (ComfyModelWeights' fallback)
    hashed = 0.0
    for name in names:
        w = target.get(name).bfloat16()  # as loaded (bf16), outside the timing
        t = time.perf_counter()
        h = hashlib.blake2b(digest_size=20)
        h.update(w.float().contiguous().cpu().numpy().tobytes())
        hashed += time.perf_counter() - t
        del w
    return {"warm_hit_s": fixed + spot + patch_s, "fixed_s": fixed, "spot_s": spot, "patches_s": patch_s,
            "hash_all_s": hashed * full_blocks / shape.blocks}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace("_", ".").split(".")]


# ---------------------------------------------------------------------------------------------------
# the reference code (github Noahwangyuchen/CASA), imported at run time
# ---------------------------------------------------------------------------------------------------

def import_reference(folder: str):
    d = Path(folder).resolve()
    missing = [f for f in ("transfer.py", "utils.py") if not (d / f).is_file()]
    if missing:
        raise SystemExit(f"--reference {folder}: {', '.join(missing)} not found there (the authors' transfer.py and "
                         f"utils.py from github Noahwangyuchen/CASA)")
    if importlib.util.find_spec("scipy") is None:
        raise SystemExit("--reference: the reference's transfer.py imports scipy, which this Python lacks "
                         "(run the benchmark in an environment that has it, e.g. pip install scipy)")
    saved = sys.modules.get("utils")
    try:
        spec = importlib.util.spec_from_file_location("utils", d / "utils.py")
        utils = importlib.util.module_from_spec(spec)
        sys.modules["utils"] = utils  # the name transfer.py imports it by
        spec.loader.exec_module(utils)
        spec = importlib.util.spec_from_file_location("casa_reference_transfer", d / "transfer.py")
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
    finally:
        if saved is not None:
            sys.modules["utils"] = saved
        else:
            sys.modules.pop("utils", None)
    if not callable(getattr(ref, "cluster_aware_spectral_arbitration", None)):
        raise SystemExit(f"--reference {folder}: transfer.py has no cluster_aware_spectral_arbitration")
    return ref


class _Capture:
    """Stands in for ``torch`` inside the reference module: records the matrix handed to
    ``torch.svd_lowrank`` (its routing update ``C_new``, before the randomised rank-32 truncation)."""

    def __init__(self):
        self.c_new = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def svd_lowrank(self, a, *args, **kwargs):
        self.c_new = a.detach().clone()
        return torch.svd_lowrank(a, *args, **kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_side_by_side(ref, out: Path, blocks: int, ours: dict, a) -> dict:
    """Time the reference's one-time steps and per-layer function on ``blocks`` blocks; parity."""
    dev = a.device
    source, target, cache = _providers(out)
    basis = load_or_build_basis(source, cache)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache)
    lora = read_lora(out / "lora.safetensors", basis.layers)
    cap = _Capture()
    ref.torch = cap
    t_basis = t_drift = t_lora = t_read = 0.0
    ours_t = {"basis_s": 0.0, "drift_s": 0.0, "lora_s": 0.0}  # casa-lora's same steps, timed right beside
    ref_bytes = 0
    parity_sq, parity_ffn, kept = [], {}, {"reference": [], "casa-lora": []}
    names = [n for n in sorted(basis.layers, key=_natural) if int(n.split(".")[1]) < blocks]
    for name in names:
        shape = basis.layers[name]
        # -- one-time steps, the reference's way --------------------------------------------------
        t = time.perf_counter()
        w_s = source.get(name).to(dev)
        u, s, vh = torch.linalg.svd(w_s, full_matrices=True)
        stored = tuple(x.to(torch.bfloat16) for x in (u, s, vh))
        _sync(dev)
        t_basis += time.perf_counter() - t
        t = time.perf_counter()
        w_t = target.get(name).to(dev)
        ub, sb, vhb = (x.float() for x in stored)
        n = sb.numel()
        rebuilt = (ub[:, :n] * sb) @ vhb[:n, :]
        c_ref = (ub.T @ (w_t - rebuilt) @ vhb.T).to(torch.bfloat16)
        _sync(dev)
        t_drift += time.perf_counter() - t
        del ub, sb, vhb, rebuilt
        # -- per-LoRA: conversions + the per-layer function -------------------------------------
        upd = lora.updates[name]
        up_b, down_b = upd.up.to(torch.bfloat16), upd.down.to(torch.bfloat16)  # as stored in the file
        t = time.perf_counter()
        b_f = up_b.to(dev).float() * float(upd.scale)  # alpha folded in (the reference ignores alpha)
        a_f = down_b.to(dev).float()
        args = [x.float() for x in stored] + [c_ref.float()]
        with contextlib.redirect_stdout(io.StringIO()):
            ref.cluster_aware_spectral_arbitration(b_f, a_f, args[0], args[1], args[2], args[3])
        _sync(dev)
        t_lora += time.perf_counter() - t
        del args
        # its caches for this layer, read back as a per-LoRA run reads them
        tmp = out / "reference_layer.safetensors"
        tensors = {"U": stored[0].cpu(), "S": stored[1].cpu(), "Vh": stored[2].cpu(), "Cfft": c_ref.cpu()}
        write_file(str(tmp), tensors)
        ref_bytes += tmp.stat().st_size
        t = time.perf_counter()
        with SafeTensorsFile(str(tmp)) as f:
            keys = f.keys()
            for k in keys:
                f.get(k)
        t_read += time.perf_counter() - t
        tmp.unlink()
        del tensors, stored, c_ref
        # -- casa-lora's own steps on this layer, at the same moment (the machine's load drifts) ----
        t = time.perf_counter()
        L.compute_basis(name, w_s)
        _sync(dev)
        ours_t["basis_s"] += time.perf_counter() - t
        b = basis.layer(name, dev)
        t = time.perf_counter()
        L.compute_drift(b, weight_difference(w_t, w_s))
        _sync(dev)
        ours_t["drift_s"] += time.perf_counter() - t
        t = time.perf_counter()  # per-LoRA as iter_transfer does it: cache reads, coordinates, CASA, factors
        b = basis.layer(name, dev)
        d = drift.layer(name, b, dev)
        left, right = upd.up.float().to(dev) * float(upd.scale), upd.down.float().to(dev)
        coords = L.coordinates(b, d, left, right)
        cu = casa_layer(coords, CasaParams())
        low = realize(coords, cu, OutputSpec(mode="lowrank", rank=a.rank))
        [x.cpu() for x in low.tensors]
        ours_t["lora_s"] += time.perf_counter() - t
        # -- parity: the reference on casa-lora's inputs -----------------------------------------
        ours_full = coords.to_dense(cu.dense())
        norm = float(ours_full.norm())
        if shape[0] == shape[1]:
            u_in, s_in, vh_in = b.U, b.S, b.V.T.contiguous()
            c_in = d.c_f
        else:  # the reference's full bases (float32) and the drift in them, from the real weights
            u_in, s_in, vh_in = u, s, vh
            c_in = u.T @ (w_t - w_s) @ vh.T
        with contextlib.redirect_stdout(io.StringIO()):
            up_r, down_r = ref.cluster_aware_spectral_arbitration(left, right, u_in, s_in, vh_in, c_in)
        ref_full = u_in @ cap.c_new @ vh_in
        rel = float((ref_full - ours_full).norm()) / norm if norm > 0 else 0.0
        if shape[0] == shape[1]:
            parity_sq.append(rel)
            low = realize(coords, cu, OutputSpec(mode="lowrank", rank=32))
            ours32 = low.tensors[0] @ low.tensors[1]
            kept["casa-lora"].append(1.0 - (float((ours32 - ours_full).norm()) / norm) ** 2)
            kept["reference"].append(1.0 - (float((up_r @ down_r - ref_full).norm()) / norm) ** 2)
        else:
            parity_ffn.setdefault(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1], []).append(rel)
        del u, s, vh, w_s, w_t, u_in, vh_in, c_in, ref_full, ours_full, coords, cu
        gc.collect()
    ref.torch = torch
    per_block = {"basis_s": t_basis / blocks, "drift_s": t_drift / blocks, "lora_s": t_lora / blocks,
                 "read_s": t_read / blocks, "bytes": ref_bytes / blocks}
    beside = {k: v / blocks for k, v in ours_t.items()}
    return {"per_block": per_block, "ours_beside": beside, "parity_square": parity_sq, "parity_ffn": parity_ffn,
            "kept32": kept}


def print_reference(rr: dict, ours: dict, full_blocks: int, blocks: int) -> dict:
    pb, ob = rr["per_block"], rr["ours_beside"]
    f = full_blocks
    ref_lora = pb["lora_s"] + pb["read_s"]
    ours_pb = {k: ours[k] / ours["blocks"] for k in ("basis_s", "drift_s", "transfer_lowrank_s")}
    print(f"reference per block (measured on {blocks}): basis {pb['basis_s']:.1f} s (full SVD, bf16), drift "
          f"{pb['drift_s']:.1f} s, per-LoRA {pb['lora_s']:.2f} s (CASA calls + conversions) + {pb['read_s']:.2f} s "
          f"reading its {pb['bytes'] / GIB:.2f} GiB of caches (warm: a lower bound)")
    print(f"reference whole model ({f} blocks): basis {pb['basis_s'] * f:.0f} s, drift {pb['drift_s'] * f:.0f} s, "
          f"per-LoRA {pb['lora_s'] * f:.1f} s + {pb['read_s'] * f:.1f} s reading {pb['bytes'] * f / GIB:.1f} GiB "
          f"= {ref_lora * f:.1f} s")
    print(f"casa-lora per block, timed beside the reference (same layers, same moments): basis {ob['basis_s']:.1f} s "
          f"(thin SVD), drift {ob['drift_s']:.1f} s, per-LoRA low-rank {ob['lora_s']:.2f} s (cache reads included)")
    print(f"casa-lora per block, from its own runs above: basis {ours_pb['basis_s']:.1f} s, drift "
          f"{ours_pb['drift_s']:.1f} s, per-LoRA low-rank {ours_pb['transfer_lowrank_s']:.2f} s (LoRA file read, "
          f"cache reads, output file written)")
    ratios = {"per-LoRA": ref_lora / ob["lora_s"], "basis": pb["basis_s"] / ob["basis_s"],
              "drift": pb["drift_s"] / ob["drift_s"]}
    separate = {"per-LoRA": ref_lora / ours_pb["transfer_lowrank_s"], "basis": pb["basis_s"] / ours_pb["basis_s"],
                "drift": pb["drift_s"] / ours_pb["drift_s"]}
    for k, v in ratios.items():
        print(f"ratio {k} (reference / casa-lora): {v:.1f}\u00d7   (against casa-lora's own runs above: "
              f"{separate[k]:.1f}\u00d7)")
    sq = sorted(rr["parity_square"])
    if sq:
        print(f"parity, square layers (the reference on casa-lora's basis and drift; its C_new before truncation vs "
              f"casa-lora's exact update): relative difference max {sq[-1]:.2e}, median {sq[len(sq) // 2]:.2e} "
              f"over {len(sq)} layers")
    for k, v in rr["parity_ffn"].items():
        print(f"parity, {k} (the reference's full bases; differs by design until issue 10): relative difference "
              f"max {max(v):.2e}")
    kp = rr["kept32"]
    if kp["reference"]:
        print(f"rank-32 outputs, square layers: energy kept min {min(kp['reference']):.1%} by the reference "
              f"(torch.svd_lowrank q=32, niter=6), min {min(kp['casa-lora']):.1%} by casa-lora")
    return ratios


# ---------------------------------------------------------------------------------------------------

def _dims(text: str) -> tuple[int, int]:
    d, f = (int(x) for x in text.split(","))
    return d, f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--blocks", type=int, default=WAN21_1_3B.blocks, help="1.3B-shaped blocks measured (0: none)")
    ap.add_argument("--blocks-14b", type=int, default=1, help="14B-shaped blocks measured (0: none)")
    ap.add_argument("--reference", metavar="DIR", help="folder with the reference's transfer.py and utils.py")
    ap.add_argument("--reference-blocks", type=int, default=1, help="1.3B blocks the reference is timed on")
    ap.add_argument("--device", default="cpu", help="torch device of basis, drift and transfer (cpu, cuda)")
    ap.add_argument("--dims", type=_dims, default=(WAN21_1_3B.dim, WAN21_1_3B.ffn_dim), help="dim,ffn_dim of '1.3B'")
    ap.add_argument("--dims-14b", type=_dims, default=(WAN21_14B.dim, WAN21_14B.ffn_dim), help="dim,ffn_dim of '14B'")
    ap.add_argument("--rel-drift", type=float, default=3e-3)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--rank", type=int, default=128, help="rank of the low-rank output")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-drift-table", action="store_true", help="skip the float64 drift-error table")
    ap.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    ap.add_argument("--in-process", action="store_true",
                    help="run every step in this process (faster to start; peak RSS then less exact)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--child", choices=["basis", "drift", "lowrank", "exact"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(run_step(Path(a.out), a.child, a.rank, a.device)))
        return 0
    if a.reference and a.blocks < a.reference_blocks:
        ap.error("--reference needs --blocks >= --reference-blocks (it runs on the 1.3B-shaped files)")
    ref = import_reference(a.reference) if a.reference else None
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    small = WanShape(dim=a.dims[0], ffn_dim=a.dims[1], blocks=a.blocks)
    big = WanShape(dim=a.dims_14b[0], ffn_dim=a.dims_14b[1], blocks=a.blocks_14b)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}; {load_average()}",
          flush=True)
    results: dict = {"device": a.device, "torch": torch.__version__}

    if a.blocks:
        res = measure_model("Wan2.1-1.3B", small, out / "w13b", a)
        results["1.3B"] = res
        results["1.3B_whole"] = print_whole("1.3B", res, WAN21_1_3B.blocks)
        if not a.skip_drift_table:
            print("\ndrift error against float64 (weight space: ||U C_F V^T - dF|| / ||dF||, "
                  "with the caches' float16 storage):")
            print(f"{'layer':<22}{'drift':>8}{'ours (weights)':>16}{'ours (C_F)':>12}{'reference way':>15}")
            rows = drift_error_table(small)
            for r in rows:
                print(f"{r['layer']:<22}{r['drift_norm']:>8.0e}{r['weight_space_error']:>16.2e}"
                      f"{r['routing_error']:>12.2e}{r['reference_method_error']:>15.2e}")
            results["drift_errors"] = rows
        proj = projection_14b(res, small, WAN21_14B)
        b14 = WAN21_14B
        print(f"\nprojection (today's method: width^3 from the 1.3B figures) for Wan2.1-14B shapes ({b14.blocks} "
              f"blocks, dim {b14.dim}, ffn {b14.ffn_dim}) on this machine:")
        print(f"  basis ~{res['basis_s'] * proj['flop_ratio'] / 60:.0f} min, drift "
              f"~{res['drift_s'] * proj['flop_ratio'] / 60:.0f} min, per-LoRA low-rank "
              f"~{res['transfer_lowrank_s'] * proj['flop_ratio'] / 60:.0f} min (compute scales with width^3)")
        rss14 = res["transfer_lowrank_rss"] * proj["largest_layer_ratio"]
        print(f"  cache ~{res['cache_bytes'] * proj['elem_ratio'] / GIB:.0f} GiB on disk; peak extra RSS "
              f"~{rss14 / GIB:.1f} GiB (scales with the largest layer) -> "
              f"{'fits' if rss14 < 20 * GIB else 'does NOT fit'} a 24 GB machine", flush=True)
        if ref is not None:
            print(f"\n== the reference ({a.reference}) side by side, 1.3B shapes, {a.reference_blocks} block(s) "
                  f"({load_average()})", flush=True)
            rr = reference_side_by_side(ref, out / "w13b", a.reference_blocks, res, a)
            results["reference"] = rr
            results["ratios"] = print_reference(rr, res, WAN21_1_3B.blocks, a.reference_blocks)
        if not a.keep:
            shutil.rmtree(out / "w13b")

    if a.blocks_14b:
        res = measure_model("Wan2.1-14B", big, out / "w14b", a)
        results["14B"] = res
        w = print_whole("14B", res, WAN21_14B.blocks)
        results["14B_whole"] = w
        peak = max(v for k, v in res.items() if k.endswith("_rss"))
        print(f"14B peak extra RSS (largest of basis, drift, per-LoRA): {peak / GIB:.2f} GiB")
        print(f"14B per-LoRA (measured on 14B shapes, whole model): {w['transfer_lowrank_s']:.1f} s", flush=True)
        if "transfer_exact_s" in w:
            print(f"14B per-LoRA exact (measured on 14B shapes, whole model): {w['transfer_exact_s']:.1f} s")
        wh = warm_hit(out / "w14b", big, WAN21_14B.blocks)
        results["14B_warm_hit"] = wh
        print(f"14B warm drift-cache hit (whole model): {wh['warm_hit_s']:.2f} s (memoised file digests + manifests "
              f"{wh['fixed_s']:.2f} s, spot check of {SPOT_LAYERS} layers {wh['spot_s']:.2f} s, patches of a "
              f"rank-{DISTILL_RANK_14B} distillation LoRA {wh['patches_s']:.2f} s); before, hashing every weight: "
              f"{wh['hash_all_s']:.1f} s", flush=True)
        if not a.keep:
            shutil.rmtree(out / "w14b")
    print(f"\n({load_average()})")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
