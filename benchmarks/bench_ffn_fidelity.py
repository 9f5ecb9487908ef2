"""FFN (non-square) fidelity of the compact path against the reference over random completions.

    python benchmarks/bench_ffn_fidelity.py [--shapes 8960x1536] [--completions 6] [--quick]

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
* ``--storage``: how far float16 basis storage moves the update (and its restored part);
* ``--lowrank``: the low-rank factoriser's gap to the optimal rank-r update.

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

from casa_core import layer as L
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
    thr = [r.stats["arbitration_threshold"] for r in refs]
    print(f"   arbitrated entries: before {st_b['arbitrated_entries']}  after {st_a['arbitrated_entries']}  "
          f"references {min(arb)} .. {max(arb)} (mean {statistics.mean(arb):.0f}), LAPACK "
          f"{lapack.stats['arbitrated_entries']}")
    print(f"   candidates: top block {top_cand} (all paths); complement before {st_b['candidates'] - top_cand} "
          f"(compact C_F complement holds {zeros} exact zeros of {comp_cf.numel()}), after "
          f"{st_a['candidates'] - top_cand}, references {min(cand) - top_cand} .. {max(cand) - top_cand}")
    print(f"   threshold: before {st_b['arbitration_threshold']:.4g}  after {st_a['arbitration_threshold']:.4g}  "
          f"references {min(thr):.4g} .. {max(thr):.4g}")
    same_dom = all(r.stats["dominant_entries"] == st_a["dominant_entries"] for r in refs)
    print(f"   dominant entries: after {st_a['dominant_entries']} of {st_a['entries']} "
          f"({st_a['dominant_entries'] / st_a['entries']:.2%}); references {refs[0].stats['dominant_entries']} "
          f"of {refs[0].stats['entries']}; identical for every completion: {same_dom}; "
          f"before counted {st_b['dominant_entries']} of {st_b['entries']} (compact rows only)")
    print(f"   CASA time for this layer (median of 3): before {t_before * 1e3:.1f} ms  after {t_after * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8960x1536", help="comma-separated out x in shapes")
    ap.add_argument("--completions", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small shapes (768x128, 128x768), 8 completions")
    ap.add_argument("--fixture", choices=("spread", "head"), default="spread",
                    help="spread: drift 1e-2, 80 %% of it spread over all directions, LoRA mostly generic; "
                         "head: drift 2e-2 half in the head directions, LoRA half generic")
    ap.add_argument("--sections", default="fidelity", help="comma-separated: fidelity, storage, lowrank")
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


if __name__ == "__main__":
    main()
