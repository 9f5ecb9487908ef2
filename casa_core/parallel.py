"""Layers side by side on a small CPU.

On a small CPU (at most :data:`casa_core.linalg.SMALL_CPU` cores) one layer's kernel runs on one thread
(:func:`casa_core.linalg.layer_threads`: its operations take milliseconds, and a thread pool's hand-off
costs as much). The other cores are then idle; :func:`map_layers` fills them with the next layers, each in
a thread of its own, torch on one thread for all of them. Measured on 2 cores: 30 per-LoRA layers of
Wan2.1-1.3B shapes in 6.1 s one after the other, 3.0 s two at a time, the same bytes.

Results come back in the items' order; at most ``workers`` items are computed at once, so memory grows by
that many layers at most. Layers of ``linalg.SMALL_LAYER_ENTRIES`` entries or more (Wan-14B's) run alone,
with torch's own thread pool, as before, unless the caller says otherwise (``alone_from``: the per-LoRA
transfer on a 2-core CPU, see :func:`large_side_by_side`). An exception (a clear error, an interruption
raised by the consumer) stops the remaining items: those not started are cancelled, those running are
waited for.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from . import linalg

T = TypeVar("T")
R = TypeVar("R")

#: the environment variable that sets the number of layers computed at once (1: one after the other)
WORKERS_ENV = "CASA_LAYER_WORKERS"


def layer_workers(device: torch.device | str = "cpu") -> int:
    """How many layers run at once: the cores of a small CPU, else 1 (a GPU, or a CPU large enough for
    torch's own thread pool to pay within a layer); ``CASA_LAYER_WORKERS`` overrides it."""
    if torch.device(device).type != "cpu":
        return 1
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a whole number of layers, got {env!r}") from None
    cores = os.cpu_count() or 1
    return cores if cores <= linalg.SMALL_CPU else 1


def large_side_by_side(device: torch.device | str = "cpu") -> bool:
    """Whether even large layers should go two at a time, one thread each: on a CPU of two cores running two
    layers at once. Measured for the per-LoRA transfer of one block of Wan2.1-14B shapes on 2 cores: 11.9 s
    against 12.9-13.7 s one layer at a time on both threads, the same bytes, the layers' memory doubled
    (1.4 -> 2.8 GiB extra); an exact output (dense products of the layer's full size) gained nothing there.
    Larger CPUs keep torch's own pool for them."""
    return layer_workers(device) == 2 and (os.cpu_count() or 1) <= 2


def concurrent(*providers) -> bool:
    """Whether every provider may be read from several threads at once (``concurrent_reads``: the file
    readers, whose reads are locked or memory-mapped); a provider that does not say so is read one layer
    at a time."""
    return all(getattr(p, "concurrent_reads", False) for p in providers)


def map_layers(fn: Callable[[T], R], items: Iterable[T], size: Callable[[T], int],
               device: torch.device | str = "cpu", workers: int | None = None,
               alone_from: float | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, yielded in order; layers of fewer than ``alone_from`` entries
    (``size(item)``; default ``linalg.SMALL_LAYER_ENTRIES``) ``workers`` at a time (default
    :func:`layer_workers`), the others alone on torch's own thread pool."""
    workers = layer_workers(device) if workers is None else workers
    alone_from = linalg.SMALL_LAYER_ENTRIES if alone_from is None else alone_from
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future] = deque()
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="casa-layer")
    torch.set_num_threads(1)  # for every worker at once (the count is global to the process)
    try:
        for item in items:
            if size(item) >= alone_from:  # a large layer: alone, on torch's own pool
                while pending:
                    yield pending.popleft().result()
                torch.set_num_threads(before)
                try:
                    result = fn(item)
                finally:
                    torch.set_num_threads(1)
                yield result
                continue
            pending.append(pool.submit(fn, item))
            while len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(before)
