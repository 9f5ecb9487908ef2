"""From a layer's update in routing coordinates to what gets written or patched.

Two injections:

* ``exact``: the full-rank update ``rows C V^T`` as a dense ``out x in`` weight difference
  (ComfyUI ``.diff`` patch).  Costs as much memory as the layer's weight.
* ``lowrank``: a deterministic truncated SVD of ``C`` (rows and ``V`` are orthonormal, so the
  SVD of ``C`` is the SVD of the update), at a fixed rank or at the smallest rank keeping a
  share of the update's energy (capped at ``max_rank``).  The report carries the relative
  Frobenius error ``||dW - B'A'|| / ||dW||`` of what was kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import linalg
from .layer import Coordinates
from .methods.base import CoordUpdate

INJECTIONS = ("lowrank", "exact")


@dataclass(frozen=True)
class OutputSpec:
    """How the update is injected.  ``rank`` wins over ``energy`` when both are given."""

    mode: str = "lowrank"
    rank: int | None = 128
    energy: float | None = None
    max_rank: int = 512

    def validate(self) -> None:
        if self.mode not in INJECTIONS:
            raise ValueError(f"unknown injection {self.mode!r}; expected one of {', '.join(INJECTIONS)}")
        if self.mode == "lowrank":
            if self.rank is None and self.energy is None:
                raise ValueError("low-rank injection needs a rank or an energy to keep")
            for name in ("rank", "max_rank"):
                v = getattr(self, name)
                if v is None and name == "rank":
                    continue
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{name} must be a whole number, got {v!r}")
                if v < 1:
                    raise ValueError(f"{name} must be at least 1, got {v}")
            if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                            or not 0.0 < self.energy <= 1.0):
                raise ValueError(f"energy must lie in (0, 1], got {self.energy!r}")

    def describe(self) -> str:
        if self.mode == "exact":
            return "exact (full-rank weight difference)"
        if self.rank is not None:
            return f"low-rank, rank {self.rank}"
        return f"low-rank, {self.energy:.0%} of the energy (rank <= {self.max_rank})"


@dataclass
class LayerOutput:
    """``kind`` "lowrank" with ``(up, down)`` or "diff" with ``(delta,)``, in ``out x in``."""

    kind: str
    tensors: tuple[torch.Tensor, ...]
    rank: int | None
    rel_error: float  # ||dW - injected|| / ||dW||
    norm: float  # ||dW||_F


def _truncate_dense(c: torch.Tensor, spec: OutputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` the best rank-r approximation of ``c``."""
    if spec.rank is not None:
        u, s, vh = linalg.top_singular(c, spec.rank)
    else:
        # Energy: the whole spectrum from the smaller Gram matrix (exact, deterministic).
        gram = c.T @ c if c.shape[0] >= c.shape[1] else c @ c.T
        evals, evecs = linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        total = float(evals.sum())
        cum = torch.cumsum(evals, 0) / (total if total > 0 else 1.0)
        hits = torch.nonzero(cum >= spec.energy - 1e-7)
        r = int(hits[0, 0]) + 1 if hits.numel() else evals.numel()
        r = max(1, min(r, spec.max_rank))
        vecs = evecs[:, :r]
        if c.shape[0] >= c.shape[1]:  # vecs are right singular vectors
            left_full = c @ vecs
            s = torch.linalg.vector_norm(left_full, dim=0)
            u = left_full / torch.where(s > 0, s, torch.ones_like(s))
            vh = vecs.T
        else:
            right_full = vecs.T @ c
            s = torch.linalg.vector_norm(right_full, dim=1)
            vh = right_full / torch.where(s > 0, s, torch.ones_like(s))[:, None]
            u = vecs
    root = s.sqrt()
    return u * root, root[:, None] * vh


def _truncate_factored(left: torch.Tensor, right: torch.Tensor, spec: OutputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact SVD of ``left @ right`` through QR of the thin factors, then truncation."""
    ql, rl = linalg.qr(left)
    qr_, rr = linalg.qr(right.T)
    u, s, vh = linalg.svd(rl @ rr.T)
    if spec.rank is not None:
        r = min(spec.rank, s.numel())
    else:
        e = s**2
        total = float(e.sum())
        cum = torch.cumsum(e, 0) / (total if total > 0 else 1.0)
        hits = torch.nonzero(cum >= spec.energy - 1e-7)
        r = min(int(hits[0, 0]) + 1 if hits.numel() else s.numel(), spec.max_rank)
    root = s[:r].sqrt()
    return (ql @ u[:, :r]) * root, root[:, None] * (vh[:r] @ qr_.T)


def realize(coords: Coordinates, upd: CoordUpdate, spec: OutputSpec) -> LayerOutput:
    """Turn a method's coordinate update into the layer's injected update."""
    m, n = coords.basis.shape
    with linalg.layer_threads(m * n, coords.basis.V.device):
        return _realize(coords, upd, spec)


def _realize(coords: Coordinates, upd: CoordUpdate, spec: OutputSpec) -> LayerOutput:
    full = upd.dense()
    norm = float(torch.linalg.matrix_norm(full))
    if spec.mode == "exact":
        return LayerOutput("diff", (coords.to_dense(full),), None, 0.0, norm)
    if upd.c is not None:
        left, right = _truncate_dense(upd.c, spec)
    else:
        left, right = _truncate_factored(upd.left, upd.right, spec)
    resid = float(torch.linalg.matrix_norm(full - left @ right))
    up, down = coords.to_factors(left, right)
    return LayerOutput("lowrank", (up, down), int(left.shape[1]), resid / norm if norm > 0 else 0.0, norm)


def realize_direct(up: torch.Tensor, down: torch.Tensor | None, spec: OutputSpec) -> LayerOutput:
    """Direct reuse: the LoRA itself (``up`` already carries strength x alpha / rank).

    A dense update (LoHa, LoKr) comes as ``up = delta`` and ``down = None``.
    """
    if down is None:
        norm = float(torch.linalg.matrix_norm(up))
        if spec.mode == "exact":
            return LayerOutput("diff", (up,), None, 0.0, norm)
        left, right = _truncate_dense(up, spec)
        resid = float(torch.linalg.matrix_norm(up - left @ right))
        return LayerOutput("lowrank", (left, right), int(left.shape[1]), resid / norm if norm > 0 else 0.0, norm)
    if spec.mode == "exact":
        delta = up @ down
        return LayerOutput("diff", (delta,), None, 0.0, float(torch.linalg.matrix_norm(delta)))
    norm = float(torch.linalg.matrix_norm(up @ down))
    if spec.rank is not None and spec.rank >= up.shape[1]:
        return LayerOutput("lowrank", (up, down), int(up.shape[1]), 0.0, norm)
    left, right = _truncate_factored(up, down, spec)
    resid = float(torch.linalg.matrix_norm(up @ down - left @ right))
    return LayerOutput("lowrank", (left, right), int(left.shape[1]), resid / norm if norm > 0 else 0.0, norm)
