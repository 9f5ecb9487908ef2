"""casa-lora core library: LoRA transfer to distilled video models (CASA, ProLoRA, direct).

The front door (what the ComfyUI nodes, the command line and the tests use):

* :func:`from_inputs` -> a :class:`TransferConfig` (the request) from the user's choices;
* :class:`Transfer`: one LoRA's transfer, owning its :class:`TransferReport`;
* :func:`run_transfer_to_file`: the same, written as a ComfyUI-loadable LoRA file;
* the typed per-layer results: :class:`LayerRecord` (a report's layer, with the method's
  :class:`RoutingStats` or :class:`ProLoRAStats`) and :class:`RoutingSummary` (the heatmaps' data);
* the menus and defaults every front end shows (:data:`METHOD_MENU`, :data:`INJECTION_MENU`,
  :data:`DTYPES`, :data:`CASA_DEFAULTS`, :data:`OUTPUT_DEFAULTS`) and :class:`CasaError`.
"""

__version__ = "0.1.0"

from .errors import CasaError  # noqa: E402
from .request import (  # noqa: E402
    CASA_DEFAULTS,
    DTYPES,
    INJECTION_MENU,
    METHOD_MENU,
    OUTPUT_DEFAULTS,
    from_inputs,
    output_spec,
)
from .methods import ProLoRAStats  # noqa: E402
from .report import LayerRecord  # noqa: E402
from .routing import RoutingStats  # noqa: E402
from .routing_data import RoutingSummary  # noqa: E402
from .transfer import LayerResult, Transfer, TransferConfig, TransferReport, run_transfer_to_file  # noqa: E402

__all__ = ["CASA_DEFAULTS", "DTYPES", "INJECTION_MENU", "METHOD_MENU", "OUTPUT_DEFAULTS", "CasaError", "LayerRecord",
           "LayerResult", "ProLoRAStats", "RoutingStats", "RoutingSummary", "Transfer", "TransferConfig",
           "TransferReport", "from_inputs", "output_spec", "run_transfer_to_file"]
