"""User-facing errors.

Every error the library raises on bad input is a :class:`CasaError` whose message is one
sentence naming the file, the layer (where there is one) and what was expected.
"""
from __future__ import annotations


class CasaError(Exception):
    """A problem with the user's input or files, explained in one sentence."""

    def __init__(self, message: str, *, file: str | None = None, layer: str | None = None):
        super().__init__(message)
        self.file = file
        self.layer = layer


class CasaInterrupted(CasaError):
    """The user (or the host application) asked the computation to stop."""


# ComfyUI shows an error's type as ``<module>.<name>``, and it imports a node pack under a module named after
# its folder's full path: without this, the page and /history would read
# "/home/<user>/ComfyUI/custom_nodes/casa-lora.casa_core.errors.CasaError"
for _cls in (CasaError, CasaInterrupted):
    _cls.__module__ = "casa_lora"
del _cls
