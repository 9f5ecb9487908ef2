"""One linear layer in the source's singular coordinates.

Orientation.  Every layer is handled "tall": a weight ``W`` of shape ``m x n`` with ``m < n``
is transposed first, so the working shape is ``M x N`` with ``M >= N``.  Transposing swaps the
roles of receivers and senders, and CASA's rules are symmetric under that swap (the dominant
mask is "row dominant OR column dominant", the cluster graph is undirected, the quantiles are
taken over the same sets), so the result is simply transposed back.

Basis.  The thin SVD ``W = U diag(S) V^T`` (``U: M x N``, ``V: N x N``).  The reference code
stores the full ``M x M`` ``U`` of the FFN layers (8960 x 8960 for Wan2.1-1.3B); the extra
``M - N`` columns are an arbitrary completion of ``U`` that only matters where the drift or the
LoRA has components outside the column space of ``W``.

Completion (what we use instead of LAPACK's).  Rows of the routing matrices beyond ``N`` are
coordinates in the orthogonal complement of ``span(U)``.  We use, in this order:

1. ``Q2``: an orthonormal basis of the drift's own complement part ``E = (I - U U^T) dF V``,
   from the QR decomposition of ``E`` (so ``C_F`` there is the triangular ``R``: Gram-Schmidt
   order follows ``V``'s singular directions), or, when ``E`` is numerically rank-deficient (a
   drift coming from a distillation LoRA), from its principal directions with negligible ones
   dropped.  Computed once per drift.
2. ``Q3``: an orthonormal basis of what is left of the LoRA after removing ``span(U, Q2)``
   (at most its rank); there ``C_F = 0``.  Computed per LoRA.
3. Everything else is orthogonal to both the drift and the LoRA: ``C_L = C_F = 0`` and any
   method leaves it at zero, so it is never materialised.

With square layers no completion is needed.  Handed the reference's full bases, the routing
code (:mod:`casa_core.routing`) reproduces the reference exactly; see ``tests``.

Non-square layers' arbitration does not use these rows entry by entry: it is the expectation
over uniformly random completions of ``U`` (:mod:`casa_core.completion`), which needs only the
basis-invariant per-column quantities of the drift's and the LoRA's complement parts, so the
particular ``Q2``/``Q3`` above (and the triangular ``C_F`` of the QR) no longer matter.

Float16 storage.  ``U`` and ``V`` read back from a float16 cache are orthonormal only to about
5e-4; plain projections ``U^T x V`` would then rebuild the drift and the LoRA with that error
(restoration off by ~4.8e-4 of the update).  Such a basis is marked ``refine``: coordinates are
solved for with one residual-refinement step (``c = U^T x``; ``c += U^T (x - U c)``), which makes
``U C V^T`` reproduce the drift and the LoRA to float32 rounding at ``O(M N r)`` extra cost per
LoRA (a few extra ``N x N`` products per layer once, for the drift).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import linalg

# A complement QR whose smallest |R_ii| is below this share of the largest is treated as
# rank-deficient: the QR's Q would then contain arbitrary directions.
RANK_DEFICIENT_RTOL = 1e-4


@dataclass
class LayerBasis:
    """Thin SVD of one source weight, in tall orientation."""

    name: str
    shape: tuple[int, int]  # original (out, in)
    U: torch.Tensor  # M x N
    S: torch.Tensor  # N
    V: torch.Tensor  # N x N
    # U and V decoded from float16 storage: orthonormal only to ~5e-4, so coordinates are solved
    # for (least squares, one refinement step) rather than taken as plain projections
    refine: bool = False

    @property
    def transposed(self) -> bool:
        return self.shape[0] < self.shape[1]

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]

    @property
    def tall_shape(self) -> tuple[int, int]:
        return (max(self.shape), min(self.shape))

    def to(self, device: torch.device) -> "LayerBasis":
        return LayerBasis(self.name, self.shape, self.U.to(device), self.S.to(device), self.V.to(device), self.refine)

    def left_coords(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates ``c`` with ``U c`` the part of ``x`` (``M x q``) in ``span(U)``: ``U^T x``,
        refined once by the residual when ``U`` is only nearly orthonormal."""
        c = self.U.T @ x
        if self.refine:
            c = c + self.U.T @ (x - self.U @ c)
        return c

    def right_coords(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates ``y`` with ``y V^T = x`` for ``x: q x N``: ``x V``, refined likewise."""
        y = x @ self.V
        if self.refine:
            y = y + (x - y @ self.V.T) @ self.V
        return y


def tall(w: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``w`` (given in the original ``out x in`` orientation) in tall orientation."""
    return w.T if shape[0] < shape[1] else w


def compute_basis(name: str, w: torch.Tensor) -> LayerBasis:
    """Thin SVD of a weight given as ``out x in`` float32."""
    shape = (int(w.shape[0]), int(w.shape[1]))
    with linalg.layer_threads(w.numel(), w.device):
        u, s, vh = linalg.svd(tall(w, shape))
    return LayerBasis(name, shape, u, s, vh.T.contiguous())


@dataclass
class Complement:
    """Coordinates of the drift outside ``span(U)``: an orthonormal ``q`` (``M x n2``) and
    ``c_f = q^T dF V`` (``n2 x N``; upper triangular when ``q`` comes from a QR of the drift)."""

    c_f: torch.Tensor
    q: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.c_f.shape[0])

    def coords(self, x: torch.Tensor, refine: bool = False) -> torch.Tensor:
        """``Q2^T x`` for ``x: M x r`` (refined once by the residual, as
        :meth:`LayerBasis.left_coords`, when ``Q2`` was read back from float16)."""
        c = self.q.T @ x
        if refine:
            c = c + self.q.T @ (x - self.q @ c)
        return c

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        """``Q2 c`` for ``c: n2 x r``."""
        return self.q @ c


@dataclass
class LayerDrift:
    """``C_F`` of one layer: the top ``N x N`` block and, for non-square layers, the complement."""

    name: str
    c_f: torch.Tensor  # N x N  (U^T dF V)
    complement: Complement | None = None


def compute_drift(basis: LayerBasis, d_f: torch.Tensor) -> LayerDrift:
    """``C_F`` from the drift ``dF = W_t - W_s`` given as ``out x in`` float32."""
    with linalg.layer_threads(d_f.numel(), d_f.device):
        return _compute_drift(basis, d_f)


def _compute_drift(basis: LayerBasis, d_f: torch.Tensor) -> LayerDrift:
    d = tall(d_f, basis.shape)
    dv = basis.right_coords(d)
    c_f = basis.left_coords(dv)
    if basis.square:
        return LayerDrift(basis.name, c_f)
    e = dv - basis.U @ c_f
    return LayerDrift(basis.name, c_f, complement_of(e))


def compute_drift_factored(basis: LayerBasis, left: torch.Tensor, right: torch.Tensor) -> LayerDrift:
    """:func:`compute_drift` of a drift given as ``left @ right`` (``out x k``, ``k x in``), in ``O(mnk)``:
    the coordinates are linear, so ``C_F = (U^T A)(B V)`` in tall orientation (``dF = A B``), each factor
    refined as the dense path refines the product; the complement is that of ``(A - U U^T A)(B V)``, from a
    QR of its ``M x k`` factor and the rank-revealing basis of a ``k x N`` matrix."""
    with linalg.layer_threads(left.shape[0] * right.shape[1], left.device):
        a, b = (right.T, left.T) if basis.transposed else (left, right)
        bv = basis.right_coords(b.float())  # k x N
        ua = basis.left_coords(a.float())  # N x k
        c_f = ua @ bv
        if basis.square:
            return LayerDrift(basis.name, c_f)
        ea = a.float() - basis.U @ ua  # M x k, the drift's rows outside span(U), as a factor
        q1, r1 = linalg.qr(ea)
        return LayerDrift(basis.name, c_f, _complement_of_product(q1, r1 @ bv))


def _complement_of_product(q1: torch.Tensor, small: torch.Tensor) -> Complement | None:
    """The complement of ``E = q1 @ small`` (``q1`` orthonormal ``M x k``, ``small``: ``k x N``): the
    rank-revealing basis of ``small`` (:func:`casa_core.linalg.orthonormal_columns`), mapped by ``q1``."""
    y, c = linalg.orthonormal_columns(small)
    return Complement(c_f=c, q=(q1 @ y).contiguous()) if y.shape[1] else None


def drift_dense(basis: LayerBasis, drift: LayerDrift) -> torch.Tensor:
    """``dF`` rebuilt from its coordinates, ``out x in`` (for checks and benchmarks)."""
    w = basis.U @ drift.c_f
    if drift.complement is not None:
        w = w + drift.complement.expand(drift.complement.c_f)
    w = w @ basis.V.T
    return w.T if basis.transposed else w


def complement_of(e: torch.Tensor) -> Complement | None:
    """Orthonormal coordinates of ``E`` (``M x N``, orthogonal to ``span(U)``)."""
    if float(torch.linalg.matrix_norm(e)) == 0.0:
        return None
    q, r = linalg.qr(e)
    diag = r.diagonal().abs()
    if diag.numel() and float(diag.min()) > RANK_DEFICIENT_RTOL * float(diag.max()):
        return Complement(c_f=r, q=q)
    q, c = linalg.orthonormal_columns(e)
    return Complement(c_f=c, q=q) if q.shape[1] else None


@dataclass
class Coordinates:
    """The routing coordinates of one layer for one LoRA.

    Rows: ``[U | Q2 | Q3]`` (``Q2``/``Q3`` only for non-square layers); columns: ``V``.
    ``c_l = rows_l @ right`` is kept factored so that a low-rank LoRA costs ``O(r)``.
    """

    basis: LayerBasis
    drift: LayerDrift
    rows_l: torch.Tensor  # R x q : coordinates of the LoRA's left factor
    right: torch.Tensor  # q x N : the LoRA's right factor in V coordinates
    q3: torch.Tensor | None  # M x r3

    @property
    def n_top(self) -> int:
        return self.basis.S.numel()

    @property
    def n_comp(self) -> int:
        return self.drift.complement.size if self.drift.complement is not None else 0

    @property
    def rows(self) -> int:
        return int(self.rows_l.shape[0])

    def c_l(self) -> torch.Tensor:
        return self.rows_l @ self.right

    def c_f(self) -> torch.Tensor:
        parts = [self.drift.c_f]
        if self.drift.complement is not None:
            parts.append(self.drift.complement.c_f)
        pad = self.rows - sum(p.shape[0] for p in parts)
        if pad:
            parts.append(self.drift.c_f.new_zeros(pad, self.drift.c_f.shape[1]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def source_rows(self) -> torch.Tensor:
        """``diag(S)`` in these coordinates (``R x N``): the source weight's routing."""
        out = self.drift.c_f.new_zeros(self.rows, self.n_top)
        out[: self.n_top].diagonal().copy_(self.basis.S)
        return out

    def expand_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Map row coordinates (``R x q``) back to the tall output space (``M x q``)."""
        n, n2 = self.n_top, self.n_comp
        out = self.basis.U @ x[:n]
        if n2:
            out = out + self.drift.complement.expand(x[n : n + n2])
        if self.q3 is not None and self.q3.shape[1]:
            out = out + self.q3 @ x[n + n2 :]
        return out

    def to_dense(self, c: torch.Tensor) -> torch.Tensor:
        """``rows C V^T`` in the original ``out x in`` orientation."""
        w = self.expand_rows(c) @ self.basis.V.T
        return w.T if self.basis.transposed else w

    def to_factors(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` with ``up @ down = rows (left @ right) V^T`` in ``out x in`` orientation."""
        b = self.expand_rows(left)
        a = right @ self.basis.V.T
        if self.basis.transposed:
            return a.T.contiguous(), b.T.contiguous()
        return b, a


def coordinates(
    basis: LayerBasis, drift: LayerDrift, left: torch.Tensor, right: torch.Tensor | None = None
) -> Coordinates:
    """Routing coordinates of an update ``dL = left @ right`` given in ``out x in`` orientation.

    A LoRA passes ``left = up * scale`` (``out x r``) and ``right = down`` (``r x in``); a dense
    update (LoHa, LoKr, a full delta) passes ``left = delta`` and no ``right``.
    """
    m, n = basis.shape
    with linalg.layer_threads(m * n, left.device):
        return _coordinates(basis, drift, left, right)


def _coordinates(
    basis: LayerBasis, drift: LayerDrift, left: torch.Tensor, right: torch.Tensor | None = None
) -> Coordinates:
    if right is None:
        left = tall(left, basis.shape)
        right_v = basis.V
        if basis.refine:  # the dense update's right factor is the identity
            right_v = basis.right_coords(torch.eye(right_v.shape[0], dtype=right_v.dtype, device=right_v.device))
    else:
        if basis.transposed:
            left, right = right.T, left.T
        right_v = basis.right_coords(right)  # q x N
    top = basis.left_coords(left)  # N x q
    if basis.square:
        return Coordinates(basis, drift, top, right_v, None)
    rest = left - basis.U @ top
    parts = [top]
    comp = drift.complement
    if comp is not None:
        c2 = comp.coords(rest, refine=basis.refine)
        rest = rest - comp.expand(c2)
        parts.append(c2)
    q3, r3 = linalg.orthonormal_columns(rest, ref_norm=float(torch.linalg.matrix_norm(left)))
    parts.append(r3)
    return Coordinates(basis, drift, torch.cat(parts), right_v, q3)
