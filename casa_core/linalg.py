"""Small linear-algebra helpers shared by the basis, drift and transfer code.

Everything here runs in float32 on the caller's device and falls back to the CPU for
operations a device lacks (``linalg_svd``, ``linalg_eigh`` or ``linalg_qr`` on MPS or an Ascend NPU,
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


def qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR decomposition in float32."""
    return _on_cpu_fallback(torch.linalg.qr, a.float())


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
    def kth(i: int) -> torch.Tensor:
        return _on_cpu_fallback(lambda t: torch.kthvalue(t, i).values, x)

    v_lo = kth(lo + 1)
    v_hi = v_lo if hi == lo else kth(hi + 1)
    return torch.lerp(v_lo, v_hi, torch.tensor(frac, dtype=x.dtype, device=x.device))


def _lu_basis(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of ``span(y)``: the row-permuted unit-lower ``L`` of ``y = P L U``.

    Far cheaper than a QR and enough to keep power iterations from collapsing (the entries of
    ``L`` are bounded by 1 thanks to pivoting); only the last step needs an orthonormal basis.
    """
    lu, pivots = _on_cpu_fallback(torch.linalg.lu_factor, y)
    m, k = y.shape
    lower = torch.tril(lu[:, :k], diagonal=-1)
    lower.diagonal().fill_(1.0)
    perm = list(range(m))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    inverse = torch.empty(m, dtype=torch.long)
    inverse[torch.tensor(perm)] = torch.arange(m)
    return lower[inverse.to(lower.device)]


def top_singular(
    c: torch.Tensor, rank: int, power_iters: int = 4, oversample: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of ``c`` (rows x cols), deterministically.

    Randomized subspace iteration (Halko, Martinsson & Tropp) with a fixed-seed start, LU
    normalisation between the power steps and one QR at the end, then an exact SVD of the small
    projected matrix.  When the rank is a sizeable part of the matrix, the exact SVD is cheaper
    and is used instead.  The caller measures the error actually made.
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
    q = _lu_basis(c @ omega)
    for i in range(power_iters):
        z = _lu_basis(c.T @ q)
        y = c @ z
        q = qr(y)[0] if i == power_iters - 1 else _lu_basis(y)
    if power_iters == 0:
        q = qr(q)[0]
    u_s, s, vh = svd(q.T @ c)
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
