"""Small linear-algebra helpers shared by the basis, drift and transfer code.

Everything here runs in float32 on the caller's device and falls back to the CPU for
operations a device lacks (``linalg_svd``/``linalg_eigh``/``geqrf`` on MPS or an Ascend NPU,
for example).  Nothing uses float64 on the device.
"""
from __future__ import annotations

import math

import torch

# A fixed seed for the randomized range finder: the low-rank factorisation must give the same
# bytes on every run with the same inputs.
_RANGE_FINDER_SEED = 20260430


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


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``w = U diag(S) Vh`` in float32, singular values descending."""
    return _on_cpu_fallback(lambda x: torch.linalg.svd(x, full_matrices=False), w.float())


def eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues ascending."""
    return _on_cpu_fallback(torch.linalg.eigh, sym.float())


def geqrf(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR in LAPACK's packed form (R above the diagonal, reflectors below)."""
    return _on_cpu_fallback(torch.geqrf, a.float())


def apply_q(packed: torch.Tensor, tau: torch.Tensor, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Multiply ``x`` by the Householder ``Q`` (``Q^T x`` when ``transpose``) without forming ``Q``."""
    return _on_cpu_fallback(
        lambda p, t, y: torch.ormqr(p, t, y, left=True, transpose=transpose), packed, tau, x
    )


def householder_tau(packed: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Recompute ``tau = 2 / ||v||^2`` from stored reflectors.

    After the reflectors were rounded for storage, this makes every ``I - tau v v^T`` exactly
    orthogonal again (in the working precision), so ``Q`` stays orthonormal.
    """
    n = tau.numel()
    below = torch.tril(packed[:, :n], diagonal=-1)
    vnorm2 = 1.0 + (below * below).sum(dim=0)
    return torch.where(tau == 0, torch.zeros_like(tau), 2.0 / vnorm2)


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its size limit or sorting.

    Two order statistics by ``kthvalue``; deterministic for any size.
    """
    x = values.reshape(-1)
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty set")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(x, lo + 1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(x, hi + 1).values
    return torch.lerp(v_lo, v_hi, torch.tensor(frac, dtype=x.dtype, device=x.device))


def top_singular(
    c: torch.Tensor, rank: int, power_iters: int = 6, oversample: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of ``c`` (rows x cols), deterministically.

    Subspace iteration with a fixed-seed start and re-orthonormalisation at every step,
    then an exact SVD of the small projected matrix.  When the rank is a sizeable part of the
    matrix, the exact SVD is cheaper and is used instead.
    """
    rows, cols = c.shape
    small = min(rows, cols)
    rank = max(0, min(rank, small))
    if rank == 0:
        return c.new_zeros(rows, 0), c.new_zeros(0), c.new_zeros(0, cols)
    width = rank + oversample
    if width * 3 >= small:
        u, s, vh = svd(c)
        return u[:, :rank], s[:rank], vh[:rank]
    gen = torch.Generator(device="cpu").manual_seed(_RANGE_FINDER_SEED)
    omega = torch.randn(cols, width, generator=gen).to(c.device, c.dtype)
    y = c @ omega
    q = torch.linalg.qr(y).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(c.T @ q).Q
        q = torch.linalg.qr(c @ z).Q
    small_mat = q.T @ c
    u_s, s, vh = svd(small_mat)
    return q @ u_s[:, :rank], s[:rank], vh[:rank]


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
