"""CASA on the complement rows of a non-square layer, averaged over every valid completion of ``U``.

Why.  A tall layer (``M x N``, ``M > N``) has ``D = M - N`` routing rows beyond ``span(U)``; the
reference code uses LAPACK's completion of ``U`` for them, but any orthonormal completion is
equally valid, and CASA's arbitration is entry-wise, so the result depends on which one is
used: handed random valid completions, the reference's update moves by several per cent and
the set of arbitrated entries changes.  What does *not* depend on the completion:

* the clusters, the densities and the dominant mask (all decided inside the ``N x N`` top
  block, since ``k = N`` on non-square layers): complement rows are dominant exactly in the
  dominant sending columns;
* restoration (``C_L - C_F`` on a whole column of complement rows is the same vector in any
  basis of the complement).

What does: in a dominant column ``j``, the complement part of the drift ``e_j`` and of the LoRA
``l_j`` (vectors in the ``D``-dimensional complement) are split into ``D`` entries
``x_t = w_t . e_j``, ``y_t = w_t . l_j`` by the completion's basis ``w_1 .. w_D``, and each entry is
a candidate (same sign), scored ``|x_t y_t|`` against the layer's global ``q_act`` threshold, and
arbitrated on its own.

What we compute instead: the *expectation* of the reference's result over a uniformly random
(Haar) completion, column by column, in closed form.  Each ``w_t`` is marginally uniform on the
unit sphere of the complement, and only its projection onto ``span(e_j, l_j)`` matters: in that
plane ``sqrt(D) * w`` has a uniform angle and a squared radius ``R^2`` with
``P(R^2 > t) = (1 - t/D)^((D-2)/2)`` (exact for the sphere; ``exp(-t/2)`` as ``D`` grows).  So,
for a fixed threshold ``theta``:

* expected candidates in the column: ``D * (pi - psi) / pi`` with ``cos psi = rho``, the
  correlation of ``e_j`` and ``l_j`` (the share of same-sign pairs);
* expected candidates above ``theta``: ``D * P(R^2 h(phi) > theta D / (|e||l|))``, an integral over
  the angle with ``h(phi) = cos(phi) cos(phi - psi)``;
* the expected update ``E[sum_t w_t g(x_t, y_t)] = alpha_j e_j + beta_j l_j``: it lies in
  ``span(e_j, l_j)`` (the rest of ``w`` averages out), with two angle integrals of the
  arbitration rule ``g`` (``y - x`` where ``|y| > |x|``, else ``0``, on arbitrated entries).

The threshold is the ``q_act`` quantile of the mixture: the top block's candidates (explicit
scores) and every dominant column's expected candidates (their score distribution above), found
by bracketed regula falsi on ``log theta``.  The top block is then arbitrated entry by entry
exactly as the reference does.  The one approximation: the reference's threshold is a random
order statistic of its completion's entries, here it is the quantile of their distribution (the
reference's own threshold moves by ~0.1 % between completions at Wan shapes).

The result is completion-invariant by construction (it needs only ``|e_j|``, ``|l_j|``,
``e_j . l_j`` and the vectors themselves, in any orthonormal basis of the complement: the compact
rows of :mod:`casa_core.layer` serve), costs a few vector integrals per layer instead of
``M x M`` bases, and sits at the centre of the reference's spread over random completions rather
than at one random point of it: against ``K`` random-completion references it lands about as far
from their mean as their mean is from the expectation (``~ spread / sqrt(K)``), where each
reference lies a whole spread from the others (measured in ``tests/core/test_ffn_fidelity.py``
and ``benchmarks/bench_ffn_fidelity.py``).  Arbitrated and candidate counts are expected counts,
made whole per column by largest remainders (:func:`casa_core.routing.casa_update`).

Degenerate columns: where ``e_j = 0`` or ``l_j = 0`` no complement entry can be a candidate
(``sign(0)`` differs from a non-zero sign), so the column has none (the reference's exact-zero
pairs ``e_j = l_j = 0``, candidates of score 0 made only of rounding noise, are not counted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

QUAD_NODES = 64  # Gauss-Legendre nodes per angular segment (integrands are smooth)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(QUAD_NODES)
COLLINEAR_S = 1e-7  # sin(psi) below this: e_j and l_j are treated as collinear
BISECTION_STEPS = 64
THRESHOLD_RTOL = 1e-6  # the reference's own threshold moves by ~1 % between completions


@dataclass
class ComplementColumns:
    """The complement part of every column of one layer, in the quantities the expectation needs.

    ``a = |e_j|``, ``b = |l_j|``, ``rho = e_j . l_j / (a b)`` (float64, length ``N``), ``dim = D``,
    ``active`` marks the dominant columns whose complement entries can be candidates.
    """

    a: np.ndarray
    b: np.ndarray
    rho: np.ndarray
    dim: int
    active: np.ndarray

    @classmethod
    def from_column_stats(cls, ee, ll, el, dim: int, dominant_cols) -> ComplementColumns:
        """From the per-column ``|e_j|^2``, ``|l_j|^2`` and ``e_j . l_j``."""
        a = np.sqrt(np.maximum(np.asarray(ee, dtype=np.float64), 0.0))
        b = np.sqrt(np.maximum(np.asarray(ll, dtype=np.float64), 0.0))
        ab = a * b
        rho = np.where(ab > 0, np.asarray(el, dtype=np.float64) / np.where(ab > 0, ab, 1.0), 0.0).clip(-1.0, 1.0)
        active = np.asarray(dominant_cols, dtype=bool) & (ab > 0)
        return cls(a, b, rho, int(dim), active)

    @classmethod
    def from_blocks(cls, e, l, dim: int, dominant_cols) -> ComplementColumns:
        """``e``/``l``: the complement rows of ``C_F``/``C_L`` (``p x N``, any orthonormal basis)."""
        e = np.asarray(e, dtype=np.float64)
        l = np.asarray(l, dtype=np.float64)
        return cls.from_column_stats((e * e).sum(0), (l * l).sum(0), (e * l).sum(0), dim, dominant_cols)

    # ---------------------------------------------------------------- counts ------------
    def expected_candidates(self) -> np.ndarray:
        """Per column: expected number of same-sign (candidate) complement entries."""
        psi = np.arccos(self.rho)
        return np.where(self.active, self.dim * (math.pi - psi) / math.pi, 0.0)

    def expected_above(self, theta: float) -> np.ndarray:
        """Per column: expected number of candidates whose score ``|x y|`` exceeds ``theta``."""
        if theta <= 0.0:
            return self.expected_candidates()
        idx = np.nonzero(self.active)[0]
        out = np.zeros_like(self.a)
        if idx.size == 0:
            return out
        a, b, rho = self.a[idx], self.b[idx], self.rho[idx]
        u = 2.0 * theta / (a * b)  # t / D at cos(omega) + rho = 1
        w0 = np.arccos(np.clip(u - rho, -1.0, 1.0))  # where h reaches theta/(R^2_max ...): support
        omega = w0[:, None] * (_NODES[None, :] + 1.0) / 2.0
        c = 1.0 - u[:, None] / np.maximum(rho[:, None] + np.cos(omega), 1e-300)
        p = _tail(c, self.dim)
        out[idx] = self.dim * (p @ _WEIGHTS) * (w0 / 2.0) / math.pi
        return out

    # ---------------------------------------------------------------- update ------------
    def expected_update(self, theta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(alpha, beta, arbitrated)``: the expected complement column of ``C_new`` is
        ``alpha_j e_j + beta_j l_j`` (``0, 1`` where nothing can be arbitrated) and
        ``arbitrated_j`` its expected number of arbitrated entries, at threshold ``theta``."""
        n = self.a.size
        alpha, beta, arb = np.zeros(n), np.ones(n), np.zeros(n)
        idx = np.nonzero(self.active)[0]
        if idx.size == 0:
            return alpha, beta, arb
        a, b, rho = self.a[idx], self.b[idx], self.rho[idx]
        d = self.dim
        psi = np.arccos(rho)
        s = np.sqrt(np.maximum(0.0, 1.0 - rho * rho))
        u = 2.0 * max(theta, 0.0) / (a * b)
        w0 = np.arccos(np.clip(u - rho, -1.0, 1.0))
        lo, hi = psi / 2.0 - w0 / 2.0, psi / 2.0 + w0 / 2.0  # angles phi with candidates above theta
        # |y| > |x| (keep y - x) for phi above phi_star, |y| <= |x| (keep 0) below
        phi_star = np.clip(np.arctan2(a - b * rho, b * s), lo, hi)
        j1 = np.zeros(idx.size)
        j2 = np.zeros(idx.size)
        p_arb = np.zeros(idx.size)
        for seg_lo, seg_hi, keep_y_minus_x in ((lo, phi_star, False), (phi_star, hi, True)):
            half = (seg_hi - seg_lo) / 2.0
            phi = seg_lo[:, None] + half[:, None] * (_NODES[None, :] + 1.0)
            cos_p, sin_p = np.cos(phi), np.sin(phi)
            h = cos_p * np.cos(phi - psi[:, None])
            c = 1.0 - (u[:, None] / 2.0) / np.maximum(h, 1e-300)
            m2 = _second_moment(c, d)
            # kappa: sqrt(D) * |arbitration change| / R on this segment
            kappa = a[:, None] * cos_p if keep_y_minus_x else b[:, None] * np.cos(phi - psi[:, None])
            j1 += ((cos_p * kappa * m2) @ _WEIGHTS) * half / math.pi
            j2 += ((sin_p * kappa * m2) @ _WEIGHTS) * half / math.pi
            p_arb += (_tail(c, d) @ _WEIGHTS) * half / math.pi
        collinear = s < COLLINEAR_S
        s_safe = np.where(collinear, 1.0, s)
        j2 = np.where(collinear, 0.0, j2)
        # E[u] = l - e_hat J1 - f2 J2 with f2 = (l_hat - rho e_hat) / s
        alpha[idx] = (-j1 + rho * j2 / s_safe) / a
        beta[idx] = 1.0 - j2 / (s_safe * b)
        arb[idx] = d * p_arb
        return alpha, beta, arb


def _tail(c: np.ndarray, d: int) -> np.ndarray:
    """``P(R^2 > t)`` with ``c = 1 - t/D`` (zero where ``c <= 0``)."""
    cp = np.clip(c, 0.0, 1.0)
    if d == 2:
        return (cp > 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(cp > 0, np.exp((d - 2) / 2.0 * np.log(np.where(cp > 0, cp, 1.0))), 0.0)


def _second_moment(c: np.ndarray, d: int) -> np.ndarray:
    """``E[R^2 ; R^2 > t]`` with ``c = 1 - t/D``: ``D c^((D-2)/2) - (D-2) c^(D/2)``."""
    cp = np.clip(c, 0.0, 1.0)
    tail = _tail(c, d)
    return np.where(cp > 0, tail * (d - (d - 2) * cp), 0.0)


def mixture_threshold(top_scores: np.ndarray, cols: ComplementColumns, q: float) -> float:
    """The ``q`` quantile of all candidates' scores: the top block's ``top_scores`` and the
    complement's expected candidates (continuous in ``theta``), found by bisection (geometric
    for a positive threshold, to a relative ``THRESHOLD_RTOL``)."""
    top = np.asarray(top_scores, dtype=np.float64).reshape(-1)
    n_comp = float(cols.expected_candidates().sum())
    target = (1.0 - q) * max(top.size + n_comp - 1.0, 0.0)  # candidates strictly above the quantile

    def above(theta: float) -> float:
        return float(np.count_nonzero(top > theta)) + float(cols.expected_above(theta).sum())

    # every complement score is at most |e||l| (1 + rho) / 2 (R^2 <= D)
    comp_max = float((cols.a * cols.b * (1.0 + cols.rho) / 2.0)[cols.active].max()) if cols.active.any() else 0.0
    hi = max(float(top.max()) if top.size else 0.0, comp_max)
    if above(0.0) <= target:
        # at or below zero: only the top block's (context-weighted, possibly negative) scores
        # are left to decide; every complement candidate is above
        lo = (float(top.min()) if top.size else 0.0) - 1e-30
        hi = 0.0
        if above(lo) <= target:
            return lo
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            if above(mid) > target:
                lo = mid
            else:
                hi = mid
        return hi
    if hi <= 0.0:
        return hi
    lo = hi * 1e-12
    while above(lo) <= target and lo > 1e-300:
        lo *= 1e-6
    # Illinois (bracketed regula falsi) on log(theta): the count is smooth and monotone at the
    # scale of the threshold; stop once it is within half an entry or the bracket is tight
    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = above(lo) - target, above(hi) - target
    side = 0
    for _ in range(BISECTION_STEPS):
        if x_hi - x_lo <= THRESHOLD_RTOL:
            break
        x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (x_lo + x_hi)
        if not x_lo < x < x_hi:
            x = 0.5 * (x_lo + x_hi)
        f = above(math.exp(x)) - target
        if abs(f) <= 0.5:
            return math.exp(x)
        if f > 0:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi /= 2.0
            side = -1
        else:
            x_hi, f_hi = x, f
            if side == 1:
                f_lo /= 2.0
            side = 1
    return math.exp(x_hi)
