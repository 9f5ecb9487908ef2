"""Import a ComfyUI tree into this Python process, on the CPU, for fast tests (comfyui-notes §8).

Only one ComfyUI can be imported per process: the first ``InProcessComfy`` wins and later ones must
name the same tree. ``args.cpu`` and ``args.base_directory`` are set before ``comfy.model_management``
and ``folder_paths`` are imported, so models, output and temp live in the test's base directory.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from pathlib import Path

_CLASH = ("nodes", "comfy", "folder_paths", "execution", "server", "utils", "app")


class InProcessComfy:
    def __init__(self, comfy_root, base_dir):
        self.root = Path(comfy_root).resolve()
        self.base_dir = Path(base_dir)
        self._extra_nodes_loaded = False
        self._import()

    def _import(self):
        root = str(self.root)
        for name in _CLASH:  # a same-named module from elsewhere (e.g. this repo's nodes/) would be used instead
            mod = sys.modules.get(name)
            f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
            if mod is not None and f and not str(Path(f).resolve()).startswith(root):
                raise RuntimeError(f"module {name!r} is already imported from {f}, not from ComfyUI at {root}; "
                                   f"ComfyUI cannot be imported in-process (import pack modules relatively)")
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        from comfy.cli_args import args

        if "comfy.model_management" not in sys.modules:
            args.cpu = True
        if "folder_paths" not in sys.modules:
            args.base_directory = str(self.base_dir)
        import comfy.model_management as mm
        import folder_paths

        if str(mm.get_torch_device()) != "cpu":
            raise RuntimeError(f"comfy.model_management was imported before args.cpu was set "
                               f"(device {mm.get_torch_device()})")
        if Path(folder_paths.base_path).resolve() != self.base_dir.resolve():
            # folder_paths came in earlier with another base: point the model folders at ours first.
            for kind in ("diffusion_models", "loras", "checkpoints", "vae", "text_encoders"):
                folder_paths.add_model_folder_path(kind, str(self.base_dir / "models" / kind), is_default=True)
            folder_paths.set_output_directory(str(self.base_dir / "output"))
            folder_paths.set_temp_directory(str(self.base_dir / "temp"))
            folder_paths.set_input_directory(str(self.base_dir / "input"))
        import nodes

        self.args = args
        self.mm = mm
        self.folder_paths = folder_paths
        self.nodes = nodes
        from comfy_locate import comfyui_version

        self.version = comfyui_version(self.root)

    def import_module(self, name: str):
        return importlib.import_module(name)

    # --- nodes ------------------------------------------------------------------------------------
    def load_extra_nodes(self) -> None:
        """Register the comfy_extras nodes (EmptyHunyuanLatentVideo, ...) in nodes.NODE_CLASS_MAPPINGS."""
        if not self._extra_nodes_loaded:
            asyncio.run(self.nodes.init_builtin_extra_nodes())
            self._extra_nodes_loaded = True

    def load_custom_node(self, path) -> bool:
        """Load a custom node pack the way the server does (V1 mappings or V3 comfy_entrypoint)."""
        return asyncio.run(self.nodes.load_custom_node(str(Path(path))))

    def node_class(self, class_type: str):
        if class_type not in self.nodes.NODE_CLASS_MAPPINGS:
            self.load_extra_nodes()
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def import_pack(self, pack_dir, name: str = "casa_lora_pack"):
        """Import a node pack directory as a package (relative imports work) without registering it."""
        pack_dir = Path(pack_dir)
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py",
                                                      submodule_search_locations=[str(pack_dir)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return mod

    # --- models and sampling ----------------------------------------------------------------------
    def load_unet(self, name: str, weight_dtype: str = "default"):
        """``UNETLoader`` on a file in models/diffusion_models; returns the ModelPatcher."""
        return self.nodes.UNETLoader().load_unet(name, weight_dtype)[0]

    def zero_conditioning(self, tokens: int = 8, batch: int = 1):
        import torch

        return [[torch.zeros(batch, tokens, 4096), {}]]

    def empty_latent(self, width: int = 32, height: int = 32, length: int = 5, batch: int = 1):
        """Same shape as EmptyHunyuanLatentVideo: {"samples": [B, 16, (length-1)//4+1, H/8, W/8]}."""
        import torch

        return {"samples": torch.zeros(batch, 16, (length - 1) // 4 + 1, height // 8, width // 8)}

    def sample(self, model, steps: int = 2, cfg: float = 1.0, seed: int = 0, sampler: str = "euler",
               scheduler: str = "simple", positive=None, negative=None, latent=None, denoise: float = 1.0):
        """``nodes.common_ksampler`` (what KSampler runs); returns the output latent tensor."""
        positive = positive if positive is not None else self.zero_conditioning()
        negative = negative if negative is not None else positive
        latent = latent if latent is not None else self.empty_latent()
        out = self.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                         latent, denoise=denoise)
        return out[0]["samples"]

    def unload_all(self) -> None:
        self.mm.unload_all_models()
        self.mm.soft_empty_cache()
