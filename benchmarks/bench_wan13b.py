"""Benchmark of the transfer engine on whole-model synthetic weights with Wan2.1-1.3B shapes.

    python benchmarks/bench_wan13b.py --out bench_out [--blocks 30] [--keep]

Builds a source and a target checkpoint (bf16, 30 blocks x {8 attention 1536x1536, ffn.0
8960x1536, ffn.2 1536x8960}) and a rank-32 musubi-style LoRA, then prints:
one-time basis time, one-time drift time, per-LoRA transfer time (cache reads included) in the
low-rank and the exact modes, cache bytes on disk, peak extra RSS during a transfer, the
relative error of the drift against a float64 computation at drift norms 1e-2, 3e-3 and 1e-3,
and a projection for Wan2.1-14B shapes.  Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
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
from casa_core.drift import WeightDifference, decode_drift, encode_drift, load_or_build_drift  # noqa: E402
from casa_core.factorize import OutputSpec  # noqa: E402
from casa_core.formats.checkpoint import Checkpoint  # noqa: E402
from casa_core.formats.lora import read_lora  # noqa: E402
from casa_core.formats.safetensors_io import StreamingWriter  # noqa: E402
from casa_core.synth import WAN21_1_3B, WAN21_14B, WanShape  # noqa: E402
from casa_core.transfer import TransferConfig, run_transfer_to_file  # noqa: E402

GIB = 1024**3


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
    samples = {"attention": (shape.dim, shape.dim), "ffn.0": (shape.ffn_dim, shape.dim), "ffn.2": (shape.dim, shape.ffn_dim)}
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
            ws_rebuilt = (basis32.U.bfloat16().double() * basis32.S.bfloat16().double()) @ basis32.V.bfloat16().double().T
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


def child_transfer(out: Path, mode: str, rank: int) -> None:
    """One per-LoRA transfer from the caches (cache reads included); prints a JSON line."""
    cache = out / "cache"
    source = Checkpoint(out / "source.safetensors", memo_dir=cache)
    target = Checkpoint(out / "target.safetensors", memo_dir=cache)
    basis = load_or_build_basis(source, cache)
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache)
    spec = OutputSpec(mode="lowrank", rank=rank) if mode == "lowrank" else OutputSpec(mode="exact", rank=None)
    gc.collect()
    with PeakRSS() as peak:
        t = time.perf_counter()
        lora = read_lora(out / "lora.safetensors", basis.layers)
        rep = run_transfer_to_file(lora, basis, drift, TransferConfig(method="casa", output=spec), 1.0,
                                   out / f"transferred_{mode}.safetensors")
        dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "peak_extra_rss": peak.extra, "kept_energy": rep.totals()["kept_energy"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--blocks", type=int, default=WAN21_1_3B.blocks)
    ap.add_argument("--rel-drift", type=float, default=3e-3)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--rank", type=int, default=128, help="rank of the low-rank output")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    ap.add_argument("--child-transfer", choices=["lowrank", "exact"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_transfer:
        child_transfer(Path(a.out), a.child_transfer, a.rank)
        return 0
    shape = WanShape(dim=WAN21_1_3B.dim, ffn_dim=WAN21_1_3B.ffn_dim, blocks=a.blocks)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shapes: {shape.blocks} blocks x "
          f"8 x {shape.dim}x{shape.dim} + {shape.ffn_dim}x{shape.dim} + {shape.dim}x{shape.ffn_dim}", flush=True)
    t = time.perf_counter()
    src, tgt, lora_path = build_files(out, shape, a.rel_drift, a.lora_rank)
    print(f"generated source/target/LoRA in {time.perf_counter() - t:.0f}s "
          f"({src.stat().st_size / GIB:.2f} GiB each checkpoint)", flush=True)
    cache = out / "cache"
    results: dict = {}
    source, target = Checkpoint(src, memo_dir=cache), Checkpoint(tgt, memo_dir=cache)

    t = time.perf_counter()
    basis = load_or_build_basis(source, cache)
    results["basis_s"] = time.perf_counter() - t
    print(f"basis (one-time):  {results['basis_s']:7.1f} s   {basis.bytes_on_disk() / GIB:.2f} GiB", flush=True)
    t = time.perf_counter()
    drift = load_or_build_drift(basis, WeightDifference(source, target), cache)
    results["drift_s"] = time.perf_counter() - t
    print(f"drift (one-time):  {results['drift_s']:7.1f} s   {drift.bytes_on_disk() / GIB:.2f} GiB", flush=True)
    results["cache_bytes"] = basis.bytes_on_disk() + drift.bytes_on_disk()

    modes = ["lowrank"] + ([] if a.skip_exact else ["exact"])
    for label in modes:
        # each transfer in a fresh process, so that its peak RSS is its own
        child = subprocess.run(
            [sys.executable, __file__, "--child-transfer", label, "--out", str(out), "--rank", str(a.rank)],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        dt, extra = r["seconds"], r["peak_extra_rss"]
        results[f"transfer_{label}_s"] = dt
        results[f"transfer_{label}_rss"] = extra
        results[f"transfer_{label}_kept"] = r["kept_energy"]
        size = (out / f"transferred_{label}.safetensors").stat().st_size
        print(f"per-LoRA CASA {label:7s}: {dt:7.1f} s   peak extra RSS {extra / GIB:.2f} GiB   "
              f"energy kept {r['kept_energy']:.1%}   file {size / GIB:.2f} GiB", flush=True)

    print(f"cache on disk (basis + drift): {results['cache_bytes'] / GIB:.2f} GiB", flush=True)
    print("\ndrift error against float64 (weight space: ||U C_F V^T - dF|| / ||dF||, with the caches' float16 storage):")
    print(f"{'layer':<22}{'drift':>8}{'ours (weights)':>16}{'ours (C_F)':>12}{'reference way':>15}")
    rows = drift_error_table(shape)
    for r in rows:
        print(f"{r['layer']:<22}{r['drift_norm']:>8.0e}{r['weight_space_error']:>16.2e}{r['routing_error']:>12.2e}{r['reference_method_error']:>15.2e}")
    results["drift_errors"] = rows

    proj = projection_14b(results, shape, WAN21_14B)
    big = WAN21_14B
    print(f"\nprojection for Wan2.1-14B shapes ({big.blocks} blocks, dim {big.dim}, ffn {big.ffn_dim}) on this machine:")
    print(f"  basis ~{results['basis_s'] * proj['flop_ratio'] / 60:.0f} min, drift ~{results['drift_s'] * proj['flop_ratio'] / 60:.0f} min, "
          f"per-LoRA low-rank ~{results['transfer_lowrank_s'] * proj['flop_ratio'] / 60:.0f} min (compute scales with width^3)")
    rss14 = results["transfer_lowrank_rss"] * proj["largest_layer_ratio"]
    print(f"  cache ~{results['cache_bytes'] * proj['elem_ratio'] / GIB:.0f} GiB on disk; peak extra RSS ~{rss14 / GIB:.1f} GiB "
          f"(scales with the largest layer) -> {'fits' if rss14 < 20 * GIB else 'does NOT fit'} a 24 GB machine")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not a.keep:
        for p in out.iterdir():
            if p.name != "results.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
