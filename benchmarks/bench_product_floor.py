"""The floor of a low-rank per-LoRA transfer on this machine: the dense products it cannot do without.

For one block of Wan2.1 shapes (8 square attention layers of ``dim x dim`` and the two FFN layers, whose
routing update in compact coordinates is ``(dim + complement) x dim``: the top block and the complement rows
of the drift and the LoRA; ``--complement`` sets their number, by default ``dim``, a real distillation's
full-rank drift; the benchmark's synthetic drift has few, e.g. 48 at 14B), this times only:

* the range finder's four products with the routing update (one power step; ``rank`` plus 16 columns),
* the residual product (the report's kept share),
* mapping the two factors back to weight space (``U @ left``, ``right @ V^T``),

on random matrices of those shapes, layers two at a time on one thread each as the transfer runs them on
a 2-core CPU (``--workers``). Everything else the transfer does (cache reads, coordinates, CASA's
entry-wise passes) comes on top. The whole-model figure is the block's times the model's blocks.

``--cache DIR`` also times reading a basis and drift cache as a transfer reads it (every tensor of every
``.safetensors`` file under DIR, converted to float32, two files at a time), e.g. the cache that
``bench_wan13b.py --keep`` leaves, scaled from its ``--cache-blocks`` to ``--model-blocks``.

    python benchmarks/bench_product_floor.py                 # 1.3B and 14B shapes
    python benchmarks/bench_product_floor.py --shapes 5120,13824,40
    python benchmarks/bench_product_floor.py --cache bench_out/w13b/cache --cache-blocks 3 --model-blocks 30
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

SHAPES = {"1.3B": (1536, 8960, 30), "14B": (5120, 13824, 40)}


def layer_inputs(rows: int, n: int, m_out: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random matrices of one layer's shapes: the routing update ``c``, the range finder's start, ``U``,
    ``V`` and the two factors."""
    return (torch.randn(rows, n, generator=gen), torch.randn(n, rank + 16, generator=gen),
            torch.randn(m_out, n, generator=gen), torch.randn(n, n, generator=gen),
            torch.randn(n, rank, generator=gen), torch.randn(rank, n, generator=gen))


def layer_products(c, omega, u, v, left, right, rank: int) -> None:
    y = c @ omega
    z = c.T @ y
    y = c @ z
    z = c.T @ y
    resid = c - y[:, :rank] @ z[:, :rank].T  # noqa: F841  (the residual product)
    up = u @ left  # noqa: F841
    down = right @ v.T  # noqa: F841


def block_floor(dim: int, ffn: int, rank: int, workers: int, complement: int | None = None) -> float:
    """Wall seconds of one block's products; the inputs (one set per layer shape, read by every layer of
    that shape) are drawn beforehand."""
    gen = torch.Generator().manual_seed(0)
    square = layer_inputs(dim, dim, dim, rank, gen)
    wide = layer_inputs(dim + (dim if complement is None else complement), dim, ffn, rank, gen)
    layers = [square] * 8 + [wide] * 2
    before = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else before)
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda x: layer_products(*x, rank), layers))
        return time.perf_counter() - t
    finally:
        torch.set_num_threads(before)


def read_cache(folder: Path, workers: int) -> tuple[float, int]:
    """Wall seconds and bytes of reading every tensor under ``folder`` into float32."""
    files = sorted(folder.rglob("*.safetensors"))

    def read(path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key).float()

    size = sum(p.stat().st_size for p in files)
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(read, files))
    return time.perf_counter() - t, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", action="append", help="dim,ffn_dim,blocks (default: Wan2.1 1.3B and 14B)")
    ap.add_argument("--rank", type=int, default=128, help="rank of the low-rank output")
    ap.add_argument("--workers", type=int, default=2, help="layers at once, one thread each (1: torch's pool)")
    ap.add_argument("--complement", type=int, help="complement rows of an FFN layer's routing update (default: dim)")
    ap.add_argument("--cache", type=Path, help="a basis + drift cache folder to time the reading of")
    ap.add_argument("--cache-blocks", type=int, default=1, help="blocks the cache holds")
    ap.add_argument("--model-blocks", type=int, default=30, help="blocks of the whole model")
    a = ap.parse_args()
    shapes = ({s: tuple(int(x) for x in s.split(",")) for s in a.shapes} if a.shapes else SHAPES)
    comp = "dim" if a.complement is None else a.complement
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rank {a.rank}, {a.workers} layer(s) at once, "
          f"FFN complement rows {comp}")
    for label, (dim, ffn, blocks) in shapes.items():
        wall = block_floor(dim, ffn, a.rank, a.workers, a.complement)
        print(f"{label}: products of one block {wall:.2f} s; "
              f"whole model ({blocks} blocks): {wall * blocks:.1f} s", flush=True)
    if a.cache is not None:
        read_cache(a.cache, a.workers)  # once to warm the page cache (a transfer after the drift finds it warm)
        wall, size = read_cache(a.cache, a.workers)
        f = a.model_blocks / a.cache_blocks
        print(f"reading {a.cache} ({size / 2**30:.2f} GiB) into float32: {wall:.2f} s; whole model "
              f"({a.model_blocks} blocks): {wall * f:.1f} s for {size * f / 2**30:.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
