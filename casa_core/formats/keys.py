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
  ``WanTransformerConverter.rename_dict`` (scripts/convert_wan_to_diffusers.py);
* HunyuanVideo (and 1.5) in its original release naming (``double_blocks.N.img_attn_qkv``,
  ``img_mlp.fc1``, ``img_mod.linear``, ``txt_in.t_embedder.mlp.0`` …), which ComfyUI renames when it
  loads the model (``img_attn.qkv``, ``img_mlp.0``, ``img_mod.lin``, ``txt_in.t_embedder.in_layer``):
  :func:`hunyuan_to_comfy` (and its inverse for LoRA names, :func:`comfy_to_hunyuan`). The older
  diffusion-pipe HunyuanVideo LoRAs use the original names behind ``transformer.``.

So the canonical name of a layer is the one the ComfyUI model uses. Inside ComfyUI the pack goes one
step further and takes the model's own LoRA key map (``comfy.lora.model_lora_keys_unet``) as aliases
(``LayerMatcher(aliases=…)``), so every LoRA naming ComfyUI accepts resolves to the model's keys.

Trainer bookkeeping tensors (:data:`BOOKKEEPING_KEYS`) are not part of any update; the reader drops them
and says so. Which pass-through keys ComfyUI's LoRA loader applies at all is :func:`loadable_passthrough`.
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
    "PATCH_PREFIX",
    "patch_key",
    "strip_patch_prefix",
    "layer_of_model_key",
    "natural_key",
    "kohya_name",
    "LayerMatcher",
    "hunyuan_to_comfy",
    "comfy_to_hunyuan",
    "is_hunyuan_family",
    "canonical_names",
    "naming_of",
    "BOOKKEEPING_KEYS",
    "LOADABLE_SUFFIXES",
    "loadable_passthrough",
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


# HunyuanVideo (1.0 / 1.5): original release name fragment -> the name ComfyUI's model uses. Each rule
# rewrites a substring; none of them matches a ComfyUI name, so applying them twice changes nothing.
_HUNYUAN_RULES: tuple[tuple[str, str], ...] = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."),  # img_mod / txt_mod
    (".modulation.linear.", ".modulation.lin."),  # single blocks
    ("_attn_qkv.", "_attn.qkv."),  # img_attn / txt_attn / the token refiner's self_attn
    ("_attn_proj.", "_attn.proj."),
    ("_attn_q_norm.", "_attn.norm.query_norm."),
    ("_attn_k_norm.", "_attn.norm.key_norm."),
    (".q_norm.", ".norm.query_norm."),  # single blocks
    (".k_norm.", ".norm.key_norm."),
    ("_mlp.fc1.", "_mlp.0."),  # img_mlp / txt_mlp
    ("_mlp.fc2.", "_mlp.2."),
    (".mlp.fc1.", ".mlp.0."),  # the token refiner's mlp
    (".mlp.fc2.", ".mlp.2."),
    ("_in.mlp.0.", "_in.in_layer."),  # time_in / vector_in / guidance_in / time_r_in
    ("_in.mlp.2.", "_in.out_layer."),
)


def _rewriter(pairs: Iterable[tuple[str, str]]) -> tuple[re.Pattern[str], dict[str, str]]:
    table = dict(pairs)
    return re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))), table


def _one_pass(text: str, rw: tuple[re.Pattern[str], dict[str, str]]) -> str:
    """Every rule applied once, left to right, never to the output of another rule."""
    pattern, table = rw
    return pattern.sub(lambda m: table[m.group(0)], text)


_TO_COMFY = _rewriter(_HUNYUAN_RULES)
# norms are not layers: the inverse (for LoRA module names) only needs the layers' rules
_TO_HUNYUAN = _rewriter((to, frm) for frm, to in _HUNYUAN_RULES if "norm" not in to)
_HUNYUAN_ROOTS = ("double_blocks.", "single_blocks.", "txt_in.", "img_in.", "final_layer.")


def is_hunyuan_family(keys: Iterable[str]) -> bool:
    """True when tensor or module names (prefixes allowed) look like HunyuanVideo's (either naming)."""
    for key in keys:
        name, _ = strip_lora_prefix(strip_model_prefix(key))
        if name.startswith(("double_blocks", "single_blocks")) and ("attn" in name or "mod" in name
                                                                   or "linear" in name or "mlp" in name):
            return True
    return False


def hunyuan_to_comfy(name: str) -> str:
    """A HunyuanVideo key or module path in the original release naming, in ComfyUI's naming.

    ``double_blocks.0.img_attn_qkv.weight`` -> ``double_blocks.0.img_attn.qkv.weight``; module paths
    (no ``.weight``) work too. Names already in ComfyUI's naming, and names of other families, are
    returned unchanged. RMSNorm ``.scale`` tensors become ``.weight``.
    """
    if not name.startswith(_HUNYUAN_ROOTS) and not any(name.startswith(p) for p in ("time_in.", "vector_in.",
                                                                                   "guidance_in.", "time_r_in.",
                                                                                   "byt5_in.", "vision_in.")):
        return name
    out = _one_pass(name + ".", _TO_COMFY)  # rules match whole path components
    out = out[:-1]
    if out.endswith(".scale"):
        out = out[: -len(".scale")] + ".weight"
    return out


def comfy_to_hunyuan(name: str) -> str:
    """The inverse of :func:`hunyuan_to_comfy` on layer module paths (for LoRA names in the original
    naming, e.g. diffusion-pipe's ``transformer.double_blocks.0.img_attn_qkv``)."""
    if not name.startswith(_HUNYUAN_ROOTS) and not name.startswith(("time_in.", "vector_in.", "guidance_in.",
                                                                    "time_r_in.")):
        return name
    out = _one_pass(name + ".", _TO_HUNYUAN)
    return out[:-1]


def naming_of(keys: Iterable[str]) -> str:
    """A short description of the naming a file's keys use (for error sentences)."""
    keys = list(keys)
    if is_hunyuan_family(keys):
        stripped = [strip_lora_prefix(strip_model_prefix(k))[0] for k in keys]
        original = any(hunyuan_to_comfy(k) != k for k in stripped)
        return "HunyuanVideo, original naming" if original else "HunyuanVideo, ComfyUI naming"
    if is_diffusers_wan(keys):
        return "Wan, diffusers naming"
    if any(strip_model_prefix(k).startswith("blocks.") for k in keys):
        return "Wan, original/ComfyUI naming"
    first = next(iter(keys), "")
    return f"unknown naming (e.g. {first})" if first else "no keys"


def canonical_names(keys: Iterable[str]) -> dict[str, str]:
    """File key -> canonical key (the ComfyUI model's parameter name), for a checkpoint's tensors.

    Removes one wrapper prefix, translates Wan's diffusers names and HunyuanVideo's original names.
    Keys are returned with their suffix (``.weight``, ``.bias``).
    """
    keys = list(keys)
    diffusers = is_diffusers_wan(keys)
    hunyuan = is_hunyuan_family(keys)
    out: dict[str, str] = {}
    for key in keys:
        name = strip_model_prefix(key)
        if diffusers:
            name = diffusers_to_original(name)
        elif hunyuan:
            name = hunyuan_to_comfy(name)
        out[key] = name
    return out


#: Tensors trainers store beside the updates that no loader applies: musubi-tuner forks
#: (blissful-tuner) write network-level ``use_rslora_flag`` / ``use_dora_flag`` buffers. Dropped on
#: read; ``use_rslora_flag`` is honoured (scale alpha / sqrt(rank)), ``use_dora_flag`` refused.
BOOKKEEPING_KEYS: frozenset[str] = frozenset({"use_rslora_flag", "use_dora_flag"})

#: Pass-through suffixes ComfyUI's ``comfy.lora.load_lora`` applies (``.diff_m`` and others are
#: logged as "lora key not loaded" and ignored).
LOADABLE_SUFFIXES: frozenset[str] = frozenset({"diff", "diff_b", "set_weight", "w_norm", "b_norm"})


def loadable_passthrough(module: str, suffix: str, model_keys: frozenset[str] | set[str],
                         siblings: Iterable[str] = ()) -> str | None:
    """None when ComfyUI's LoRA loader applies ``<module>.<suffix>`` to a model with parameters
    ``model_keys`` (canonical names: ``blocks.0.norm3.weight``, ``blocks.0.modulation`` …), else the
    reason it would not. ``siblings`` are the other suffixes present on the same module."""
    if suffix not in LOADABLE_SUFFIXES:
        return f"'.{suffix}' keys are not applied by ComfyUI's LoRA loader"
    has_weight = f"{module}.weight" in model_keys
    if suffix in ("diff_b", "b_norm"):
        if not (has_weight and f"{module}.bias" in model_keys):
            return f"the model has no bias {module}.bias"
        if suffix == "b_norm" and "w_norm" not in set(siblings):
            return "ComfyUI applies '.b_norm' only beside a '.w_norm'"
        return None
    if has_weight or module in model_keys:
        return None
    return f"the model has no parameter {module}"


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


#: ComfyUI's prefix of the diffusion model's keys: its parameters inside a ModelPatcher
#: (``model.model.state_dict()``), its patch keys and the keys of the LoRA files it loads.
PATCH_PREFIX = "diffusion_model."


def comfy_key(module: str, suffix: str) -> str:
    """The ComfyUI-loadable LoRA key of ``suffix`` (``lora_up.weight``, ``diff``, …) on ``module``."""
    return f"{PATCH_PREFIX}{module}.{suffix}"


def patch_key(layer: str) -> str:
    """The key of a layer's weight inside a ComfyUI ModelPatcher (what ``add_patches`` takes)."""
    return f"{PATCH_PREFIX}{layer}.weight"


def strip_patch_prefix(key: str) -> str | None:
    """A ModelPatcher key without :data:`PATCH_PREFIX` (``diffusion_model.blocks.0.x.weight`` ->
    ``blocks.0.x.weight``); None for keys outside the diffusion model."""
    return key[len(PATCH_PREFIX):] if key.startswith(PATCH_PREFIX) else None


def layer_of_model_key(name: str) -> str:
    """A layer name as a person may copy it from ComfyUI (``diffusion_model.<layer>.weight``,
    ``model.diffusion_model.<layer>.weight``, ``<layer>.weight``) as the canonical ``<layer>``; other
    names unchanged."""
    bare = name[:-len(".weight")] if name.endswith(".weight") else name
    for prefix in ("model." + PATCH_PREFIX, PATCH_PREFIX):
        if bare.startswith(prefix):
            return bare[len(prefix):]
    return bare


def natural_key(name: str) -> list:
    """Sort key putting layer names in the model's order (``blocks.2`` before ``blocks.10``)."""
    return [int(p) if p.isdigit() else p for p in name.replace("_", ".").split(".")]


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

    def __init__(self, layer_names: Iterable[str], *, diffusers_naming: bool = False,
                 aliases: dict[str, str] | None = None):
        self.layers: frozenset[str] = frozenset(layer_names)
        self.diffusers_naming = diffusers_naming
        #: exact LoRA module names -> canonical layer (inside ComfyUI: the model's own LoRA key map)
        self.aliases: dict[str, str] = {k: v for k, v in (aliases or {}).items() if v in self.layers}
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
            hy_name = comfy_to_hunyuan(layer)
            if hy_name != layer:
                add(kohya_name(hy_name), layer)
        for alias, layer in self.aliases.items():
            rest, underscore_form = strip_lora_prefix(alias)
            if underscore_form:
                add(rest, layer)
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
        alias = self.aliases.get(module_path)
        if alias is not None:
            return alias
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
            translated = hunyuan_to_comfy(candidate)
            if translated in self.layers:
                return translated
        return None

    def canonical_module(self, module_path: str, model_keys=None) -> str | None:
        """The canonical path of any module (layer or not), or None when it is not recognised.

        A module is recognised when it is a layer, or its path (after the LoRA-side prefix is removed
        and diffusers names are translated) starts with a known module of the model (``blocks.0``,
        ``head``, …), or, given the model's tensor names (``model_keys``), when it has a weight or a bias
        there (a top-level module that is no layer: Wan's ``patch_embedding`` convolution). Used to give
        pass-through keys (norm diffs, bias diffs) ComfyUI-loadable names.
        """
        layer = self.match(module_path)
        if layer is not None:
            return layer
        rest, underscore = strip_lora_prefix(module_path)
        if underscore:
            return self._from_underscore(rest)
        path = diffusers_to_original(rest) if self.diffusers_naming else rest
        root = path.split(".", 1)[0]
        if root in self._modules:
            return path
        if model_keys is not None and (f"{path}.weight" in model_keys or f"{path}.bias" in model_keys):
            return path
        return None
