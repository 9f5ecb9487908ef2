"""Reading LoRA files of every common Wan flavour into per-layer updates.

A key is ``<module><suffix>``: the module says *where* (see :mod:`casa_core.formats.keys` for the
prefixes and namings), the suffix says *what*. Keys of one module form a group:

* low-rank pairs (up ``out×r``, down ``r×in``) in every suffix style ComfyUI accepts:
  ``lora_up/lora_down.weight``, ``_lora.up/down.weight``, ``lora_B/lora_A.weight``,
  ``lora.up/down.weight``, ``lora_B/lora_A``, ``lora_linear_layer.up/down.weight``,
  ``lora_B/lora_A.default.weight`` (DiffSynth/PEFT), and ``lora_up/lora_down`` without ``.weight``;
* LoHa (``hada_w1_a/b``, ``hada_w2_a/b``) and LoKr (``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or
  ``lokr_w2_a/b``), turned into dense updates;
* ``.alpha`` of the group.

**Scale** (ComfyUI's rules, comfy/weight_adapter/{lora,loha,lokr}.py): low-rank and LoHa use
``alpha / rank`` when an ``.alpha`` tensor exists and **1 when it does not** (not alpha = rank);
LoKr uses ``alpha / dim`` where ``dim`` is the rank of its factorised half (``lokr_w2_b`` rows, else
``lokr_w1_b`` rows) and 1 when neither half is factorised or there is no alpha. The user's strength
multiplies all of it. Files without alpha tensors but with a PEFT configuration (diffusers'
``lora_adapter_metadata`` header entry, flat ``lora_alpha``/``alpha_pattern``/``use_rslora`` header
entries, or an ``adapter_config.json`` beside an ``adapter_model.safetensors``) use its ``lora_alpha``
(per-module ``alpha_pattern`` first), divided by ``sqrt(r)`` instead of ``r`` under ``use_rslora``.
``LowRankUpdate.alpha_rule`` records which rule applied: ``"tensor"``, ``"none"`` or
``"peft[_pattern][_rslora]"``.

Other keys that ComfyUI's LoRA loader applies (``.diff``, ``.diff_b``, ``.set_weight``, ``.w_norm``,
``.b_norm`` on a module the model has) are passed through untouched, renamed to ComfyUI's
``diffusion_model.<module>.<suffix>``. Everything else is left out and listed in ``dropped`` with the
reason: trainer bookkeeping (``use_rslora_flag``, ``use_dora_flag``; see
:data:`~casa_core.formats.keys.BOOKKEEPING_KEYS`), ``.diff_m`` and other suffixes ComfyUI ignores, keys of
modules the model does not have, keys of no known form; so no output carries a key ComfyUI cannot load.
``use_rslora_flag`` set to true switches the alpha rule of tensor alphas to rsLoRA (``alpha / sqrt(r)``);
``use_dora_flag`` set to true is refused (DoRA is not an additive update). Update groups on modules that
are not layers of the model are listed in ``unmatched`` (never silently dropped).

``aliases`` (LoRA module name -> canonical layer) resolve names before any rule of this reader: inside
ComfyUI they are the model's own LoRA key map, so every naming ComfyUI accepts resolves to the model's
keys. ``model_keys`` (canonical parameter names of the model) decide which pass-through keys ComfyUI
would apply; without them, a key on a recognised module with an applicable suffix counts.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import CasaError
from .checkpoint import check_finite
from .keys import (
    BOOKKEEPING_KEYS,
    LOADABLE_SUFFIXES,
    LayerMatcher,
    comfy_key,
    is_diffusers_wan,
    loadable_passthrough,
    strip_lora_prefix,
)
from .safetensors_io import SafeTensorsFile, file_digest

__all__ = ["LowRankUpdate", "DenseUpdate", "LoRAFile", "read_lora"]


@dataclass
class LowRankUpdate:
    """``dense() = scale * up @ down``; ``scale`` already includes the strength and alpha rule."""

    layer: str
    up: torch.Tensor  # float32, out × r
    down: torch.Tensor  # float32, r × in
    scale: float
    keys: list[str]
    alpha: float | None
    alpha_rule: str

    #: a LoRA pair (``up``, ``down``, ``scale``); a :class:`DenseUpdate` is not
    low_rank: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the layer's weight."""
        return (int(self.up.shape[0]), int(self.down.shape[1]))

    def dense(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(up * scale, down)`` in float32: the update is their product."""
        return self.up.float() * float(self.scale), self.down.float()


@dataclass
class DenseUpdate:
    """A full ``out × in`` update (strength and alpha applied); ``kind`` is "loha", "lokr" or "diff"."""

    layer: str
    delta: torch.Tensor
    keys: list[str]
    kind: str

    low_rank: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.delta.shape)

    def factors(self) -> tuple[torch.Tensor, None]:
        """``(delta, None)`` in float32: the update itself, no second factor."""
        return self.delta.float(), None


#: Pass-through suffixes that are additive differences, scaled by strength when applied.
DIFF_SUFFIXES: frozenset[str] = frozenset({"diff", "diff_b", "diff_m", "w_norm", "b_norm"})


@dataclass
class LoRAFile:
    """What :func:`read_lora` found in one file (see the module docstring)."""

    path: str
    format: str
    updates: dict[str, LowRankUpdate | DenseUpdate]
    passthrough: dict[str, torch.Tensor]
    passthrough_layers: dict[str, torch.Tensor]
    unmatched: list[str]
    metadata: dict[str, str]
    strength: float = 1.0
    unmatched_modules: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why it is not carried through
    memo_dir: str | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False, compare=False)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = file_digest(self.path, self.memo_dir)
        return self._digest

    def identity(self) -> str:
        return "lora:" + self.digest() + ":strength=" + repr(self.strength)

    def peft_scale_note(self) -> str | None:
        """A sentence when layers were scaled by a PEFT configuration (``lora_alpha`` in the file's metadata
        or an ``adapter_config.json``), which ComfyUI's own LoRA loader does not read; None otherwise."""
        scaled = {n: u for n, u in self.updates.items() if getattr(u, "alpha_rule", "").startswith("peft")}
        if not scaled:
            return None
        scales = sorted({round(u.scale / self.strength, 6) for u in scaled.values()}) if self.strength else [0.0]
        how = f"x{scales[0]:g}" if len(scales) == 1 else f"x{scales[0]:g} to x{scales[-1]:g}"
        return (f"{len(scaled)} layer(s) scaled {how} by the LoRA's PEFT configuration (lora_alpha / rank); "
                f"ComfyUI's own LoRA loader ignores that configuration, so the original file loaded directly "
                f"in ComfyUI acts at x1 instead (the written files carry the scale in their factors)")

    def passthrough_at_strength(self) -> dict[str, torch.Tensor]:
        """``passthrough`` with the additive differences (``.diff``, ``.diff_b``, ``.diff_m``,
        ``.w_norm``, ``.b_norm``) multiplied by the strength, for a file applied at strength 1;
        ``.set_weight`` and unknown keys stay as they are."""
        out: dict[str, torch.Tensor] = {}
        for key, t in self.passthrough.items():
            scaled = key.rsplit(".", 1)[-1] in DIFF_SUFFIXES and t.is_floating_point() and self.strength != 1.0
            out[key] = (t.float() * self.strength).to(t.dtype) if scaled else t
        return out


# -- key parsing ---------------------------------------------------------------------------------------

#: (up suffix, down suffix) of every low-rank style; the separator before the suffix is included.
_LOWRANK_STYLES: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora_up", ".lora_down"),
)
_PARTNER: dict[str, str] = {}
for _up, _down in _LOWRANK_STYLES:
    _PARTNER[_up], _PARTNER[_down] = _down, _up

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
#: Group roles this reader recognises but cannot turn into a plain additive update.
_UNSUPPORTED: dict[str, str] = {
    "lora_mid.weight": "LoCon mid (Tucker)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_magnitude_vector.weight": "DoRA",
    "reshape_weight": "reshaped (padded)",
    "hada_t1": "LoHa Tucker",
    "hada_t2": "LoHa Tucker",
    "lokr_t2": "LoKr Tucker",
    "oft_blocks": "OFT/BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
}
_PASSTHROUGH = ("diff", "diff_b", "diff_m", "set_weight", "w_norm", "b_norm")

#: suffix (with separator) -> role; roles of low-rank halves are "up"/"down".
_SUFFIX_ROLE: dict[str, str] = {}
for _up, _down in _LOWRANK_STYLES:
    _SUFFIX_ROLE[_up], _SUFFIX_ROLE[_down] = "up", "down"
for _name in ("alpha", *_LOHA, *_LOKR, *_UNSUPPORTED, *_PASSTHROUGH):
    _SUFFIX_ROLE["." + _name] = _name
_SUFFIXES_LONGEST_FIRST = sorted(_SUFFIX_ROLE, key=len, reverse=True)
_UPDATE_ROLES = frozenset({"up", "down", *_LOHA, *_LOKR, *_UNSUPPORTED})


def _parse(key: str) -> tuple[str, str] | None:
    """(module, suffix) for a key with a known suffix, else None."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def _scheme(module: str, keys: list[str]) -> str:
    """The naming scheme a module name comes from (for ``LoRAFile.format``)."""
    for prefix, scheme in (("lora_unet__", "videox_fun"), ("lora_unet_", "kohya"),
                           ("lora_transformer_", "onetrainer"), ("lycoris_", "lycoris"),
                           ("base_model.model.", "peft"), ("transformer.", "diffusers"),
                           ("model.diffusion_model.", "comfy"), ("diffusion_model.", "comfy")):
        if module.startswith(prefix):
            return scheme
    return "diffsynth" if any(k.endswith(".default.weight") for k in keys) else "original"


# -- PEFT alpha ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeftAlpha:
    lora_alpha: float | None
    alpha_pattern: dict[str, float]
    use_rslora: bool

    def alpha_for(self, module: str) -> tuple[float, bool] | None:
        """(alpha, came from alpha_pattern) for a module path in the file's own naming, or None."""
        for pattern, alpha in self.alpha_pattern.items():  # PEFT's get_pattern_key rule
            if re.match(rf"(.*\.)?({pattern})$", module):
                return alpha, True
        return (self.lora_alpha, False) if self.lora_alpha is not None else None


def _peft_alpha(path: str, metadata: dict[str, str]) -> _PeftAlpha | None:
    config: dict | None = None
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except ValueError:
            raise CasaError(f"{path}: its lora_adapter_metadata header entry is not valid JSON", file=path) from None
        if isinstance(packed, dict):
            prefixed = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
            config = prefixed or packed
    elif "lora_alpha" in metadata or "alpha_pattern" in metadata:
        config = dict(metadata)
    elif os.path.basename(path) == "adapter_model.safetensors":
        sibling = os.path.join(os.path.dirname(path), "adapter_config.json")
        if os.path.isfile(sibling):
            try:
                with open(sibling, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (OSError, ValueError):
                raise CasaError(f"{sibling} is not a valid PEFT adapter config", file=sibling) from None
    if not isinstance(config, dict):
        return None

    def number(value: object, what: str) -> float:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise CasaError(f"{path}: PEFT {what} {value!r} is not a number", file=path) from None

    def loaded(value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    lora_alpha = config.get("lora_alpha")
    pattern = loaded(config.get("alpha_pattern")) or {}
    if not isinstance(pattern, dict):
        raise CasaError(f"{path}: PEFT alpha_pattern is not a JSON object", file=path)
    rslora = loaded(config.get("use_rslora", False))
    result = _PeftAlpha(
        lora_alpha=None if lora_alpha is None else number(loaded(lora_alpha), "lora_alpha"),
        alpha_pattern={str(k): number(v, f"alpha_pattern[{k!r}]") for k, v in pattern.items()},
        use_rslora=rslora is True or str(rslora).lower() in ("true", "1"),
    )
    return result if result.lora_alpha is not None or result.alpha_pattern else None


# -- reading ---------------------------------------------------------------------------------------------


class _Reader:
    """State of one :func:`read_lora` call."""

    def __init__(self, f: SafeTensorsFile, layer_shapes: dict[str, tuple[int, int]], strength: float,
                 aliases: dict[str, str] | None = None):
        self.f = f
        self.path = f.path
        self.shapes = layer_shapes
        self.strength = strength
        self.matcher = LayerMatcher(layer_shapes, diffusers_naming=is_diffusers_wan(f.keys()), aliases=aliases)
        self.peft = _peft_alpha(self.path, f.metadata)
        self.rslora = self._flag("use_rslora_flag")
        if self._flag("use_dora_flag"):
            raise CasaError(f"{self.path}: the file is a DoRA (its use_dora_flag is set); DoRA updates are not "
                            f"supported", file=self.path)

    def _flag(self, key: str) -> bool:
        if key not in self.f:
            return False
        t = self.f.get(key)
        return bool(t.numel() == 1 and bool(t.reshape(()).item()))

    def tensor(self, key: str, layer: str | None) -> torch.Tensor:
        t = self.f.get(key)
        check_finite(t, file=self.path, layer=layer, what=f"tensor '{key}'")
        return t

    def matrix(self, key: str, layer: str) -> torch.Tensor:
        t = self.tensor(key, layer)
        if t.ndim < 2:
            raise CasaError(f"{self.path}, layer {layer}: tensor '{key}' is {list(t.shape)}, not a matrix",
                            file=self.path, layer=layer)
        if t.numel() == 0:
            raise CasaError(f"{self.path}, layer {layer}: tensor '{key}' is {list(t.shape)}, empty (a rank-0 "
                            f"LoRA pair, as some pruning tools leave); remove that layer's keys from the file",
                            file=self.path, layer=layer)
        return t.reshape(t.shape[0], -1).float()

    def size_error(self, layer: str, a: int, b: int) -> CasaError:
        m, n = self.shapes[layer]
        return CasaError(f"{self.path}, layer {layer}: the LoRA update is {a}×{b} but the model's layer is "
                         f"{m}×{n} — this LoRA was made for another model size", file=self.path, layer=layer)

    def fit(self, layer: str, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` as the layer's (out, in) matrix; same element count is reshaped as ComfyUI does."""
        shape = tuple(self.shapes[layer])
        if tuple(delta.shape) == shape:
            return delta
        if delta.numel() == math.prod(shape):
            return delta.reshape(shape)
        raise self.size_error(layer, delta.shape[0], delta.numel() // max(delta.shape[0], 1))

    def alpha(self, group: dict[str, str], layer: str) -> float | None:
        key = group.get(".alpha")
        if key is None:
            return None
        t = self.tensor(key, layer)
        if t.numel() != 1:
            raise CasaError(f"{self.path}, layer {layer}: alpha '{key}' has {t.numel()} values, expected one",
                            file=self.path, layer=layer)
        return float(t.float().reshape(()))

    def missing(self, layer: str, have: str, need: str) -> CasaError:
        return CasaError(f"{self.path}, layer {layer}: '{have}' has no partner '{need}' in the file",
                         file=self.path, layer=layer)

    # -- one group per update kind ---------------------------------------------------------------------

    def lowrank(self, module: str, group: dict[str, str], layer: str) -> LowRankUpdate:
        up_key = next((k for s, k in group.items() if _SUFFIX_ROLE[s] == "up"), None)
        down_key = next((k for s, k in group.items() if _SUFFIX_ROLE[s] == "down"), None)
        for have in (up_key, down_key):
            if have is not None:
                suffix = have[len(module):]
                need = module + _PARTNER[suffix]
                if need not in (up_key, down_key):
                    raise self.missing(layer, have, need)
        assert up_key is not None and down_key is not None
        up, down = self.matrix(up_key, layer), self.matrix(down_key, layer)
        if up.shape[1] != down.shape[0]:
            raise CasaError(f"{self.path}, layer {layer}: '{up_key}' has rank {up.shape[1]} but '{down_key}' "
                            f"has rank {down.shape[0]}", file=self.path, layer=layer)
        if (up.shape[0], down.shape[1]) != tuple(self.shapes[layer]):
            raise self.size_error(layer, up.shape[0], down.shape[1])
        rank = down.shape[0]
        alpha = self.alpha(group, layer)
        if alpha is not None and self.rslora:
            scale, rule = alpha / math.sqrt(rank), "tensor_rslora"
        elif alpha is not None:
            scale, rule = alpha / rank, "tensor"
        else:
            found = self.peft.alpha_for(strip_lora_prefix(module)[0]) if self.peft else None
            if found is None:
                scale, rule = 1.0, "none"
            else:
                alpha, from_pattern = found
                rule = "peft" + ("_pattern" if from_pattern else "") + ("_rslora" if self.peft.use_rslora else "")
                scale = alpha / (math.sqrt(rank) if self.peft.use_rslora else rank)
        return LowRankUpdate(layer=layer, up=up, down=down, scale=self.strength * scale,
                             keys=sorted(group.values()), alpha=alpha, alpha_rule=rule)

    def loha(self, module: str, group: dict[str, str], layer: str) -> DenseUpdate:
        for name in _LOHA:
            if "." + name not in group:
                have = next(k for s, k in group.items() if s[1:] in _LOHA)
                raise self.missing(layer, have, f"{module}.{name}")
        w1a, w1b, w2a, w2b = (self.matrix(group["." + name], layer) for name in _LOHA)
        alpha = self.alpha(group, layer)
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        delta = self.fit(layer, (w1a @ w1b) * (w2a @ w2b)) * (self.strength * scale)
        return DenseUpdate(layer=layer, delta=delta, keys=sorted(group.values()), kind="loha")

    def lokr(self, module: str, group: dict[str, str], layer: str) -> DenseUpdate:
        def half(n: int) -> tuple[torch.Tensor, int | None]:
            """Kronecker factor n (1 or 2) and its rank when stored as a product, else None."""
            full = group.get(f".lokr_w{n}")
            if full is not None:
                return self.matrix(full, layer), None
            a, b = group.get(f".lokr_w{n}_a"), group.get(f".lokr_w{n}_b")
            if a is None or b is None:
                have = a or b or next(iter(group.values()))
                raise self.missing(layer, have, f"{module}.lokr_w{n}" + ("_b" if a else "_a" if b else ""))
            wb = self.matrix(b, layer)
            return self.matrix(a, layer) @ wb, wb.shape[0]

        w1, dim1 = half(1)
        w2, dim2 = half(2)
        dim = dim2 if dim2 is not None else dim1  # ComfyUI: the w2 rank wins when both are factorised
        alpha = self.alpha(group, layer)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        delta = self.fit(layer, torch.kron(w1, w2)) * (self.strength * scale)
        return DenseUpdate(layer=layer, delta=delta, keys=sorted(group.values()), kind="lokr")

    def update(self, module: str, group: dict[str, str], layer: str) -> LowRankUpdate | DenseUpdate:
        roles = [_SUFFIX_ROLE[s] for s in group]
        unsupported = sorted(set(roles) & _UNSUPPORTED.keys())
        if unsupported:
            raise CasaError(f"{self.path}, layer {layer}: {_UNSUPPORTED[unsupported[0]]} updates are not "
                            f"supported", file=self.path, layer=layer)
        if roles.count("up") > 1 or roles.count("down") > 1:
            raise CasaError(f"{self.path}, layer {layer}: the file has two low-rank updates for this layer "
                            f"({', '.join(sorted(group.values()))})", file=self.path, layer=layer)
        kinds = [kind for kind, members in (("lowrank", {"up", "down"}), ("loha", set(_LOHA)),
                                            ("lokr", set(_LOKR))) if members.intersection(roles)]
        if len(kinds) > 1:
            raise CasaError(f"{self.path}, layer {layer}: the file mixes {' and '.join(kinds)} updates on "
                            f"this layer", file=self.path, layer=layer)
        if kinds == ["loha"]:
            return self.loha(module, group, layer)
        if kinds == ["lokr"]:
            return self.lokr(module, group, layer)
        return self.lowrank(module, group, layer)


def read_lora(path: str | os.PathLike[str], layer_shapes: dict[str, tuple[int, int]], strength: float = 1.0,
              memo_dir: str | os.PathLike[str] | None = None, *, aliases: dict[str, str] | None = None,
              model_keys: frozenset[str] | set[str] | None = None) -> LoRAFile:
    """Read a LoRA file against a model's layers (canonical name -> (out, in)).

    Strength and alpha are applied (into ``LowRankUpdate.scale`` / ``DenseUpdate.delta`` /
    ``passthrough_layers``); ``passthrough`` keeps the file's tensors untouched. Raises CasaError on
    shape mismatches, NaN/Inf, half-present pairs, unsupported update kinds, and when no key matches a
    layer at all.
    """
    strength = float(strength)
    if not math.isfinite(strength):
        raise CasaError(f"{path}: the strength must be a finite number, got {strength}", file=str(path))
    with SafeTensorsFile(path) as f:
        r = _Reader(f, layer_shapes, strength, aliases)
        keys = f.keys()
        dropped: dict[str, str] = {}
        for key in keys:
            if key.rsplit(".", 1)[-1] in BOOKKEEPING_KEYS:
                dropped[key] = "trainer bookkeeping, not part of any update"
        keys = [k for k in keys if k not in dropped]

        groups: dict[str, dict[str, str]] = {}  # module -> {suffix: key}, update keys and alpha
        loose: list[tuple[str, str | None, str]] = []  # (key, module, suffix) passed through
        for key in keys:
            parsed = _parse(key)
            if parsed is None:
                loose.append((key, None, ""))
                continue
            module, suffix = parsed
            if _SUFFIX_ROLE[suffix] in _UPDATE_ROLES or suffix == ".alpha":
                groups.setdefault(module, {})[suffix] = key
            else:
                loose.append((key, module, suffix))

        updates: dict[str, LowRankUpdate | DenseUpdate] = {}
        schemes: Counter[str] = Counter()  # naming schemes of the update groups
        loose_schemes: Counter[str] = Counter()  # and of the passed-through keys (used when no group)
        unmatched: list[str] = []
        unmatched_modules: list[str] = []
        for module, group in groups.items():
            if not any(_SUFFIX_ROLE[s] in _UPDATE_ROLES for s in group):  # an alpha alone
                loose.extend((k, module, s) for s, k in group.items())
                continue
            schemes[_scheme(module, list(group.values()))] += 1
            layer = r.matcher.match(module)
            if layer is None:
                unmatched.extend(sorted(group.values()))
                unmatched_modules.append(module)
                continue
            if layer in updates:
                raise CasaError(f"{f.path}, layer {layer}: the file has two updates for this layer "
                                f"({updates[layer].keys[0]} and {sorted(group.values())[0]})",
                                file=f.path, layer=layer)
            updates[layer] = r.update(module, group, layer)

        passthrough: dict[str, torch.Tensor] = {}
        passthrough_layers: dict[str, torch.Tensor] = {}
        position = {key: i for i, key in enumerate(keys)}
        siblings: dict[str, list[str]] = {}
        for key, module, suffix in loose:
            if module is not None:
                siblings.setdefault(module, []).append(suffix[1:])
        for key, module, suffix in sorted(loose, key=lambda item: position[item[0]]):
            canonical = r.matcher.canonical_module(module, model_keys) if module is not None else None
            if canonical is None:
                dropped[key] = ("no module of the model has this name" if module is not None
                                else "not a key ComfyUI's LoRA loader knows")
                continue
            if suffix == ".alpha":
                dropped[key] = "an alpha without an update"
                continue
            if model_keys is not None:
                why = loadable_passthrough(canonical, suffix[1:], model_keys, siblings.get(module, ()))
            elif suffix[1:] not in LOADABLE_SUFFIXES:
                why = f"'{suffix}' keys are not applied by ComfyUI's LoRA loader"
            else:
                why = None
            if why is not None:
                dropped[key] = why
                continue
            out_key = comfy_key(canonical, suffix[1:])
            if out_key in passthrough:
                raise CasaError(f"{f.path}: keys '{key}' and another key both mean '{out_key}'", file=f.path)
            layer = r.matcher.match(module) if module is not None and suffix == ".diff" else None
            t = r.tensor(key, layer)
            passthrough[out_key] = t
            if layer is not None:
                passthrough_layers[layer] = r.fit(layer, t.float()) * strength
            if module is not None:
                loose_schemes[_scheme(module, [key])] += 1

        if not updates and not passthrough_layers:
            if not keys:
                raise CasaError(f"{f.path} holds no tensors: it is not a LoRA (an empty or metadata-only file)",
                                file=f.path)
            weights = [k for k in keys if k.endswith(".weight") and len(f.shape(k)) >= 2]
            lora_like = any(tok in k.lower() for k in keys for tok in ("lora", "hada_", "lokr_", ".diff", ".alpha"))
            if weights and not lora_like:
                raise CasaError(f"{f.path} looks like a model checkpoint, not a LoRA (plain weights such as "
                                f"{weights[0]}, and no LoRA update among its {len(keys)} tensors)", file=f.path)
            raise CasaError(f"{f.path}: none of its {len(keys)} keys matches a layer of the model "
                            f"(first keys: {', '.join(keys[:3])})", file=f.path)

        fmt = (schemes or loose_schemes or Counter({"original": 1})).most_common(1)[0][0]
        return LoRAFile(path=f.path, format=fmt, updates=updates, passthrough=passthrough,
                        passthrough_layers=passthrough_layers, unmatched=unmatched, metadata=dict(f.metadata),
                        strength=strength, memo_dir=None if memo_dir is None else os.fspath(memo_dir),
                        unmatched_modules=unmatched_modules, dropped=dropped)
