"""ProLoRA (Zero-shot adaptation of PEFT in diffusion models, ICML 2025) on one layer.

``dT = P(U_t,par) P(U_s,par) dL P(V_s,par) P(V_t,par)
     + P(U_t,perp) P(U_s,perp) dL P(V_s,perp) P(V_t,perp)``

Worked in the source's singular coordinates, where ``P(U_s,par)`` keeps the first ``k`` rows
and the target weight is ``diag(S) + C_F`` (``W_t = W_s + dF``), so the target's SVD is the SVD
of that small matrix.  ``k`` is chosen by the energy threshold on the source spectrum and used
for both models; the subspace similarity ``Phi = ||U_s,par^T U_t,par||_F^2 / k`` is reported.
The result is exactly rank ``<= 2r`` and is returned factored.
"""
from __future__ import annotations

import torch

from .. import linalg
from ..layer import Coordinates
from ..routing import CasaParams, leading_k
from .base import CoordUpdate, ProLoRAStats


def prolora_layer(coords: Coordinates, params: CasaParams) -> CoordUpdate:
    s = coords.basis.S
    k = leading_k(s, True, params.energy)  # energy threshold on every layer
    m_t = coords.source_rows() + coords.c_f()
    p_t, _, q_th = linalg.svd(m_t)
    pp = p_t[:, :k]  # target's leading left directions, in source coordinates
    qp = q_th[:k].T  # target's leading right directions

    left, right = coords.rows_l, coords.right  # C_L = left @ right
    left_par = torch.zeros_like(left)
    left_par[:k] = left[:k]
    left_perp = left - left_par
    right_par = torch.zeros_like(right)
    right_par[:, :k] = right[:, :k]
    right_perp = right - right_par

    new_left_par = pp @ (pp.T @ left_par)
    new_right_par = (right_par @ qp) @ qp.T
    new_left_perp = left_perp - pp @ (pp.T @ left_perp)
    new_right_perp = right_perp - (right_perp @ qp) @ qp.T

    phi_u = float((pp[:k] ** 2).sum()) / k if k else 1.0
    phi_v = float((qp[:k] ** 2).sum()) / k if k else 1.0
    return CoordUpdate(
        left=torch.cat([new_left_par, new_left_perp], dim=1),
        right=torch.cat([new_right_par, new_right_perp], dim=0),
        stats=ProLoRAStats(k=k, phi_left=phi_u, phi_right=phi_v),
    )
