"""The user's choices as a transfer request: one rule for the ComfyUI node, the command line and the tests.

:func:`from_inputs` turns what a person picks (method, CASA's parameters, injection / rank /
kept_energy, device) into a :class:`~casa_core.transfer.TransferConfig`. The node passes its widget
values (menu labels such as ``"CASA"`` and ``"low-rank"``, ``kept_energy = 0`` for "use the rank"), the
command line its options (``"casa"``, ``"lowrank"``, ``--kept-energy`` absent); both give the same request.

The defaults and menus every front end shows live here too: :data:`CASA_DEFAULTS` (the CASA authors'
parameters), :data:`OUTPUT_DEFAULTS`, :data:`METHOD_MENU`, :data:`INJECTION_MENU` and :data:`DTYPES`
(the dtypes a LoRA file can be written in).
"""
from __future__ import annotations

import torch

from .factorize import OutputSpec
from .routing import CasaParams
from .transfer import OUTPUT_DTYPES, TransferConfig

#: CASA's parameters as the reference code sets them (tau, q_dom, q_act, energy)
CASA_DEFAULTS = CasaParams()
#: the output the node and the command line give without being told otherwise (low-rank, rank 128, cap 512)
OUTPUT_DEFAULTS = OutputSpec()

#: the node's method menu: label shown -> casa_core method name
METHOD_MENU = {
    "CASA": "casa",
    "CASA restoration only": "restoration_only",
    "CASA arbitration only": "arbitration_only",
    "ProLoRA": "prolora",
    "direct reuse": "direct",
}
#: the node's injection menu: label shown -> OutputSpec mode
INJECTION_MENU = {"low-rank": "lowrank", "exact": "exact"}
#: the dtypes a transferred LoRA file can be written in (name -> torch dtype); the first is the default
DTYPES = OUTPUT_DTYPES  # the one table, kept where the file is written (casa_core.transfer)


def output_spec(injection: str = "lowrank", rank: int | None = OUTPUT_DEFAULTS.rank,
                kept_energy: float | None = None, max_rank: int = OUTPUT_DEFAULTS.max_rank) -> OutputSpec:
    """How the update is injected: ``exact`` (a full weight difference), else low-rank at ``rank``, or at
    the smallest rank up to ``max_rank`` keeping ``kept_energy`` of the update's energy when that is given
    (``None`` or ``0``: use ``rank``). ``injection`` is a mode or a label of :data:`INJECTION_MENU`."""
    mode = INJECTION_MENU.get(injection, injection)
    if mode == "exact":
        return OutputSpec(mode="exact", rank=None)
    if kept_energy:
        return OutputSpec(mode=mode, rank=None, energy=kept_energy, max_rank=max_rank)
    return OutputSpec(mode=mode, rank=rank)


def from_inputs(method: str = "casa", *, tau: float = CASA_DEFAULTS.tau, q_dom: float = CASA_DEFAULTS.q_dom,
                q_act: float = CASA_DEFAULTS.q_act, energy: float = CASA_DEFAULTS.energy,
                injection: str = "lowrank", rank: int | None = OUTPUT_DEFAULTS.rank,
                kept_energy: float | None = None, max_rank: int = OUTPUT_DEFAULTS.max_rank,
                device: str | torch.device = "cpu") -> TransferConfig:
    """The transfer request for these choices (checked when the transfer starts: an unknown method or a bad
    value raises ValueError there, :meth:`TransferConfig.validate`).

    ``method`` is a casa_core method name or a label of :data:`METHOD_MENU`; the output arguments are
    those of :func:`output_spec`.
    """
    cfg = TransferConfig(method=METHOD_MENU.get(method, method) if isinstance(method, str) else method,
                         params=CasaParams(tau=tau, q_dom=q_dom, q_act=q_act, energy=energy),
                         output=output_spec(injection, rank, kept_energy, max_rank), device=str(device))
    return cfg


__all__ = ["CASA_DEFAULTS", "DTYPES", "INJECTION_MENU", "METHOD_MENU", "OUTPUT_DEFAULTS", "from_inputs",
           "output_spec"]
