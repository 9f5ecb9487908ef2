"""Key names: the only place in the project that knows how tensors and LoRA modules are named.

**Canonical layer name** = the module path in the model's original (non-diffusers) naming, without
``.weight``: ``blocks.0.self_attn.q``, ``blocks.3.ffn.0``, ``head.head``. ComfyUI uses the same names
(inside a ModelPatcher they are prefixed with ``diffusion_model.``).

Three naming families reach us:

* checkpoints: original names, optionally behind a wrapper prefix (``model.diffusion_model.`` and
  friends, see :func:`strip_model_prefix`), or diffusers names (:func:`diffusers_to_original`);
* LoRA files: the same module paths behind LoRA-side prefixes (``diffusion_model.``, ``transformer.``,
  ``base_model.model.``, …) or in kohya's underscore form (``lora_unet_blocks_0_self_attn_q``), which
  :class:`LayerMatcher` resolves against the model's known module paths;
* diffusers names of Wan (``attn1.to_q``, ``ffn.net.0.proj``, ``proj_out``, ``condition_embedder.…``,
  ``scale_shift_table``), translated with the table below, which is the inverse of diffusers'
  ``WanTransformerConverter.rename_dict`` (scripts/convert_wan_to_diffusers.py).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MODEL_PREFIXES",
    "LORA_PREFIXES",
    "strip_model_prefix",
    "strip_lora_prefix",
    "diffusers_to_original",
    "original_to_diffusers",
    "is_diffusers_wan",
    "comfy_key",
    "kohya_name",
    "LayerMatcher",
]

#: Wrapper prefixes of checkpoint keys, removed by :func:`strip_model_prefix` (longest first).
MODEL_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "model.model.", "net.")

#: LoRA-side prefixes: (prefix, is the rest in kohya underscore form?). Longest first, so that
#: ``lora_unet__`` (VideoX-Fun) wins over ``lora_unet_`` and ``base_model.model.transformer.`` over
#: ``base_model.model.``.
LORA_PREFIXES: tuple[tuple[str, bool], ...] = (
    ("base_model.model.transformer.", False),
    ("model.diffusion_model.", False),
    ("base_model.model.", False),
    ("lora_transformer_", True),
    ("diffusion_model.", False),
    ("lora_unet__", True),
    ("transformer.", False),
    ("lora_unet_", True),
    ("lycoris_", True),
)

# (original, diffusers) module paths, outside the blocks and relative to ``blocks.N.``.
_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)
_IN_BLOCK: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("self_attn", "attn1"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("cross_attn", "attn2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    # The original block applies norm1, norm3 (cross-attention, affine), norm2; diffusers renumbers
    # them in call order, so norm2 and norm3 swap names.
    ("norm2", "norm3"),
    ("norm3", "norm2"),
    ("modulation", "scale_shift_table"),
)
_BLOCK = re.compile(r"^(blocks\.\d+)(?:\.(.*))?$")
_DIFFUSERS_MARKERS = re.compile(
    r"^(condition_embedder\.|proj_out(\.|$)|scale_shift_table$|blocks\.\d+\.(attn1|attn2|ffn\.net)\.)"
)


def strip_model_prefix(key: str) -> str:
    """Remove one checkpoint wrapper prefix (``model.diffusion_model.``, ``diffusion_model.``,
    ``model.model.``, ``net.``) from ``key``; other keys are returned unchanged."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def strip_lora_prefix(module: str) -> tuple[str, bool]:
    """Remove one LoRA-side prefix; returns (rest, whether the rest is in kohya underscore form)."""
    for prefix, underscore in LORA_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):], underscore
    return module, False


def _rename(name: str, table: tuple[tuple[str, str], ...], *, source: int) -> str:
    """Rewrite the leading path components of ``name`` by the longest matching table entry."""
    best: tuple[str, str] | None = None
    for pair in table:
        frm = pair[source]
        if (name == frm or name.startswith(frm + ".")) and (best is None or len(frm) > len(best[source])):
            best = pair
    if best is None:
        return name
    return best[1 - source] + name[len(best[source]):]


def _translate(name: str, *, source: int) -> str:
    m = _BLOCK.match(name)
    if m:
        rest = m.group(2)
        return m.group(1) if rest is None else f"{m.group(1)}.{_rename(rest, _IN_BLOCK, source=source)}"
    return _rename(name, _TOP_LEVEL, source=source)


def diffusers_to_original(name: str) -> str:
    """Translate a Wan diffusers key or module path (without wrapper prefix) to the original naming.

    Works on module paths and on full keys (``….weight``, ``….lora_A.weight``). Names it does not know
    are returned unchanged. Only call it on names that *are* diffusers names: ``norm2``/``norm3`` swap,
    so applying it to an original name would rename ``norm3``.
    """
    return _translate(name, source=1)


def original_to_diffusers(name: str) -> str:
    """The inverse of :func:`diffusers_to_original`."""
    return _translate(name, source=0)


def is_diffusers_wan(keys: Iterable[str]) -> bool:
    """True when tensor or module names (wrapper and LoRA prefixes allowed) use Wan's diffusers naming."""
    for key in keys:
        name, underscore = strip_lora_prefix(strip_model_prefix(key))
        if not underscore and _DIFFUSERS_MARKERS.match(name):
            return True
    return False


def comfy_key(module: str, suffix: str) -> str:
    """The ComfyUI-loadable LoRA key of ``suffix`` (``lora_up.weight``, ``diff``, …) on ``module``."""
    return f"diffusion_model.{module}.{suffix}"


def kohya_name(module: str) -> str:
    """A module path in kohya underscore form (``blocks.0.self_attn.q`` -> ``blocks_0_self_attn_q``)."""
    return module.replace(".", "_")


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class LayerMatcher:
    """Resolve module paths as found in LoRA files to canonical names of a model's layers.

    ``layer_names`` are canonical layer names (2-D weights); their ancestors (``blocks.0``,
    ``blocks.0.self_attn``, …) are known modules too, which lets the kohya underscore form of non-layer
    modules (norms, modulation) and of layers the model lacks (i2v ``k_img`` on a t2v model) be split
    back into a path. ``diffusers_naming`` says the file uses Wan's diffusers names; it only matters for
    non-layer modules whose names are ambiguous between the two namings (``norm2``/``norm3``), layer
    names are translated either way.
    """

    def __init__(self, layer_names: Iterable[str], *, diffusers_naming: bool = False):
        self.layers: frozenset[str] = frozenset(layer_names)
        self.diffusers_naming = diffusers_naming
        parents: set[str] = set()
        for layer in self.layers:
            parents.update(_ancestors(layer))
        modules = parents | self.layers
        self._parents = frozenset(parents)
        self._modules = frozenset(modules)
        # kohya underscore form -> canonical module path; None marks an ambiguous form.
        underscore: dict[str, str | None] = {}

        def add(form: str, canonical: str) -> None:
            known = underscore.get(form, canonical)
            underscore[form] = canonical if known == canonical else None

        for module in modules:
            add(kohya_name(module), module)
        for layer in self.layers:
            diff_name = original_to_diffusers(layer)
            add(kohya_name(diff_name), layer)
            for anc in _ancestors(diff_name):
                add(kohya_name(anc), diffusers_to_original(anc))
        self._underscore = underscore

    def _from_underscore(self, rest: str) -> str | None:
        exact = self._underscore.get(rest)
        if exact is not None:
            return exact
        # Longest prefix naming a parent module (blocks.0.cross_attn, not the leaf cross_attn.k), then
        # the remainder as one path component with its own "_" kept (k_img, norm_q, norm3).
        i = len(rest)
        while (i := rest.rfind("_", 0, i)) > 0:
            head = self._underscore.get(rest[:i])
            if head is not None and head in self._parents:
                return f"{head}.{rest[i + 1:]}"
        return None

    def match(self, module_path: str) -> str | None:
        """The canonical layer ``module_path`` refers to, or None when it is not one of the layers."""
        rest, underscore = strip_lora_prefix(module_path)
        if underscore:
            found = self._underscore.get(rest)
            return found if found in self.layers else None
        for candidate in (module_path, rest):
            if candidate in self.layers:
                return candidate
            translated = diffusers_to_original(candidate)
            if translated in self.layers:
                return translated
        return None

    def canonical_module(self, module_path: str) -> str | None:
        """The canonical path of any module (layer or not), or None when it is not recognised.

        A module is recognised when it is a layer, or its path (after the LoRA-side prefix is removed
        and diffusers names are translated) starts with a known module of the model (``blocks.0``,
        ``head``, …). Used to give pass-through keys (norm diffs, bias diffs) ComfyUI-loadable names.
        """
        layer = self.match(module_path)
        if layer is not None:
            return layer
        rest, underscore = strip_lora_prefix(module_path)
        if underscore:
            return self._from_underscore(rest)
        path = diffusers_to_original(rest) if self.diffusers_naming else rest
        root = path.split(".", 1)[0]
        return path if root in self._modules else None
