"""Synthetic Wan checkpoints and LoRA files in every layout the project reads (shared by all tests).

Independent of ``casa_core`` on purpose: files are written with the official ``safetensors`` library
and every key scheme is spelled out here by hand, so tests compare the reader against an independent
statement of each format. Only torch and safetensors are imported, so the ComfyUI tests can load this
module by path.

* :func:`tiny_wan_state_dict` — a complete Wan2.1 t2v (or i2v) state dict in original names, the
  "smallest synthetic checkpoint" of docs/comfyui-notes.md §1 (69 tensors for 2 blocks), which
  ComfyUI's UNETLoader detects as WAN21_T2V.
* :func:`save_checkpoint` — layouts ``"original"`` (no prefix), ``"comfy_repack"`` (keys behind
  ``model.diffusion_model.``, as ComfyUI's checkpoint saver writes them), ``"comfy_repack_prefix"``
  (behind ``diffusion_model.``, a ModelPatcher state dict) and ``"diffusers"`` (diffusers names);
  fp8 ``"none"``, ``"plain"`` (float8_e4m3fn block linears), ``"scaled_legacy"`` (``scale_weight`` +
  ``scaled_fp8`` marker) and ``"scaled_new"`` (``weight_scale`` + ``comfy_quant``).
* :func:`make_lora` / :func:`save_lora` — factors and files in the formats listed in ``LORA_FORMATS``;
  :func:`distill_extras` — the ``.diff``/``.diff_b``/``.diff_m``/``head.head.diff`` keys of a
  distillation LoRA.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "BLOCK_LINEARS",
    "LORA_FORMATS",
    "tiny_wan_state_dict",
    "layer_shapes",
    "save_checkpoint",
    "make_lora",
    "save_lora",
    "distill_extras",
    "diffusers_name",
]

BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
)

LORA_FORMATS = (
    "kohya", "comfy_lora_up_down", "comfy_lora_A_B", "bare_blocks", "diffusers_peft", "peft_base_model",
    "diffsynth_default", "videox_fun", "loha", "lokr", "distill",
)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


# -- checkpoints ---------------------------------------------------------------------------------------


def tiny_wan_state_dict(dim: int = 128, ffn_dim: int = 256, layers: int = 2, seed: int = 0, in_dim: int = 16,
                        out_dim: int = 16, text_dim: int = 4096, freq_dim: int = 256, i2v: bool = False,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A complete Wan2.1 state dict in original names: random weights (std 0.02), norm weights one,
    norm biases zero. ``dim`` must be a multiple of 128 (ComfyUI derives num_heads = dim // 128)."""
    if dim % 128:
        raise ValueError(f"dim must be a multiple of 128 (ComfyUI uses num_heads = dim // 128), got {dim}")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        sd[f"{name}.weight"] = rnd(out_f, in_f)
        sd[f"{name}.bias"] = rnd(out_f)

    def norm(name: str, width: int, bias: bool = False) -> None:
        sd[f"{name}.weight"] = torch.ones(width, dtype=dtype)
        if bias:
            sd[f"{name}.bias"] = torch.zeros(width, dtype=dtype)

    sd["patch_embedding.weight"] = rnd(dim, in_dim, 1, 2, 2)
    sd["patch_embedding.bias"] = rnd(dim)
    linear("text_embedding.0", dim, text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, freq_dim)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", dim * 6, dim)
    if i2v:
        norm("img_emb.proj.0", 1280, bias=True)
        linear("img_emb.proj.1", 1280, 1280)
        linear("img_emb.proj.3", dim, 1280)
        norm("img_emb.proj.4", dim, bias=True)
    for n in range(layers):
        b = f"blocks.{n}"
        sd[f"{b}.modulation"] = rnd(1, 6, dim)
        for lin in BLOCK_LINEARS + (("cross_attn.k_img", "cross_attn.v_img") if i2v else ()):
            linear(f"{b}.{lin}", dim, dim)
        for nm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k") + (
                ("cross_attn.norm_k_img",) if i2v else ()):
            norm(f"{b}.{nm}", dim)
        norm(f"{b}.norm3", dim, bias=True)
        linear(f"{b}.ffn.0", ffn_dim, dim)
        linear(f"{b}.ffn.2", dim, ffn_dim)
    linear("head.head", out_dim * 4, dim)
    sd["head.modulation"] = rnd(1, 2, dim)
    return sd


def layer_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Canonical layer -> (out, in) for every 2-D ``.weight`` of an original-named state dict."""
    return {k[: -len(".weight")]: (int(v.shape[0]), int(v.shape[1]))
            for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2}


# Diffusers names of Wan, written out independently of casa_core.formats.keys.
_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_DIFFUSERS_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # diffusers numbers the norms in call order
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


def diffusers_name(name: str) -> str:
    """Diffusers name of an original module path or parameter key (``blocks.0.self_attn.q.weight``)."""
    for param in ("", ".weight", ".bias", ".scale_weight", ".weight_scale", ".comfy_quant"):
        if param and not name.endswith(param):
            continue
        module = name[: len(name) - len(param)]
        parts = module.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and ".".join(parts[2:]) in _DIFFUSERS_BLOCK:
            return f"blocks.{parts[1]}.{_DIFFUSERS_BLOCK['.'.join(parts[2:])]}{param}"
        if module in _DIFFUSERS_TOP:
            return _DIFFUSERS_TOP[module] + param
    raise KeyError(f"no diffusers name known for {name}")


def _quantize_fp8(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(dim=1) if per_row else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    q = (w / (scale.reshape(-1, 1) if per_row else scale)).to(torch.float8_e4m3fn)
    return q, scale.float()


def save_checkpoint(path, state_dict=None, layout: str = "original", dtype: torch.dtype | None = None,
                    fp8: str = "none", fp8_scale: str = "tensor", metadata: dict[str, str] | None = None) -> Path:
    """Write an original-named ``state_dict`` as a safetensors checkpoint in ``layout``.

    Accepts ``save_checkpoint(path, sd, …)`` and, for the ComfyUI tests, ``save_checkpoint(sd, path)``.
    ``dtype`` casts floating tensors; ``fp8`` quantises the block linears' 2-D weights (scaled flavours
    use scale = amax / 448, per tensor or, with ``fp8_scale="row"`` and ``fp8="scaled_new"``, per row).
    """
    if isinstance(path, Mapping):
        path, state_dict = state_dict, path
    if state_dict is None:
        raise TypeError("save_checkpoint needs a path and a state dict")
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        module = key.rsplit(".", 1)[0]
        is_block_linear = key.startswith("blocks.") and key.endswith(".weight") and t.ndim == 2
        if fp8 == "none" or not is_block_linear:
            out[key] = t
        elif fp8 == "plain":
            out[key] = t.to(torch.float8_e4m3fn)
        elif fp8 == "scaled_legacy":
            q, scale = _quantize_fp8(t, per_row=False)
            out[key], out[f"{module}.scale_weight"] = q, scale.reshape(1)
        elif fp8 == "scaled_new":
            q, scale = _quantize_fp8(t, per_row=fp8_scale == "row")
            out[key], out[f"{module}.weight_scale"] = q, scale
            out[f"{module}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                        dtype=torch.uint8)
        else:
            raise ValueError(f"unknown fp8 mode {fp8!r}")
    if fp8 == "scaled_legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)

    if layout == "original":
        renamed = out
    elif layout == "comfy_repack":
        renamed = {f"model.diffusion_model.{k}": v for k, v in out.items()}
    elif layout == "comfy_repack_prefix":
        renamed = {f"diffusion_model.{k}": v for k, v in out.items()}
    elif layout == "diffusers":
        renamed = {k if k == "scaled_fp8" else diffusers_name(k): v for k, v in out.items()}
    else:
        raise ValueError(f"unknown layout {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(path), metadata=metadata)
    return path


# -- LoRAs ---------------------------------------------------------------------------------------------


def make_lora(shapes: Mapping[str, tuple[int, int]], rank: int = 4, seed: int = 0,
              targets: Iterable[str] | None = None, kind: str = "lowrank") -> dict[str, tuple[torch.Tensor, ...]]:
    """Random float32 factors for ``targets`` (default: every ``blocks.`` layer of ``shapes``).

    kind ``"lowrank"``: (up[out×r], down[r×in]); ``"loha"``: (w1_a[out×r], w1_b[r×in], w2_a, w2_b);
    ``"lokr"``: (w1[4×4], w2_a[out/4×r], w2_b[r×in/4]); ``"lokr_full"``: (w1[4×4], w2[out/4×in/4]).
    """
    g = torch.Generator().manual_seed(seed)
    names = list(targets) if targets is not None else [n for n in shapes if n.startswith("blocks.")]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    factors: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in names:
        out, inp = shapes[name]
        if kind == "lowrank":
            factors[name] = (rnd(out, rank), rnd(rank, inp))
        elif kind == "loha":
            factors[name] = (rnd(out, rank), rnd(rank, inp), rnd(out, rank), rnd(rank, inp))
        elif kind == "lokr":
            factors[name] = (rnd(4, 4), rnd(out // 4, rank), rnd(rank, inp // 4))
        elif kind == "lokr_full":
            factors[name] = (rnd(4, 4), rnd(out // 4, inp // 4))
        else:
            raise ValueError(f"unknown LoRA kind {kind!r}")
    return factors


def _kohya(layer: str) -> str:
    return layer.replace(".", "_")


def save_lora(path, factors: Mapping[str, tuple[torch.Tensor, ...]], fmt: str,
              alpha: float | Mapping[str, float] | None = None, dtype: torch.dtype = torch.float32,
              extra: Mapping[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
              alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False) -> Path:
    """Write ``factors`` (from :func:`make_lora`) as a LoRA file in format ``fmt`` (see ``LORA_FORMATS``).

    ``alpha`` (one value or one per layer) becomes ``.alpha`` tensors, except for ``diffusers_peft``
    (diffusers' ``lora_adapter_metadata`` JSON header entry, keys prefixed ``transformer.``) and
    ``peft_base_model`` (flat ``lora_alpha``/``alpha_pattern``/``use_rslora`` header entries), which
    also take ``alpha_pattern`` and ``use_rslora``. ``extra`` tensors are written under their keys as
    given (``distill``: ``.diff``/``.diff_b``/``.diff_m`` keys from :func:`distill_extras`).
    """
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    meta = dict(metadata or {})

    def alpha_of(layer: str) -> float | None:
        return alpha.get(layer) if isinstance(alpha, Mapping) else alpha

    def put(key: str, t: torch.Tensor) -> None:
        sd[key] = t.to(dtype).contiguous()

    def put_alpha(module: str, layer: str) -> None:
        a = alpha_of(layer)
        if a is not None:
            sd[f"{module}.alpha"] = torch.tensor(float(a))

    lowrank_styles = {  # fmt -> (module name of a layer, up suffix, down suffix, alpha as tensor)
        "kohya": (lambda n: f"lora_unet_{_kohya(n)}", "lora_up.weight", "lora_down.weight", True),
        "videox_fun": (lambda n: f"lora_unet__{_kohya(n)}", "lora_up.weight", "lora_down.weight", True),
        "comfy_lora_up_down": (lambda n: f"diffusion_model.{n}", "lora_up.weight", "lora_down.weight", True),
        "comfy_lora_A_B": (lambda n: f"diffusion_model.{n}", "lora_B.weight", "lora_A.weight", True),
        "distill": (lambda n: f"diffusion_model.{n}", "lora_up.weight", "lora_down.weight", True),
        "bare_blocks": (lambda n: n, "lora_up.weight", "lora_down.weight", True),
        "diffsynth_default": (lambda n: n, "lora_B.default.weight", "lora_A.default.weight", False),
        "diffusers_peft": (lambda n: f"transformer.{diffusers_name(n)}", "lora_B.weight", "lora_A.weight", False),
        "peft_base_model": (lambda n: f"base_model.model.{diffusers_name(n)}", "lora_B.weight", "lora_A.weight",
                            False),
    }
    if fmt in lowrank_styles:
        name_of, up_suffix, down_suffix, alpha_tensor = lowrank_styles[fmt]
        for layer, (up, down) in factors.items():
            module = name_of(layer)
            put(f"{module}.{up_suffix}", up)
            put(f"{module}.{down_suffix}", down)
            if alpha_tensor:
                put_alpha(module, layer)
        if not alpha_tensor and (alpha is not None or alpha_pattern):
            if fmt == "diffsynth_default":
                raise ValueError("DiffSynth files carry no alpha")
            if isinstance(alpha, Mapping):
                raise ValueError("PEFT formats take one lora_alpha (plus alpha_pattern)")
            rank = next(iter(factors.values()))[1].shape[0]
            config: dict[str, object] = {"r": rank, "use_rslora": use_rslora}
            if alpha is not None:
                config["lora_alpha"] = alpha
            if alpha_pattern:
                config["alpha_pattern"] = dict(alpha_pattern)
            if fmt == "diffusers_peft":
                meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
            else:
                meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()})
    elif fmt == "loha":
        for layer, (w1a, w1b, w2a, w2b) in factors.items():
            module = f"lora_unet_{_kohya(layer)}"
            for name, t in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
                put(f"{module}.{name}", t)
            put_alpha(module, layer)
    elif fmt == "lokr":
        for layer, parts in factors.items():
            module = f"lora_unet_{_kohya(layer)}"
            put(f"{module}.lokr_w1", parts[0])
            if len(parts) == 3:
                put(f"{module}.lokr_w2_a", parts[1])
                put(f"{module}.lokr_w2_b", parts[2])
            else:
                put(f"{module}.lokr_w2", parts[1])
            put_alpha(module, layer)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    for key, t in (extra or {}).items():
        sd[key] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta or None)
    return path


def distill_extras(state_dict: Mapping[str, torch.Tensor], seed: int = 1, std: float = 1e-3
                   ) -> dict[str, torch.Tensor]:
    """The non-low-rank keys of a distillation LoRA (lightx2v/CausVid style), ComfyUI-named: ``.diff``
    on every norm weight, ``.diff_b`` on every linear bias, ``blocks.N.diff_m`` on the modulation and a
    full ``head.head.diff``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape: torch.Size) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    extras: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        module, _, param = key.rpartition(".")
        if not key.startswith(("blocks.", "head.")):
            continue
        if param == "weight" and t.ndim == 1:
            extras[f"diffusion_model.{module}.diff"] = rnd(t.shape)
        elif param == "bias" and f"{module}.weight" in state_dict and state_dict[f"{module}.weight"].ndim == 2:
            extras[f"diffusion_model.{module}.diff_b"] = rnd(t.shape)
        elif param == "modulation" and module.startswith("blocks."):
            extras[f"diffusion_model.{module}.diff_m"] = rnd(t.shape)
    extras["diffusion_model.head.head.diff"] = rnd(state_dict["head.head.weight"].shape)
    return extras
