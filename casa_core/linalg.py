"""Small linear-algebra helpers shared by the basis, drift and transfer code.

Everything here runs in float32 on the caller's device and falls back to the CPU for
operations a device lacks (``linalg_svd``, ``linalg_eigh`` or ``linalg_qr`` on MPS or an Ascend NPU,
for example).  Nothing uses float64 on the device.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from .errors import CasaError

# A fixed seed for the randomized range finder: the low-rank factorisation must give the same
# bytes on every run with the same inputs.
_RANGE_FINDER_SEED = 20260430


# LAPACK factorisations (QR, SVD, eigh) on the CPU whose smaller side is below this run on one thread.
# Thin panels (the range finder's rows x (rank + 16), its Rayleigh-Ritz (rank + 16) x cols) gain
# nothing from a thread pool and lose to its synchronisation: measured on a 2-core machine, a QR of
# 1536 x 144 took 3 ms on one thread and 50-2000 ms on two when the cores were shared with other
# work; the whole per-LoRA transfer is made of such panels.  Larger factorisations (the one-time
# bases) keep torch's thread count, where a many-core machine does gain from it.
SINGLE_THREAD_BELOW = 1024


@contextlib.contextmanager
def _lapack_threads(*tensors: torch.Tensor):
    """One CPU thread for the factorisation of a small or thin matrix (see ``SINGLE_THREAD_BELOW``)."""
    t = tensors[0]
    if t.device.type != "cpu" or t.dim() < 2 or min(t.shape[-2:]) >= SINGLE_THREAD_BELOW:
        yield
        return
    with _one_thread():
        yield


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread inside the block; the thread count is restored after it."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Whole per-layer kernels (the transfer of one layer, the drift and basis of one layer) on a small CPU
# (at most SMALL_CPU cores) run on one thread when the layer has fewer than SMALL_LAYER_ENTRIES
# entries (Wan2.1-1.3B's layers, the largest 8960 x 1536; 14B's keep the pool).  Their operations take milliseconds each, the
# thread pool's fork and join as long, and on a small machine shared with other work a 2-thread
# pool spins against it: measured on 2 shared cores, one 1536-wide CASA layer took 0.30 s on one
# thread against 0.76 s on two (element-wise passes 2-7x, thin products 4-7x faster).  A pool of two
# gains at most 2x when the machine is idle.
SMALL_CPU = 4
SMALL_LAYER_ENTRIES = 16_000_000


def check_device(device) -> torch.device:
    """``device`` as a :class:`torch.device`; a :class:`~casa_core.errors.CasaError` in one sentence when it names no
    device, or one this torch build or machine cannot use (``cuda`` without CUDA, a GPU index beyond the count)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CasaError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, xpu, npu …)") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, torch.npu (torch_npu)
    try:
        ok = bool(backend.is_available()) if backend is not None and hasattr(backend, "is_available") else False
        count = int(backend.device_count()) if ok and hasattr(backend, "device_count") else None
    except Exception:  # noqa: BLE001 - a backend that cannot even answer is not usable
        ok, count = False, None
    if not ok:
        raise CasaError(f"device {device!r} is not available here (torch {torch.__version__} on this machine cannot "
                        f"use {dev.type}); use 'cpu' or a device it has")
    if dev.index is not None and count is not None and dev.index >= count:
        raise CasaError(f"device {device!r} is not available here: this machine has {count} {dev.type} device(s)")
    return dev


@contextlib.contextmanager
def layer_threads(entries: int, device: torch.device | str = "cpu"):
    """Run one layer's kernel on one CPU thread on a small machine (see ``SMALL_LAYER_ENTRIES``)."""
    dev = torch.device(device)
    if dev.type != "cpu" or entries >= SMALL_LAYER_ENTRIES or (os.cpu_count() or 1) > SMALL_CPU:
        yield
        return
    with _one_thread():
        yield


def _on_cpu_fallback(fn, *tensors: torch.Tensor):
    """Run ``fn`` on the tensors' device; on a device without the operation, on the CPU."""
    device = tensors[0].device
    try:
        return fn(*tensors)
    except (RuntimeError, NotImplementedError):
        if device.type == "cpu":
            raise
        out = fn(*(t.cpu() for t in tensors))
        if isinstance(out, tuple):
            return tuple(o.to(device) for o in out)
        return out.to(device)


def _factorise(fn, a: torch.Tensor):
    """``fn(a)`` on ``a``'s device (CPU fallback), single-threaded on the CPU for small matrices."""
    if a.device.type == "cpu":
        with _lapack_threads(a):
            return fn(a)
    try:
        return fn(a)
    except (RuntimeError, NotImplementedError):
        with _lapack_threads(a.cpu()):
            out = fn(a.cpu())
        return tuple(o.to(a.device) for o in out)


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``w = U diag(S) Vh`` in float32, singular values descending."""
    return _factorise(lambda x: torch.linalg.svd(x, full_matrices=False), w.float())


def eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues ascending."""
    return _factorise(torch.linalg.eigh, sym.float())


def qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR decomposition in float32."""
    return _factorise(torch.linalg.qr, a.float())


def product_norm(left: torch.Tensor, right: torch.Tensor | None) -> float:
    """``||left @ right||_F`` without forming the product: ``sqrt(trace((L^T L)(R R^T)))``, in float64
    (``right`` None: ``||left||_F``)."""
    if right is None:
        return float(torch.linalg.matrix_norm(left))
    lt, rt = left.double(), right.double()
    return float(((lt.T @ lt) * (rt @ rt.T)).sum().clamp_min(0.0).sqrt())


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its size limit or sorting.

    Two order statistics, each one of the values themselves, so the result is the same bit for bit
    whichever way they are found: the lower by :func:`order_statistic`, the upper as the next value up
    (the lower again when it is tied, else the smallest value above it). Deterministic for any size.
    """
    x = values.reshape(-1)
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty set")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = order_statistic(x, lo)
    if hi == lo or bool(torch.isnan(v_lo)):
        v_hi = v_lo
    elif int(torch.count_nonzero(x <= v_lo)) > hi:  # ties: the next order statistic is the same value
        v_hi = v_lo
    else:
        above = x[x > v_lo]
        v_hi = above.min() if above.numel() else order_statistic(x, hi)  # (none above: NaNs) as kthvalue has it
    return torch.lerp(v_lo, v_hi, torch.tensor(frac, dtype=x.dtype, device=x.device))


# order_statistic: a direct kthvalue below this many values; above, a window from a strided sample first
SELECT_DIRECT = 1 << 18
SELECT_SAMPLE = 1 << 15


def order_statistic(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The value of 0-based ``rank`` in ascending order of the flat ``x`` (``torch.kthvalue(x, rank + 1)``).

    Large inputs: a strided sample of ``SELECT_SAMPLE`` values gives a window of values that holds the
    wanted rank with near certainty (the sample's order statistics a few standard deviations either side
    of it); the values below the window are counted, those inside it selected, and ``kthvalue`` runs on
    those alone: a few passes over ``x`` instead of a selection over all of it (measured on one thread of
    a 2-core CPU: the two order statistics of :func:`exact_quantile` on 5 M values, 110 ms -> 30 ms). When
    the window misses (by chance only, on finite values; NaNs fall outside every window) ``kthvalue`` runs
    on everything. Always exact."""
    n = x.numel()

    def kth(t: torch.Tensor, i: int) -> torch.Tensor:  # i: 1-based
        return _on_cpu_fallback(lambda u: torch.kthvalue(u, i).values, t)

    if n <= SELECT_DIRECT:
        return kth(x, rank + 1)
    step = n // SELECT_SAMPLE
    sample = x[::step]
    m = sample.numel()
    p = (rank + 0.5) / n
    spread = 5.0 * math.sqrt(m * p * (1.0 - p)) + 8.0
    i_lo = max(0, int(math.floor(p * m - spread)))
    i_hi = min(m - 1, int(math.ceil(p * m + spread)))
    a = kth(sample, i_lo + 1) if i_lo > 0 else None
    b = kth(sample, i_hi + 1) if i_hi < m - 1 else None
    inside = torch.ones_like(x, dtype=torch.bool) if a is None else x >= a
    if b is not None:
        inside &= x <= b
    below = 0 if a is None else int(torch.count_nonzero(x < a))
    window = x[inside]
    if below <= rank < below + window.numel():
        return kth(window, rank - below + 1)
    return kth(x, rank + 1)


# Subspace iteration: Rayleigh-Ritz residuals of the leading pairs at this share of the largest
# singular value are float32 rounding (measured floor ~5e-7 on 1536-wide routing matrices).
RITZ_RTOL = 2e-6
# Iteration budget: WORK_COLUMNS / width power steps (at rank 128, width 144: 4 steps; at rank 16, 20
# steps), at least MIN_ITERS, at most MAX_ITERS.  Residuals are checked after the first step and then every
# CHECK_EVERY steps; it stops early once converged, or once the Ritz values show that the budget cannot
# reach convergence (a flat spectrum around the rank).
WORK_COLUMNS = 640
MIN_ITERS, MAX_ITERS = 4, 64
CHECK_EVERY = 4
# After the first step the iteration stops, unconverged, only where the spectrum is flat across the rank:
# Ritz values with (s_width / s_rank)^2 >= FLAT_RATE. A residual's excess over the optimal one shrinks by
# about that factor per step, so the budget's further steps could remove at most 1 - FLAT_RATE^3 of it (at
# rank 128), and there they exchange near-equal directions. Measured on CASA updates of Wan2.1-1.3B shapes
# (rank 128 over the drift's restoration floor, (s_width / s_rank)^2 = 0.87-0.90): after one step the
# residual is 2-6 % above the optimal one (a relative error of ~1e-4 in the patch, a fifth of the float16
# rounding of the factors written), after four 0.5 %; the bfloat16 warm-up this replaces left 4-35 %.
FLAT_RATE = 0.75
# Unconverged on a matrix this small (min dimension): the exact SVD is cheap, use it.
EXACT_SMALL = 512


def _rayleigh_ritz(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, s, vh)`` with ``q^T c = u diag(s) vh`` from ``z = c^T q`` (cols x width), through the SVD of the
    tall ``z`` itself (twice as fast as that of its transpose in LAPACK): ``z = a diag(s) b^T`` gives
    ``q^T c = b diag(s) a^T``."""
    a, s, bh = svd(z)
    return q @ bh.T, s, a.T


def top_singular(
    c: torch.Tensor, rank: int, oversample: int | None = None, max_iters: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of ``c`` (rows x cols), deterministically.

    Randomized subspace iteration (Halko, Martinsson & Tropp) from a fixed-seed start, float32 throughout,
    with a QR after every power step and a Rayleigh-Ritz step (an exact SVD of the small projected
    matrix) after the first step and every ``CHECK_EVERY`` steps.  It stops once the residuals
    ``||c v_i - s_i u_i||`` of the ``rank`` leading Ritz pairs are float32 rounding (``RITZ_RTOL`` of
    ``s_1``): the result is then the optimal rank-``rank`` approximation to float32 rounding, as close to
    it as LAPACK's own float32 SVD, even where singular values ``rank`` and ``rank + 1`` nearly coincide
    (a gap of 0.25 % took 16-20 steps at rank 16).  The number of steps is capped by a budget
    (``WORK_COLUMNS``) and the iteration also stops when the Ritz values show that the budget cannot reach
    convergence: after the first step only where the spectrum is flat around the rank (``FLAT_RATE``),
    later wherever the budget would not suffice.  There the result is not optimal: on CASA updates (a
    LoRA over the drift's flat restoration floor) the energy is within ~1e-6 of the optimum and the
    directions kept are near-interchangeable members of that floor; an exact SVD would cost ~8x more
    (tests/core/test_factorize.py and benchmarks/bench_ffn_fidelity.py measure both).  Exact SVD is used
    where it is cheap: when the rank is a sizeable part of the matrix, or, unconverged, on matrices up to
    ``EXACT_SMALL`` wide.  No step depends on the machine's bfloat16 support, so the bytes are the same
    on every CPU.
    """
    rows, cols = c.shape
    small = min(rows, cols)
    rank = max(0, min(rank, small))
    if rank == 0:
        return c.new_zeros(rows, 0), c.new_zeros(0), c.new_zeros(0, cols)
    over = 16 if oversample is None else oversample
    width = min(rank + over, small)
    if width * 3 >= small:
        u, s, vh = svd(c)
        return u[:, :rank], s[:rank], vh[:rank]
    iters = max_iters if max_iters is not None else min(MAX_ITERS, max(MIN_ITERS, WORK_COLUMNS // width))
    iters = max(iters, 1)
    gen = torch.Generator(device="cpu").manual_seed(_RANGE_FINDER_SEED)
    omega = torch.randn(cols, width, generator=gen).to(c.device, c.dtype)
    q = qr(c @ omega)[0]
    y = c @ (c.T @ q)  # the first power step
    converged = False
    for it in range(1, iters + 1):
        q = qr(y)[0]
        z = c.T @ q  # cols x width: (q^T c)^T
        if it != 1 and it % CHECK_EVERY and it < iters:
            y = c @ z
            continue
        left, s, vh = _rayleigh_ritz(q, z)
        left = left[:, :rank]
        if it == iters:
            break
        flat = it == 1 and float(s[rank - 1]) > 0 and (float(s[-1]) / float(s[rank - 1])) ** 2 >= FLAT_RATE
        if flat and small > EXACT_SMALL:
            # it stops here converged or not, and only a small matrix's fallback asks which: the residual
            # product (a fifth of the work on CASA updates, flat around the rank) is not needed
            break
        y = c @ vh.T  # c v_i: the residuals, and the next power step (it spans c c^T q)
        resid = float(torch.linalg.vector_norm(y[:, :rank] - left * s[:rank], dim=0).max())
        target = RITZ_RTOL * float(s[0])
        if resid <= target:
            converged = True
            break
        # residuals shrink by about (s_width / s_rank+1)^2 per step
        rate = (float(s[-1]) / float(s[rank])) ** 2 if float(s[rank]) > 0 else 0.0
        if it == 1:
            if flat:  # flat across the rank itself (no gap after it that the steps would resolve quickly)
                break
        elif rate >= 1.0 or (rate > 0.0 and it + math.log(target / resid) / math.log(rate) > iters):
            break
    if not converged and small <= EXACT_SMALL:
        u, s, vh = svd(c)
        return u[:, :rank], s[:rank], vh[:rank]
    return left, s[:rank], vh[:rank]


def orthonormal_columns(
    x: torch.Tensor, rel_tol: float = 1e-5, ref_norm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis ``Q`` of the column space of ``x`` and ``R = Q^T x``.

    Rank-revealing (thin SVD): directions whose singular value is below ``rel_tol`` of the
    largest, or of ``ref_norm`` when that is larger, are rounding noise and are dropped, so
    ``Q`` never contains arbitrary directions.
    """
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], 0), x.new_zeros(0, 0)
    y, sig, zh = svd(x)
    scale = max(float(sig[0]) if sig.numel() else 0.0, ref_norm or 0.0)
    keep = sig > rel_tol * scale if scale > 0 else torch.zeros_like(sig, dtype=torch.bool)
    return y[:, keep].contiguous(), sig[keep, None] * zh[keep]
