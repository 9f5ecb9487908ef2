"""FFN (non-square) fidelity of the compact path against the reference over random completions.

    python benchmarks/bench_ffn_fidelity.py [--shapes 8960x1536] [--completions 6] [--quick]
        [--sections fidelity,storage,lowrank,perlora] [--before-root DIR]

For each FFN-shaped layer (realistic spectrum: a Marchenko-Pastur bulk under a decaying
envelope, spikes, near-equal pairs; see tests/helpers/ffn.py), the reference's CASA is run with
full bases ``U (M x M)``: once with LAPACK's completion and ``--completions`` times with
uniformly random valid completions (plain full-basis code, ``casa_full_bases``).  Printed:

* the update's distance to the references' mean (relative to its norm), for ``before`` (the
  previous default: entry-wise CASA on the compact rows, QR-triangular drift block) and
  ``after`` (the default now: the expectation over random completions), beside the references'
  own distances to the mean of the others; distances to LAPACK's reference;
* arbitrated entries and candidates, split into the top ``N x N`` block and the complement, the
  arbitration threshold, the exact zeros the compact drift block carries; the dominant mask;
* the per-LoRA CASA time of one layer before/after and the routing rows each holds;
* section ``storage``: how far float16 basis storage moves the update (restoration only, and
  CASA) from float32 storage, before/after solving for coordinates;
* section ``lowrank``: the low-rank factoriser's gap to the optimal rank-r update, before/after,
  beside LAPACK's full SVD, with times;
* section ``perlora``: the per-LoRA path of one attention and one FFN layer at Wan-1.3B shapes
  (coordinates, CASA, rank-128 factorisation), for this checkout and ``--before-root``.

Figures are printed, never asserted (tests/core/test_ffn_fidelity.py asserts at test size).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.ffn import full_svd, make_ffn_layer, random_completion, reference_transfer, spread

from casa_core import drift as drift_mod
from casa_core import layer as L
from casa_core import linalg
from casa_core.drift import decode_drift, encode_drift
from casa_core.methods import casa_layer
from casa_core.routing import CasaParams, casa_update


def parse_shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def compact(layer):
    basis = L.compute_basis("ffn", layer.ws.float())
    drift = L.compute_drift(basis, layer.df.float())
    co = L.coordinates(basis, drift, layer.up.float(), layer.down.float())
    return basis, drift, co


def before_path(co, params):
    """The previous default: entry-wise CASA on the compact rows."""
    c_new, routing = casa_update(co.c_l(), co.c_f(), co.basis.S, False, params)
    return c_new, routing


def timed(fn, repeat=3):
    out = None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def fidelity(shape, completions, seed, params, fixture_kw):
    m, n = shape
    t0 = time.perf_counter()
    layer = make_ffn_layer(m, n, seed, **fixture_kw)
    wide = m < n
    big, small = max(m, n), min(m, n)
    dim = big - small
    u, s, v = full_svd(layer.ws.T if wide else layer.ws)
    lapack = reference_transfer(layer, u, s, v, params)
    gen = torch.Generator().manual_seed(1000 + seed)
    refs = [reference_transfer(layer, random_completion(u[:, :small], gen), s, v, params) for _ in range(completions)]
    t_ref = time.perf_counter() - t0
    del u

    _, _, co = compact(layer)
    (c_before, r_before), t_before = timed(lambda: before_path(co, params))
    upd_after, t_after = timed(lambda: casa_layer(co, params))
    before = co.to_dense(c_before).double()
    after = co.to_dense(upd_after.c).double()
    st_b, st_a = r_before.stats, upd_after.stats

    sp_b, sp_a = spread(before, refs), spread(after, refs)
    lap_norm = float(lapack.update.norm())
    vs_lapack = [float((r.update - lapack.update).norm()) / lap_norm for r in refs]
    top_cand = int((r_before.dominance.mask()[:small] & (torch.sign(co.c_l()[:small]) == torch.sign(co.c_f()[:small]))).sum())
    comp_cf = co.c_f()[small:]
    zeros = int((comp_cf == 0).sum())
    print(f"\n== {m}x{n} (tall {big}x{small}, complement {dim} rows; compact rows {co.rows - small}: "
          f"drift {co.n_comp}, LoRA {co.rows - small - co.n_comp}); {completions} random completions "
          f"+ LAPACK in {t_ref:.1f} s")
    print(f"   update distance to the references' mean (relative):  before {sp_b.ours_to_mean:.4f}   "
          f"after {sp_a.ours_to_mean:.4f}")
    print(f"   references to the mean of the others: {min(sp_a.refs_leave_one_out):.4f} .. "
          f"{max(sp_a.refs_leave_one_out):.4f} (to the mean incl. themselves "
          f"{min(sp_a.refs_to_mean):.4f} .. {max(sp_a.refs_to_mean):.4f})")
    print(f"   distance to LAPACK's reference: before {float((before - lapack.update).norm()) / lap_norm:.4f}  "
          f"after {float((after - lapack.update).norm()) / lap_norm:.4f}  random references "
          f"{min(vs_lapack):.4f} .. {max(vs_lapack):.4f}")
    arb = sp_a.arbitrated_refs
    cand = sp_a.candidates_refs
    thr = [r.stats.arbitration_threshold for r in refs]
    print(f"   arbitrated entries: before {st_b.arbitrated_entries}  after {st_a.arbitrated_entries}  "
          f"references {min(arb)} .. {max(arb)} (mean {statistics.mean(arb):.0f}), LAPACK "
          f"{lapack.stats.arbitrated_entries}")
    print(f"   candidates: top block {top_cand} (all paths); complement before {st_b.candidates - top_cand} "
          f"(compact C_F complement holds {zeros} exact zeros of {comp_cf.numel()}), after "
          f"{st_a.candidates - top_cand}, references {min(cand) - top_cand} .. {max(cand) - top_cand}")
    print(f"   threshold: before {st_b.arbitration_threshold:.4g}  after {st_a.arbitration_threshold:.4g}  "
          f"references {min(thr):.4g} .. {max(thr):.4g}")
    same_dom = all(r.stats.dominant_entries == st_a.dominant_entries for r in refs)
    print(f"   dominant entries: after {st_a.dominant_entries} of {st_a.entries} "
          f"({st_a.dominant_entries / st_a.entries:.2%}); references {refs[0].stats.dominant_entries} "
          f"of {refs[0].stats.entries}; identical for every completion: {same_dom}; "
          f"before counted {st_b.dominant_entries} of {st_b.entries} (compact rows only)")
    print(f"   CASA time for this layer (median of 3): before {t_before * 1e3:.1f} ms  after {t_after * 1e3:.1f} ms")


def storage(shape, seed, params, fixture_kw):
    """Float16 cache round trip (the real encoders) against float32 storage: before (plain
    projections on the float16 bases, drift coordinates in float16) and after (coordinates
    solved for, ``refine``; drift coordinates in float32)."""
    layer = make_ffn_layer(*shape, seed, **fixture_kw)
    d32 = (layer.ws + layer.df).float() - layer.ws.float()
    exact = L.compute_basis("ffn", layer.ws.float())
    print(f"\n== float16 basis storage, {shape[0]}x{shape[1]}: update vs float32 storage (relative)")
    res = {}
    for tag, f16, refine in (("float32", False, False), ("before", True, False), ("after", True, True)):
        if f16:
            b = L.LayerBasis("ffn", exact.shape, exact.U.half().float(), exact.S, exact.V.half().float(), refine)
            # before: the drift's coordinates were stored in float16 too
            drift_mod.COORDINATE_STORAGE = "float32" if refine else "float16"
            tensors, info = encode_drift(L.compute_drift(b, d32), "float16")
            drift_mod.COORDINATE_STORAGE = "float32"
            d = decode_drift("ffn", tensors, info)
        else:
            b = exact
            d = L.compute_drift(b, d32)
        co = L.coordinates(b, d, layer.up.float(), layer.down.float())
        res[tag] = {v: co.to_dense(casa_layer(co, params, v).c).double() for v in ("restoration_only", "casa")}
        upd = casa_layer(co, params)
        n = co.n_top
        res[tag]["decisions"] = (upd.routing.arbitrated_mask[:n], upd.routing.dominance.mask()[:n])
    ratio = float(layer.df.norm() / res["float32"]["casa"].norm())
    print(f"   (drift / update norm {ratio:.2f}; restoration masks the drift in the stored bases' coordinates, "
          f"so up to ~5e-4 of the restored drift remains)")
    def flips(tag):
        arb, dom = res[tag]["decisions"]
        arb0, dom0 = res["float32"]["decisions"]
        return int((arb != arb0).sum()), int((dom != dom0).sum())

    for v in ("restoration_only", "casa"):
        ref = res["float32"][v]
        extra = ""
        if v == "casa":
            extra = (f"   (top-block arbitration / dominance decisions that differ: before {flips('before')}, "
                     f"after {flips('after')}: one flipped entry can move a layer's update by ~1e-3)")
        print(f"   {v:17s} before {float((res['before'][v] - ref).norm() / ref.norm()):.1e}   "
              f"after {float((res['after'][v] - ref).norm() / ref.norm()):.1e}{extra}")


def old_top_singular(c, rank, power_iters=4, oversample=16):
    """The previous factoriser (fixed 4 power steps, LU between them), for the before figures."""
    rows, cols = c.shape
    width = rank + oversample
    if width * 3 >= min(rows, cols):
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]

    def lu_basis(y):
        lu, piv = torch.linalg.lu_factor(y)
        m, k = y.shape
        lower = torch.tril(lu[:, :k], diagonal=-1)
        lower.diagonal().fill_(1.0)
        perm = list(range(m))
        for i, p in enumerate(piv.tolist()):
            perm[i], perm[p - 1] = perm[p - 1], perm[i]
        inverse = torch.empty(m, dtype=torch.long)
        inverse[torch.tensor(perm)] = torch.arange(m)
        return lower[inverse]

    gen = torch.Generator().manual_seed(20260430)
    q = lu_basis(c @ torch.randn(cols, width, generator=gen))
    for i in range(power_iters):
        y = c @ lu_basis(c.T @ q)
        q = torch.linalg.qr(y)[0] if i == power_iters - 1 else lu_basis(y)
    u_s, s, vh = torch.linalg.svd(q.T @ c, full_matrices=False)
    return q @ u_s[:, :rank], s[:rank], vh[:rank]


def full_svd_rank(c, rank):
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def lowrank(shape, seed, params, fixture_kw):
    """Gap of the rank-r factorisation to the optimal rank-r update (float64 SVD)."""
    layer = make_ffn_layer(*shape, seed, **fixture_kw)
    _, _, co = compact(layer)
    cases = {f"CASA C_new of {shape[0]}x{shape[1]} ({co.rows}x{co.n_top})": casa_layer(co, params).c}
    g = torch.Generator().manual_seed(seed)
    n = 1536
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sv = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    sv[16] = sv[15] * (1 - 0.0025)
    cases["1536x1536, s_i ~ i^-1/2, s_17 = 0.9975 s_16"] = ((u * sv) @ v.T).float()
    print("\n== low-rank factoriser: gap to the optimal rank-r update (dist = ||B'A' - C_r|| / ||C_r||, "
          "energy = extra lost energy / ||C||^2), time (min of 3)")
    for label, c in cases.items():
        c64 = c.double()
        uu, ss, vvh = torch.linalg.svd(c64, full_matrices=False)
        total = float((ss**2).sum())
        for rank in (16, 64, 128):
            if rank >= min(c.shape):
                continue
            best = (uu[:, :rank] * ss[:rank]) @ vvh[:rank]
            row = []
            for tag, fn in (("before", old_top_singular), ("after", linalg.top_singular), ("LAPACK svd", full_svd_rank)):
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    a, b, vh = fn(c, rank)
                    times.append(time.perf_counter() - t)
                got = (a.double() * b.double()) @ vh.double()
                dist = float((got - best).norm() / best.norm())
                energy = (float((c64 - got).norm()) ** 2 - float((ss[rank:] ** 2).sum())) / total
                row.append(f"{tag} {min(times) * 1e3:6.0f} ms dist {dist:.1e} energy {energy:.1e}")
            print(f"   {label}, rank {rank} (s_r/s_r+1 = {float(ss[rank - 1] / ss[rank]):.4f}):")
            print("      " + " | ".join(row))


PERLORA_SCRIPT = r"""
import sys, time, math
sys.path.insert(0, sys.argv[1])
import torch
from casa_core import synth, layer as L
from casa_core.factorize import OutputSpec, realize
from casa_core.methods import casa_layer
from casa_core.routing import CasaParams
gen = torch.Generator().manual_seed(0)
for name, (m, n) in {"attention 1536x1536": (1536, 1536), "ffn.0 8960x1536": (8960, 1536)}.items():
    w, u, s, v = synth.spectral_weight(m, n, gen)
    key = "blocks.0.x"
    dist = synth.distill({key + ".weight": w}, {key: (u, s, v)}, rel_drift=3e-3, dtype=torch.float32)
    lora = synth.style_lora({key: (u, s, v)}, rank=32, alpha=16.0)
    up = lora["lora_unet_blocks_0_x.lora_up.weight"].float() * 0.5
    down = lora["lora_unet_blocks_0_x.lora_down.weight"].float()
    b = L.compute_basis(key, w)
    b = L.LayerBasis(key, b.shape, b.U.half().float(), b.S, b.V.half().float())  # as read from float16
    if hasattr(b, "refine"):
        b.refine = True
    d = L.compute_drift(b, dist[key + ".weight"] - w)
    def run():
        co = L.coordinates(b, d, up, down)
        return realize(co, casa_layer(co, CasaParams()), OutputSpec())
    run()
    times = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter(); out = run(); times.append(time.perf_counter() - t)
    print(f"{name}: {min(times) * 1e3:.0f} ms (min of {len(times)}), kept energy {1 - out.rel_error ** 2:.6f}")
"""


def perlora(before_root, repeat):
    """The per-LoRA path of one layer (coordinates, CASA, rank-128 factorisation; float16-read
    basis) for this checkout and, with ``--before-root``, another one, each in a fresh process."""
    import subprocess

    roots = [("after (this checkout)", str(ROOT))]
    if before_root:
        roots.insert(0, ("before (" + before_root + ")", before_root))
    print("\n== per-LoRA path of one layer: coordinates + CASA + low-rank rank 128")
    for label, root in roots:
        out = subprocess.run([sys.executable, "-c", PERLORA_SCRIPT, root, str(repeat)], capture_output=True, text=True, check=False)
        print(f"   {label}:")
        for line in (out.stdout + out.stderr).strip().splitlines():
            print("      " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8960x1536", help="comma-separated out x in shapes")
    ap.add_argument("--completions", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small shapes (768x128, 128x768), 8 completions")
    ap.add_argument("--fixture", choices=("spread", "head"), default="spread",
                    help="spread: drift 1e-2, 80 %% of it spread over all directions, LoRA mostly generic; "
                         "head: drift 2e-2 half in the head directions, LoRA half generic")
    ap.add_argument("--sections", default="fidelity",
                    help="comma-separated: fidelity, storage, lowrank, perlora")
    ap.add_argument("--before-root", default=None,
                    help="perlora: a checkout of the previous code to time beside this one "
                         "(e.g. git archive <commit> casa_core | tar -x -C DIR)")
    ap.add_argument("--repeat", type=int, default=5, help="perlora: runs per layer (the minimum is printed)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shapes = [(768, 128), (128, 768)] if args.quick else [parse_shape(s) for s in args.shapes.split(",")]
    completions = 8 if args.quick else args.completions
    fixture_kw = {} if args.fixture == "spread" else {"rel_drift": 2e-2, "drift_spread": 0.5, "lora_generic": 2.0}
    sections = set(args.sections.split(","))
    params = CasaParams()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CASA defaults tau {params.tau}, "
          f"q_dom {params.q_dom}, q_act {params.q_act}; fixture {args.fixture}")
    for i, shape in enumerate(shapes):
        if "fidelity" in sections:
            fidelity(shape, completions, args.seed + i, params, fixture_kw)
        if "storage" in sections:
            storage(shape, args.seed + i, params, fixture_kw)
        if "lowrank" in sections and i == 0:
            lowrank(shape, args.seed + i, params, fixture_kw)
    if "perlora" in sections:
        perlora(args.before_root, args.repeat)


if __name__ == "__main__":
    main()
