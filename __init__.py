"""casa-lora: transfer base-model LoRAs to distilled video models inside ComfyUI.

The maths lives in ``casa_core`` (importable without ComfyUI).  Nodes are registered only when
this folder is loaded by ComfyUI, i.e. when ComfyUI's ``comfy_api`` can be imported.
"""
WEB_DIRECTORY = "./web"

try:  # inside ComfyUI
    import comfy_api.latest  # noqa: F401
except ImportError:  # plain Python: casa_core stays usable, no nodes
    __all__ = ["WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
