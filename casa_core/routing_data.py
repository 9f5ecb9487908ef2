"""Cluster-level routing data of one layer, for reports and heatmaps.

Clusters are numbered by their smallest singular index (so in order of decreasing singular
value).  When a layer has more than ``max_groups`` clusters, consecutive clusters are merged
into groups of roughly equal size, so pictures stay legible for 1536- and 5120-wide layers.
One more group collects every row/column beyond the leading subspace (index >= k).

Per group pair (a, b) a :class:`RoutingSummary` holds sums over the block ``rows in a x columns in
b``: ``drift_energy`` (sum C_F^2), ``lora_energy`` (sum C_L^2), ``dot`` (sum C_L * C_F),
``count``, ``restored`` (entries outside D) and ``arbitrated``; ``preserved = count -
restored - arbitrated``.  Alignment = dot / sqrt(lora_energy * drift_energy).  On a non-square
layer the group beyond k counts all ``M - N`` complement rows, with the expected arbitrated
counts of :mod:`casa_core.completion`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .routing import Routing

MAX_GROUPS = 48


@dataclass
class RoutingSummary:
    """One layer's routing data at cluster-group level, in the working orientation (rows >= columns; a
    wide layer's are those of its transpose).  ``G`` = groups + 1 (the last: every direction beyond
    k); ``k`` directions, ``C`` clusters.  All tensors on the CPU."""

    drift_energy: torch.Tensor  # G x G float32, sum of C_F^2 per block
    lora_energy: torch.Tensor  # G x G float32, sum of C_L^2
    dot: torch.Tensor  # G x G float32, sum of C_L * C_F
    restored: torch.Tensor  # G x G float32, entries outside D
    arbitrated: torch.Tensor  # G x G float32, arbitrated entries (expected ones on a complement)
    count: torch.Tensor  # G x G float32, entries
    labels: torch.Tensor  # k int32, the cluster of each leading direction
    cluster_group: torch.Tensor  # C int32, the group of each cluster
    recv_dominant: torch.Tensor  # C uint8, 1: a dominant receiving cluster
    send_dominant: torch.Tensor  # C uint8, 1: a dominant sending cluster
    rho_recv: torch.Tensor  # C float32, drift density: mean row norm of C_F's k x k block per cluster
    rho_send: torch.Tensor  # C float32, the same with column norms
    cosine_groups: torch.Tensor  # G x G float32, dot / sqrt(lora_energy * drift_energy)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The fields by name, in field order (e.g. for a safetensors file)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RoutingSummary":
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})


def _even_split(sizes: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Consecutive clusters into ``n_groups`` groups of roughly equal total size."""
    start = torch.cumsum(sizes, 0) - sizes  # members before each cluster
    return torch.clamp((start * n_groups / sizes.sum()).long(), max=n_groups - 1)


def cluster_groups(
    labels: torch.Tensor, n_clusters: int, max_groups: int = MAX_GROUPS, kinds: torch.Tensor | None = None
) -> torch.Tensor:
    """Group index of every cluster.

    With ``kinds`` (one code per cluster, e.g. its dominance), only neighbouring clusters of the
    same kind are merged, so every group is wholly dominant or wholly not (when there are at
    most ``max_groups`` runs of equal kind; otherwise groups follow sizes alone).
    """
    if n_clusters <= max_groups:
        return torch.arange(n_clusters)
    sizes = torch.bincount(labels.cpu(), minlength=n_clusters).double()
    if kinds is None:
        return _compact(_even_split(sizes, max_groups))
    kinds = kinds.cpu()
    change = torch.ones(n_clusters, dtype=torch.bool)
    change[1:] = kinds[1:] != kinds[:-1]
    run = torch.cumsum(change.long(), 0) - 1
    n_runs = int(run[-1]) + 1
    if n_runs > max_groups:
        return _compact(_even_split(sizes, max_groups))
    run_sizes = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run, sizes)
    # one group per run, the rest shared in proportion to the runs' sizes
    share = 1 + torch.floor(run_sizes / run_sizes.sum() * (max_groups - n_runs)).long()
    out = torch.empty(n_clusters, dtype=torch.long)
    first = 0
    for r in range(n_runs):
        members = torch.nonzero(run == r).flatten()
        n_g = min(int(share[r]), members.numel())
        out[members] = first + _even_split(sizes[members], n_g)
        first += n_g
    return _compact(out)


def _compact(groups: torch.Tensor) -> torch.Tensor:
    """Renumber groups 0..G-1 without gaps (order kept)."""
    return torch.unique(groups, return_inverse=True)[1]


def _pair_sums(x: torch.Tensor, row_oh: torch.Tensor, col_oh: torch.Tensor) -> torch.Tensor:
    """``row_oh @ x @ col_oh^T`` with one-hot group matrices (a few dozen groups: two GEMMs)."""
    return (row_oh @ x @ col_oh.T).cpu().double()  # float64 only on the CPU


def routing_summary(c_l: torch.Tensor, c_f: torch.Tensor, routing: Routing, max_groups: int = MAX_GROUPS) -> RoutingSummary:
    k = routing.k
    dom = routing.dominance
    kinds = dom.recv_dominant.long().cpu() * 2 + dom.send_dominant.long().cpu()
    group_of_cluster = cluster_groups(routing.labels.cpu(), routing.n_clusters, max_groups, kinds).to(c_l.device)
    n_groups = int(group_of_cluster.max()) + 1 if routing.n_clusters else 0
    outside = n_groups  # the extra group beyond k
    g = n_groups + 1
    row_g = torch.full((c_l.shape[0],), outside, dtype=torch.long, device=c_l.device)
    col_g = torch.full((c_l.shape[1],), outside, dtype=torch.long, device=c_l.device)
    row_g[:k] = group_of_cluster[routing.labels]
    col_g[:k] = group_of_cluster[routing.labels]
    d = routing.dominance.mask()
    arb = routing.arbitrated_mask if routing.arbitrated_mask is not None else torch.zeros_like(d)
    row_oh = torch.nn.functional.one_hot(row_g, g).T.to(c_l.dtype)
    col_oh = torch.nn.functional.one_hot(col_g, g).T.to(c_l.dtype)
    out = {
        "drift_energy": _pair_sums(c_f * c_f, row_oh, col_oh),
        "lora_energy": _pair_sums(c_l * c_l, row_oh, col_oh),
        "dot": _pair_sums(c_l * c_f, row_oh, col_oh),
        "restored": _pair_sums((~d).to(c_l.dtype), row_oh, col_oh),
        "arbitrated": _pair_sums(arb.to(c_l.dtype), row_oh, col_oh),
    }
    sizes_r, sizes_c = row_oh.sum(1).cpu().double(), col_oh.sum(1).cpu().double()
    comp = routing.complement
    if comp is not None:
        # a non-square layer's complement: all comp.dim rows, arbitrated in expectation
        # (the energies and dots above are sums over a basis of it, the same in any basis)
        sizes_r[outside] = comp.dim
        col_oh64 = col_oh.cpu().double()
        free_cols = col_oh64 @ (~routing.dominance.cols).cpu().double()
        out["restored"][outside] = comp.dim * free_cols
        out["arbitrated"][outside] = col_oh64 @ comp.arbitrated.double()
    out["count"] = sizes_r[:, None] * sizes_c[None, :]
    out = {name: t.float().cpu() for name, t in out.items()}
    out["labels"] = routing.labels.to(torch.int32).cpu()
    out["cluster_group"] = group_of_cluster.to(torch.int32).cpu()
    out["recv_dominant"] = routing.dominance.recv_dominant.to(torch.uint8).cpu()
    out["send_dominant"] = routing.dominance.send_dominant.to(torch.uint8).cpu()
    out["rho_recv"] = routing.dominance.rho_recv.float().cpu()
    out["rho_send"] = routing.dominance.rho_send.float().cpu()
    out["cosine_groups"] = (out["dot"] / (out["lora_energy"] * out["drift_energy"]).sqrt().clamp_min(1e-30))
    return RoutingSummary(**out)
