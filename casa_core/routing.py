"""Routing analysis in the source's singular coordinates (CASA paper, section 4).

Vocabulary (see docs/algorithm.md):

* ``C_L = U^T dL V`` and ``C_F = U^T dF V`` are the routing matrices of the LoRA and of the
  distillation drift; entry ``(i, j)`` couples right singular direction ``j`` (sender) to left
  direction ``i`` (receiver).
* ``k`` is the size of the leading subspace, the clusters are connected components of the
  rotation-strength graph on the ``k x k`` block, dominant clusters have a drift density at or
  above the ``q_dom`` quantile, and the dominant mask ``D`` covers their rows and columns.
* Restoration (outside ``D``) sets ``C_new = C_L - C_F``; arbitration (inside ``D``) keeps only
  the stronger of two aligned contributions.

The functions take matrices of any shape ``rows x cols`` with ``rows, cols >= k``: rows (columns)
at or beyond ``k`` are coordinates outside the leading subspace, in whatever completion the
caller chose.  They never need the bases themselves.  For a non-square layer in compact
coordinates, ``casa_update(..., complement_dim=M - N)`` arbitrates those rows as the expectation
over uniformly random completions (:mod:`casa_core.completion`) instead of entry by entry.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import completion, linalg
from .linalg import exact_quantile

ROTATION_EPS = 1e-6  # added to singular-value gaps (reference behaviour)
COSINE_EPS = 1e-8  # added to the block-cosine denominator (reference behaviour)


@dataclass(frozen=True)
class CasaParams:
    """CASA's parameters, with the reference code's defaults.

    ``tau``: rotation-strength threshold joining two singular directions into one cluster
    (reference ``rotation_threshold``).  ``q_dom``: quantile of cluster drift densities above
    which a cluster is dominant (reference ``q_threshold``).  ``q_act``: quantile of the aligned
    candidates' scores above which an entry is arbitrated (reference ``arbitrate_q``).
    ``energy``: share of the squared singular values that defines ``k`` on square layers.
    ``restore`` / ``arbitrate`` switch the two mechanisms (paper Table 2 ablations).
    """

    tau: float = 0.5
    q_dom: float = 0.5
    q_act: float = 0.85
    energy: float = 0.9
    restore: bool = True
    arbitrate: bool = True

    def validate(self) -> None:
        for name in ("tau", "q_dom", "q_act", "energy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not 0 < self.tau < float("inf"):
            raise ValueError(f"tau must be a positive number, got {self.tau}")
        for name in ("q_dom", "q_act", "energy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")


def leading_k(s: torch.Tensor, square: bool, energy: float) -> int:
    """Size of the leading subspace.

    Square layers: the smallest ``k`` with ``sum(S[:k]^2) / sum(S^2) >= energy``.
    Non-square layers: all ``min(m, n)`` directions (the reference's choice).
    """
    n = s.numel()
    if not square or n == 0:
        return n
    e = s.float() ** 2
    total = e.sum()
    if float(total) == 0.0:
        return n
    cumulative = torch.cumsum(e, dim=0) / total
    hits = torch.nonzero(cumulative >= energy)
    return int(hits[0, 0]) + 1 if hits.numel() else n


def connected_components(edges_i: torch.Tensor, edges_j: torch.Tensor, n: int) -> torch.Tensor:
    """Labels of the connected components of an undirected graph on ``n`` nodes.

    Components are numbered in the order of their smallest node (as a breadth-first search
    from node 0 upwards would number them).  Vectorised hooking with pointer jumping: every
    round hooks each root to the smallest root it touches, so it needs O(log n) rounds.
    """
    parent = torch.arange(n, device=edges_i.device)
    if edges_i.numel():
        while True:
            pi, pj = parent[edges_i], parent[edges_j]
            if bool((pi == pj).all()):
                break
            lo, hi = torch.minimum(pi, pj), torch.maximum(pi, pj)
            parent = parent.scatter_reduce(0, hi, lo, reduce="amin")
            while True:
                grand = parent[parent]
                if bool((grand == parent).all()):
                    break
                parent = grand
    _, labels = torch.unique(parent, return_inverse=True)
    return labels


def clusters(c_l_k: torch.Tensor, s_k: torch.Tensor, tau: float) -> tuple[torch.Tensor, int]:
    """Clusters of the leading subspace (paper eq. 8-9).

    Rotation strength ``R(i,j) = |C_L(i,j)| / (|S_i - S_j| + 1e-6)`` with a zero diagonal; an
    undirected edge joins ``i`` and ``j`` where ``R > tau`` in either direction.
    """
    k = s_k.numel()
    gap = (s_k[:, None] - s_k[None, :]).abs_().add_(ROTATION_EPS)
    strong = (c_l_k.abs() / gap) > tau
    strong.fill_diagonal_(False)
    strong |= strong.T.clone()
    ei, ej = torch.nonzero(torch.triu(strong, diagonal=1), as_tuple=True)
    # graph bookkeeping on the CPU: small vectors, and integer scatter ops some devices lack
    labels = connected_components(ei.cpu(), ej.cpu(), k).to(c_l_k.device)
    n_clusters = int(labels.max()) + 1 if k else 0
    return labels, n_clusters


def cluster_mean(values: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    sums = torch.zeros(n_clusters, dtype=values.dtype, device=values.device).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=n_clusters).to(values.dtype)
    return sums / counts


def cluster_pair_sums(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """``out[a, b] = sum of x[i, j] over i in G_a, j in G_b`` for a ``k x k`` matrix ``x``."""
    k = labels.numel()
    rows = torch.zeros(n_clusters, k, dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return torch.zeros(n_clusters, n_clusters, dtype=x.dtype, device=x.device).index_add_(1, labels, rows)


@dataclass
class Dominance:
    """Which clusters, rows and columns are dominant, and the densities that decided it."""

    rho_recv: torch.Tensor  # per cluster
    rho_send: torch.Tensor
    recv_dominant: torch.Tensor  # bool per cluster
    send_dominant: torch.Tensor
    rows: torch.Tensor  # bool, length = rows of C
    cols: torch.Tensor  # bool, length = cols of C

    def mask(self) -> torch.Tensor:
        return self.rows[:, None] | self.cols[None, :]


def dominance(c_f: torch.Tensor, k: int, labels: torch.Tensor, n_clusters: int, q_dom: float) -> Dominance:
    """Dominant receiving/sending clusters from the drift's densities inside the top-k block."""
    ck = c_f[:k, :k]
    rho_recv = cluster_mean(torch.linalg.vector_norm(ck, dim=1), labels, n_clusters)
    rho_send = cluster_mean(torch.linalg.vector_norm(ck, dim=0), labels, n_clusters)
    # one value per cluster: decided on the CPU (quantile is missing on some devices)
    recv_dom = (rho_recv.cpu() >= torch.quantile(rho_recv.cpu(), q_dom)).to(c_f.device)
    send_dom = (rho_send.cpu() >= torch.quantile(rho_send.cpu(), q_dom)).to(c_f.device)
    rows = torch.zeros(c_f.shape[0], dtype=torch.bool, device=c_f.device)
    cols = torch.zeros(c_f.shape[1], dtype=torch.bool, device=c_f.device)
    rows[:k] = recv_dom[labels]
    cols[:k] = send_dom[labels]
    return Dominance(rho_recv, rho_send, recv_dom, send_dom, rows, cols)


def block_cosine(c_l_k: torch.Tensor, c_f_k: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Directional alignment of the LoRA and the drift on every cluster pair (M x M)."""
    dot = cluster_pair_sums(c_l_k * c_f_k, labels, n_clusters)
    n_l = cluster_pair_sums(c_l_k * c_l_k, labels, n_clusters).sqrt_()
    n_f = cluster_pair_sums(c_f_k * c_f_k, labels, n_clusters).sqrt_()
    return dot / (n_l * n_f + COSINE_EPS)


@dataclass
class ComplementArbitration:
    """The complement rows of a non-square layer, treated as a generic completion
    (:mod:`casa_core.completion`): per column, expected candidates and arbitrated entries among
    the ``dim`` complement rows, and the coefficients of ``C_new``'s complement column
    ``alpha C_F + beta C_L`` (restoration, the LoRA kept, or the expected arbitration)."""

    dim: int
    candidates: torch.Tensor  # float64 per column (CPU)
    arbitrated: torch.Tensor  # float64 per column (CPU)
    alpha: torch.Tensor  # float64 per column: C_new's complement column = alpha C_F + beta C_L
    beta: torch.Tensor


@dataclass(frozen=True)
class RoutingStats:
    """CASA's counts on one layer (its report record's routing part). ``entries``: routing entries,
    rows x cols, a non-square layer counting all its complement rows (``M - N``) as a full completion
    has them; ``dominant_entries``: those in the dominant mask ``D``; ``candidates``: entries of ``D``
    where the LoRA and the drift push the same way; ``arbitrated_entries``: those arbitrated (the
    complement's expected counts included); ``arbitration_threshold``: the ``q_act`` quantile of the
    candidates' scores, None without candidates."""

    k: int
    clusters: int
    dominant_recv_clusters: int
    dominant_send_clusters: int
    dominant_rows: int
    dominant_cols: int
    entries: int
    dominant_entries: int
    candidates: int
    arbitrated_entries: int
    arbitration_threshold: float | None

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "RoutingStats":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class Routing:
    """Everything CASA decided for one layer, kept for the report and the heatmaps."""

    k: int
    labels: torch.Tensor
    n_clusters: int
    dominance: Dominance
    cosine: torch.Tensor  # M x M block cosine
    candidates: int = 0
    arbitrated_mask: torch.Tensor | None = None
    threshold: float | None = None
    stats: RoutingStats | None = None  # set by casa_update
    complement: ComplementArbitration | None = None  # only with ``complement_dim``


def analyse(c_l: torch.Tensor, c_f: torch.Tensor, s: torch.Tensor, square: bool, params: CasaParams) -> Routing:
    """k, clusters, dominance and block cosines for one layer."""
    k = leading_k(s, square, params.energy)
    c_l_k, c_f_k = c_l[:k, :k], c_f[:k, :k]
    labels, n_clusters = clusters(c_l_k, s[:k], params.tau)
    dom = dominance(c_f, k, labels, n_clusters, params.q_dom)
    cos = block_cosine(c_l_k, c_f_k, labels, n_clusters)
    return Routing(k=k, labels=labels, n_clusters=n_clusters, dominance=dom, cosine=cos)


def casa_update(
    c_l: torch.Tensor, c_f: torch.Tensor, s: torch.Tensor, square: bool, params: CasaParams,
    complement_dim: int | None = None,
) -> tuple[torch.Tensor, Routing]:
    """CASA's new routing ``C_new`` for one layer (algorithm.md steps 1-6 and the ablations).

    The target's effective routing after the patch is ``C_F + C_new``.

    ``complement_dim`` (non-square layers only): the rows at or beyond ``k`` are an orthonormal
    basis of a subspace of the ``complement_dim``-dimensional complement of ``span(U)`` that holds
    all of the drift's and the LoRA's complement parts (the compact coordinates of
    :mod:`casa_core.layer`).  Their arbitration is then the expectation over uniformly random
    completions of ``U`` (:mod:`casa_core.completion`): invariant to the basis those rows use, and
    the statistics count all ``complement_dim`` rows.  Without it every row is an entry of the
    given bases (the reference code's behaviour, exact with its full bases).
    """
    with linalg.layer_threads(c_l.numel(), c_l.device):
        return _casa_update(c_l, c_f, s, square, params, complement_dim)


def _casa_update(
    c_l: torch.Tensor, c_f: torch.Tensor, s: torch.Tensor, square: bool, params: CasaParams,
    complement_dim: int | None,
) -> tuple[torch.Tensor, Routing]:
    routing = analyse(c_l, c_f, s, square, params)
    k = routing.k
    generic = complement_dim is not None and not square

    if generic:
        c_new, arbitrated = _casa_generic(c_l, c_f, routing, params, int(complement_dim))
    else:
        c_new, arbitrated = _casa_entrywise(c_l, c_f, routing, params)
    routing.arbitrated_mask = arbitrated
    rows, cols = c_l.shape
    n_arb = int(torch.count_nonzero(arbitrated))
    if generic:  # count every complement row, as a full completion has them
        comp_rows = int(complement_dim)
        rows = k + comp_rows
        n_dom_rows = int(routing.dominance.rows[:k].sum())
        n_dom_cols = int(routing.dominance.cols.sum())
        n_d = n_dom_rows * cols + (k - n_dom_rows) * n_dom_cols + comp_rows * n_dom_cols
        if routing.complement is not None:
            n_arb += int(routing.complement.arbitrated.sum())
    else:
        n_dom_rows = int(routing.dominance.rows.sum())
        n_d = n_dom_rows * cols + (rows - n_dom_rows) * int(routing.dominance.cols.sum())
    routing.stats = RoutingStats(
        k=k,
        clusters=routing.n_clusters,
        dominant_recv_clusters=int(routing.dominance.recv_dominant.sum()),
        dominant_send_clusters=int(routing.dominance.send_dominant.sum()),
        dominant_rows=int(routing.dominance.rows.sum()),
        dominant_cols=int(routing.dominance.cols.sum()),
        entries=rows * cols,
        dominant_entries=n_d,
        candidates=routing.candidates,
        arbitrated_entries=n_arb,
        arbitration_threshold=routing.threshold,
    )
    return c_new, routing


def _columns_first(c: torch.Tensor, r: torch.Tensor, j: torch.Tensor) -> bool:
    """Whether the block ``(r, j)`` of ``c`` is best reached through its columns: the intermediate copy
    (all rows of the columns ``j``, or all columns of the rows ``r``) is then the smaller. Usually so: the
    dominant columns are few and the other rows many (on 5120 x 5120, 5x faster than rows first)."""
    return c.shape[0] * j.numel() <= r.numel() * c.shape[1]


def _dominant_blocks(c: torch.Tensor, blocks) -> list[torch.Tensor]:
    """The entries of ``c`` in each ``(rows, cols)`` block (``cols`` None: every column). Two
    ``index_select`` passes, the smaller intermediate first (:func:`_columns_first`): the same values as
    advanced indexing, 3-5x faster on the CPU."""
    out = []
    for r, j in blocks:
        if j is None:
            out.append(c.index_select(0, r))
        elif _columns_first(c, r, j):
            out.append(c.index_select(1, j).index_select(0, r))
        else:
            out.append(c.index_select(0, r).index_select(1, j))
    return out


def _selected(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]`` (row-major order), through the mask's flat indices: the same values, about twice
    as fast on the CPU as boolean indexing."""
    return values.reshape(-1).index_select(0, torch.nonzero(mask.reshape(-1)).squeeze(1))


def _dominant_index(routing: Routing, n_rows: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The dominant mask ``D`` restricted to the first ``n_rows`` rows, as two blocks of indices:
    ``(dominant rows, None = every column)`` and ``(the other rows, the dominant columns)``
    (rows ascending)."""
    dom = routing.dominance
    rows = dom.rows[:n_rows]
    return [(torch.nonzero(rows).flatten(), None),
            (torch.nonzero(~rows).flatten(), torch.nonzero(dom.cols).flatten())]


def _block_scores(blocks, l_blocks, f_blocks, routing: Routing) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: the candidates (aligned signs) and their scores ``|C_L C_F|`` times the clusters'
    block cosine where both the row and the column are below ``k`` (algorithm.md step 6)."""
    k = routing.k
    cands, scores = [], []
    for (r, j), bl, bf in zip(blocks, l_blocks, f_blocks):
        cands.append(torch.sign(bl) == torch.sign(bf))
        score = (bl * bf).abs_()
        r_top = int(torch.count_nonzero(r < k))  # rows are ascending
        if r_top:
            j_top = torch.arange(min(k, score.shape[1]), device=r.device) if j is None else j[j < k]
            if j_top.numel():
                ctx = routing.cosine.index_select(0, routing.labels[r[:r_top]]).index_select(1, routing.labels[j_top])
                if j is None:
                    score[:r_top, : j_top.numel()] *= ctx
                else:  # the dominant columns are all below k
                    score[:r_top] *= ctx
        scores.append(score)
    return cands, scores


def _put_blocks(target: torch.Tensor, blocks, values) -> None:
    for (r, j), v in zip(blocks, values):
        if j is None:
            target.index_copy_(0, r, v)
        elif _columns_first(target, r, j):  # the columns, their rows r replaced, written back
            cols = target.index_select(1, j)
            cols.index_copy_(0, r, v)
            target.index_copy_(1, j, cols)
        else:  # the rows, their columns j replaced, written back
            rows = target.index_select(0, r)
            rows.index_copy_(1, j, v)
            target.index_copy_(0, r, rows)


def _arbitrate_blocks(l_blocks, f_blocks, cands, scores, threshold) -> tuple[list, list]:
    """Arbitrated entries (candidates scoring above ``threshold``) keep only the stronger of the
    two contributions (``C_L - C_F`` where ``|C_L| > |C_F|``, else 0); the rest keep ``C_L``."""
    new, arbs = [], []
    for bl, bf, cand, score in zip(l_blocks, f_blocks, cands, scores):
        arb = torch.gt(score, threshold).logical_and_(cand)
        # the rule on the arbitrated entries only (a few per cent of D): the same values as on all of D
        idx = torch.nonzero(arb, as_tuple=True)
        lv, fv = bl[idx], bf[idx]
        out = bl.clone()
        out[idx] = torch.where(lv.abs() > fv.abs(), lv - fv, torch.zeros_like(lv))
        new.append(out)
        arbs.append(arb)
    return new, arbs


def _casa_entrywise(
    c_l: torch.Tensor, c_f: torch.Tensor, routing: Routing, params: CasaParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C_new`` and the arbitrated mask, every entry on its own (the reference's rule, steps 5-6).

    The dominant mask ``D`` (dominant rows, and the dominant columns of every other row) is
    handled as its two blocks, "dominant rows x every column" and "other rows x dominant
    columns", so that the arbitration's passes touch only ``D``'s entries: the candidates, their
    scores and the ``q_act`` threshold (an order statistic, so the blocks' order does not matter)
    are those of the whole matrix, entry for entry."""
    blocks = _dominant_index(routing, c_l.shape[0])
    # Outside D: restoration (C_L - C_F) or, without it, the LoRA unchanged.
    c_new = c_l - c_f if params.restore else c_l.clone()
    arbitrated = torch.zeros(c_l.shape, dtype=torch.bool, device=c_l.device)
    # Inside D: start from the LoRA unchanged.
    l_blocks = _dominant_blocks(c_l, blocks)
    if params.arbitrate:
        f_blocks = _dominant_blocks(c_f, blocks)
        cands, scores = _block_scores(blocks, l_blocks, f_blocks, routing)
        n_cand = sum(int(c.sum()) for c in cands)
        routing.candidates = n_cand
        if n_cand:
            threshold = exact_quantile(torch.cat([_selected(sc, c) for sc, c in zip(scores, cands)]), params.q_act)
            routing.threshold = float(threshold)
            l_blocks, arbs = _arbitrate_blocks(l_blocks, f_blocks, cands, scores, threshold)
            _put_blocks(arbitrated, blocks, arbs)
        del scores, cands, f_blocks
    _put_blocks(c_new, blocks, l_blocks)
    return c_new, arbitrated


def _casa_generic(
    c_l: torch.Tensor, c_f: torch.Tensor, routing: Routing, params: CasaParams, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``C_new`` of a non-square layer: entry by entry in the top ``k`` rows (on the dominant mask's
    blocks, as :func:`_casa_entrywise`), and on the complement rows the expectation over random
    completions (see :func:`casa_update`)."""
    k = routing.k
    top_l, top_f = c_l[:k], c_f[:k]
    blocks = _dominant_index(routing, k)
    new_top = top_l - top_f if params.restore else top_l.clone()
    l_blocks = _dominant_blocks(top_l, blocks)  # inside D: the LoRA unchanged, unless arbitrated
    arbitrated = torch.zeros(c_l.shape, dtype=torch.bool, device=c_l.device)
    comp_l, comp_f = c_l[k:], c_f[k:]
    dom_cols = routing.dominance.cols
    # complement column j of C_new = beta_j C_L + alpha_j C_F: restoration outside the dominant
    # columns, the LoRA inside them unless arbitrated (then the expectation's coefficients)
    n = c_l.shape[1]
    beta = torch.ones(n, dtype=torch.float64)
    alpha = torch.where(dom_cols.cpu(), 0.0, -1.0 if params.restore else 0.0).double()
    comp = ComplementArbitration(dim, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                                 alpha, beta)
    if params.arbitrate:
        f_blocks = _dominant_blocks(top_f, blocks)
        found = _arbitrate_generic(blocks, l_blocks, f_blocks, comp_l, comp_f, routing, params, dim)
        if found is not None:
            cands, scores, cols, exp_cand = found
            threshold = torch.tensor(routing.threshold, dtype=torch.float64).to(top_l.dtype)
            l_blocks, arbs = _arbitrate_blocks(l_blocks, f_blocks, cands, scores, threshold)
            _put_blocks(arbitrated, blocks, arbs)
            a_arb, b_arb, exp_arb = cols.expected_update(routing.threshold)
            act = torch.from_numpy(cols.active)
            comp = ComplementArbitration(dim, _whole_counts(exp_cand), _whole_counts(exp_arb),
                                         torch.where(act, torch.from_numpy(a_arb), alpha),
                                         torch.where(act, torch.from_numpy(b_arb), beta))
        del f_blocks
    _put_blocks(new_top, blocks, l_blocks)
    routing.complement = comp
    alpha, beta = comp.alpha, comp.beta
    if comp_l.shape[0] == 0:
        return new_top, arbitrated
    new_comp = comp_l * beta.to(c_l.device, c_l.dtype)
    new_comp.addcmul_(comp_f, alpha.to(c_l.device, c_l.dtype))
    return torch.cat([new_top, new_comp]), arbitrated


def _whole_counts(expected) -> torch.Tensor:
    """Per-column expected counts as whole numbers summing to the rounded total (largest
    remainders), so that reports and heatmaps agree to the entry."""
    x = torch.from_numpy(expected).double()
    base = torch.floor(x)
    short = round(float(x.sum())) - int(base.sum())
    if short > 0:
        base[torch.argsort(x - base, descending=True, stable=True)[:short]] += 1.0
    return base


def _arbitrate_generic(
    blocks, l_blocks, f_blocks, comp_l: torch.Tensor, comp_f: torch.Tensor,
    routing: Routing, params: CasaParams, dim: int,
) -> tuple[list, list, completion.ComplementColumns, object] | None:
    """The arbitration threshold of a non-square layer, the ``q_act`` quantile of the top block's
    candidates and the complement's expected ones (set on ``routing``), and ``(the top blocks'
    candidates, their scores, the complement's columns, their expected candidates)``; None
    without candidates."""
    cands, scores = _block_scores(blocks, l_blocks, f_blocks, routing)
    top_scores = torch.cat([_selected(sc, c) for sc, c in zip(scores, cands)])
    # per-column |e|^2, |l|^2, e.l of the complement parts: the same in any basis of it
    cols = completion.ComplementColumns.from_column_stats(
        (comp_f * comp_f).sum(0).double().cpu().numpy(),
        (comp_l * comp_l).sum(0).double().cpu().numpy(),
        (comp_l * comp_f).sum(0).double().cpu().numpy(),
        dim, routing.dominance.cols.cpu().numpy(),
    )
    exp_cand = cols.expected_candidates()
    n_comp = float(exp_cand.sum())
    routing.candidates = int(top_scores.numel()) + int(_whole_counts(exp_cand).sum())
    if top_scores.numel() == 0 and n_comp == 0.0:
        return None
    if n_comp == 0.0:
        threshold = float(exact_quantile(top_scores, params.q_act))
    else:
        threshold = completion.mixture_threshold(top_scores.double().cpu().numpy(), cols, params.q_act)
    routing.threshold = threshold
    return cands, scores, cols, exp_cand
