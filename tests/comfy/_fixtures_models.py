"""Tiny Wan2.1 model trios and LoRA files for the node tests, written into a ComfyUI base directory.

Everything is generated (no download), deterministic (seeded) and small:

* ``base``: a complete Wan2.1 t2v state dict from ``casa_core.synth.wan_state_dict`` in float32 (linear
  weights with a decaying singular spectrum, so the SVD basis has structure to route on);
* ``distilled``: ``base`` plus a drift of ``rel_drift`` (0.5 %) of every block linear's norm, 80 % of it
  rotating the leading singular directions and 20 % noise (``casa_core.synth.distill``), float32;
* ``distilled_fp8`` (plain float8_e4m3fn block linears) and ``distilled_fp8_scaled`` (``weight_scale`` +
  ``comfy_quant``, the format ComfyUI itself writes), both through ``tests/helpers/lora_formats.py``;
* ``distill_lora``: a lightx2v/CausVid-style distillation LoRA (``diffusion_model.…lora_up/lora_down`` with
  ``.alpha`` on every block linear, concentrated on the leading singular directions, plus ``.diff`` /
  ``.diff_b`` / ``.diff_m`` and a full ``head.head.diff``);
* ``style``: ONE style LoRA (``casa_core.synth.style_lora``, rank 16, alpha 8) saved in several trainers'
  formats that all mean the same update (alpha folded into ``up`` where a format has no alpha);
* ``other_size``: a kohya LoRA for a Wan with dim 256 (does not fit the dim-128 models).

File names carry a prefix so that several sets (and their caches) live side by side in one server.
The state dicts are returned too, so tests can compute ground truth without re-reading the files.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _tiny import lora_formats as lf  # tests/helpers/lora_formats.py (and the repository root on sys.path)

STYLE_RANK = 16
STYLE_ALPHA = 8.0
DISTILL_RANK = 16
DISTILL_ALPHA = 8.0

# format -> (lora_formats format, alpha written as a tensor/metadata?)
STYLE_FORMATS = {
    "kohya": ("kohya", True),                  # musubi-tuner: lora_unet_blocks_0_self_attn_q.lora_down.weight + .alpha
    "videox_fun": ("videox_fun", True),        # lora_unet__blocks_0_…
    "comfy_A_B": ("comfy_lora_A_B", False),    # diffusion-pipe / ai-toolkit: diffusion_model.….lora_A.weight, no alpha
    "diffusers": ("diffusers_peft", True),     # transformer.blocks.0.attn1.to_q.lora_A.weight, alpha in metadata
    "diffsynth": ("diffsynth_default", False),  # blocks.0.self_attn.q.lora_A.default.weight, no alpha
}


@dataclass
class TinySet:
    """File names (relative to their ComfyUI model folder) and the tensors behind them."""

    prefix: str
    base_dir: Path
    shape: tuple[int, int, int]
    base: str
    distilled: str
    distilled_fp8: str | None = None
    distilled_fp8_scaled: str | None = None
    distill_lora: str | None = None
    style: dict[str, str] = field(default_factory=dict)
    other_size: str | None = None
    base_sd: dict = field(default_factory=dict, repr=False)
    distilled_sd: dict = field(default_factory=dict, repr=False)

    @property
    def style_lora(self) -> str:
        """The reference style LoRA (kohya/musubi format)."""
        return self.style["kohya"]

    def unet_path(self, name: str) -> Path:
        return self.base_dir / "models" / "diffusion_models" / name

    def lora_path(self, name: str) -> Path:
        return self.base_dir / "models" / "loras" / name

    def block_layers(self) -> list[str]:
        return sorted(k[: -len(".weight")] for k, v in self.base_sd.items()
                      if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2)


def _save(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def _style_factors(svd: dict, rank: int, alpha: float, rel_strength: float, seed: int, layers=None) -> dict:
    """(up, down) in float32 (bf16-exact values) of casa_core.synth.style_lora, WITHOUT the alpha scale."""
    from casa_core import synth

    sd = synth.style_lora(svd, rank=rank, alpha=alpha, rel_strength=rel_strength, seed=seed, layers=layers)
    out = {}
    for name in svd:
        key = "lora_unet_" + name.replace(".", "_")
        if key + ".lora_up.weight" in sd:
            out[name] = (sd[key + ".lora_up.weight"].float(), sd[key + ".lora_down.weight"].float())
    return out


def _distill_factors(svd: dict, base_sd: dict, rank: int, alpha: float, rel: float, seed: int) -> dict:
    """Low-rank (up, down) per block linear, ``scale * up @ down`` of norm ``rel * ||W||`` (scale alpha/rank),
    three quarters of it in the 8 leading singular directions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (u, s, v) in svd.items():
        if not name.startswith("blocks."):
            continue
        h = 8
        up_head = u[:, :h] @ torch.randn(h, rank, generator=g)
        down_head = torch.randn(rank, h, generator=g) @ v[:, :h].T
        up = up_head / up_head.norm() + 0.5 * torch.randn(u.shape[0], rank, generator=g) / (u.shape[0] * rank) ** 0.5
        noise = torch.randn(rank, v.shape[0], generator=g) / (v.shape[0] * rank) ** 0.5
        down = down_head / down_head.norm() + 0.5 * noise
        w = base_sd[name + ".weight"].float()
        cur = float((up @ down).norm()) * alpha / rank
        up = up * (rel * float(w.norm()) / cur)
        out[name] = (up, down)
    return out


def write_tiny_set(base_dir, prefix: str = "casa_t", seed: int = 0, dim: int = 128, ffn_dim: int = 256,
                   blocks: int = 2, rel_drift: float = 5e-3, fp8: bool = True, distill_lora: bool = True,
                   style_formats=tuple(STYLE_FORMATS), other_size: bool = True, style_layers=None) -> TinySet:
    """Write a base/distilled pair and the optional extras into ``base_dir/models``.

    Names: ``<prefix>_base.safetensors``, ``<prefix>_distilled.safetensors``, ``<prefix>_distilled_fp8…``
    in ``diffusion_models``; ``<prefix>_style_<fmt>.safetensors``, ``<prefix>_distill_lora.safetensors``,
    ``<prefix>_other_size_lora.safetensors`` in ``loras``.
    """
    from casa_core import synth

    base_dir = Path(base_dir)
    unet = base_dir / "models" / "diffusion_models"
    loras_dir = base_dir / "models" / "loras"
    shape = synth.WanShape(dim=dim, ffn_dim=ffn_dim, blocks=blocks)
    base_sd, svd = synth.wan_state_dict(shape, seed=seed, dtype=torch.float32)
    distilled_sd = synth.distill(base_sd, svd, rel_drift=rel_drift, seed=seed + 1, dtype=torch.float32)
    ts = TinySet(prefix=prefix, base_dir=base_dir, shape=(dim, ffn_dim, blocks),
                 base=f"{prefix}_base.safetensors", distilled=f"{prefix}_distilled.safetensors",
                 base_sd=base_sd, distilled_sd=distilled_sd)
    _save(base_sd, unet / ts.base)
    _save(distilled_sd, unet / ts.distilled)
    if fp8:
        ts.distilled_fp8 = f"{prefix}_distilled_fp8_e4m3fn.safetensors"
        lf.save_checkpoint(unet / ts.distilled_fp8, distilled_sd, fp8="plain")
        ts.distilled_fp8_scaled = f"{prefix}_distilled_fp8_scaled.safetensors"
        lf.save_checkpoint(unet / ts.distilled_fp8_scaled, distilled_sd, fp8="scaled_new")
    if distill_lora:  # the target is base + this LoRA
        factors = _distill_factors(svd, base_sd, DISTILL_RANK, DISTILL_ALPHA, rel_drift, seed + 2)
        ts.distill_lora = f"{prefix}_distill_lora.safetensors"
        lf.save_lora(loras_dir / ts.distill_lora, factors, "distill", alpha=DISTILL_ALPHA,
                     extra=lf.distill_extras(base_sd, seed=seed + 3, std=1e-3))

    # one style LoRA in several trainers' formats
    style = _style_factors(svd, STYLE_RANK, STYLE_ALPHA, rel_strength=0.05, seed=seed + 4, layers=style_layers)
    scale = STYLE_ALPHA / STYLE_RANK  # 0.5: folding it into `up` is exact in floating point
    for tag in style_formats:
        fmt, has_alpha = STYLE_FORMATS[tag]
        name = f"{prefix}_style_{tag}.safetensors"
        if has_alpha:
            lf.save_lora(loras_dir / name, style, fmt, alpha=STYLE_ALPHA)
        else:
            lf.save_lora(loras_dir / name, {k: (up * scale, down) for k, (up, down) in style.items()}, fmt)
        ts.style[tag] = name

    if not other_size:
        return ts
    # a LoRA made for another model size (dim 256)
    other_shapes = lf.layer_shapes(lf.tiny_wan_state_dict(dim=2 * dim, ffn_dim=2 * ffn_dim, layers=blocks))
    other = lf.make_lora(other_shapes, rank=4, seed=seed + 5)
    ts.other_size = f"{prefix}_other_size_lora.safetensors"
    lf.save_lora(loras_dir / ts.other_size, other, "kohya", alpha=4.0)
    return ts


def copy_model(ts: TinySet, src: str, dst: str, folder: str = "diffusion_models") -> Path:
    """Copy a generated file under another name (e.g. the names an example workflow uses)."""
    root = ts.base_dir / "models" / folder
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / src, root / dst)
    return root / dst


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# reading results back over HTTP
# ---------------------------------------------------------------------------------------------------

def load_safetensors_bytes(raw: bytes) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file given as bytes (no pickle involved)."""
    import json
    import struct

    from safetensors.torch import load

    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return load(raw), dict(header.get("__metadata__") or {})


def fetch_dump(client, entry: dict, node_id: str) -> tuple[dict, dict]:
    """The weights a CasaTestDumpWeights node wrote, fetched through ``GET /view``: (tensors, metadata)."""
    ref = entry["outputs"][node_id]["casa_dump"][0]
    return load_safetensors_bytes(client.view(ref["filename"], type=ref["type"], subfolder=ref["subfolder"]))


# ---------------------------------------------------------------------------------------------------
# ground truth: the transfer computed directly with casa_core on the files
# ---------------------------------------------------------------------------------------------------

class DictWeights:
    """A casa_core WeightProvider over float tensors keyed by canonical layer name (e.g. a weight dump:
    the weights a ComfyUI MODEL really uses). ``grids``: the storage grid of each layer, when the weights
    came from a quantised file (their rounding noise is then separated from the drift, as the node does)."""

    def __init__(self, tensors: dict, name: str = "weights", grids: dict | None = None):
        self.grids = dict(grids or {})
        self.tensors = {k: v for k, v in tensors.items() if v.ndim == 2}
        self.layers = {k: (int(v.shape[0]), int(v.shape[1])) for k, v in self.tensors.items()}
        self.path = name
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            h.update(k.encode())
            h.update(self.tensors[k].float().contiguous().numpy().tobytes())
        self._id = "dict:" + h.hexdigest()[:32]

    def get(self, layer: str) -> torch.Tensor:
        return self.tensors[layer].float().clone()

    def grid(self, layer: str):
        return self.grids.get(layer)

    def identity(self) -> str:
        return self._id + (":grids=" + ",".join(sorted(f"{k}={g.kind}" for k, g in self.grids.items()))
                           if self.grids else "")


@dataclass
class Expected:
    """casa_core's transfer: per layer the injected update as a dense matrix, and what was injected."""

    deltas: dict  # layer -> dense float32 update (what ComfyUI adds to the weight)
    outputs: dict  # layer -> casa_core LayerOutput (kind "lowrank" (up, down) or "diff" (delta,))
    report: object  # casa_core TransferReport
    lora: object  # casa_core LoRAFile


def casa_expected(source_path, lora_path, cache_dir, *, method: str = "casa", injection: str = "lowrank",
                  rank: int = 128, kept_energy: float = 0.0, strength: float = 1.0, storage: str = "float16",
                  tau: float = 0.5, q_dom: float = 0.5, q_act: float = 0.85, energy: float = 0.9,
                  target_path=None, target_weights: dict | None = None, distill_lora_path=None,
                  distill_strength: float = 1.0, target_grids: dict | None = None) -> Expected:
    """The transfer the node contract specifies, computed with casa_core alone in this process:

    ``iter_transfer(read_lora(lora, layer_shapes, strength), basis, drift, from_inputs(...))`` with the
    basis of the ``source_path`` file and the drift ``W_t - W_s``, ``W_t`` from ``target_path`` (a
    Checkpoint, dequantised), ``target_weights`` (tensors, e.g. what ComfyUI's model really uses) or
    ``distill_lora_path`` (LoRADrift of a distillation LoRA at ``distill_strength``). ``method`` and
    ``injection`` are casa_core names (graphs.METHODS / graphs.INJECTIONS map the node's labels).
    """
    from casa_core.basis import load_or_build_basis
    from casa_core.drift import LoRADrift, WeightDifference, load_or_build_drift
    from casa_core import from_inputs
    from casa_core.formats.checkpoint import Checkpoint, open_model
    from casa_core.formats.lora import read_lora
    from casa_core.transfer import TransferReport, config_dict, iter_transfer

    cfg = from_inputs(method, tau=tau, q_dom=q_dom, q_act=q_act, energy=energy, injection=injection, rank=rank,
                      kept_energy=kept_energy)
    source = Checkpoint(source_path, memo_dir=cache_dir)
    basis = drift = None
    if method != "direct":
        basis = load_or_build_basis(source, cache_dir, storage=storage)
        if distill_lora_path is not None:
            dsrc = LoRADrift(read_lora(distill_lora_path, source.layers, strength=distill_strength), source)
        elif target_weights is not None:
            dsrc = WeightDifference(source, DictWeights(target_weights, "target", target_grids))
        else:
            dsrc = WeightDifference(source, open_model(target_path, memo_dir=cache_dir))
        drift = load_or_build_drift(basis, dsrc, cache_dir)
    lora = read_lora(lora_path, source.layers, strength=strength, model_keys=source.param_names)
    report = TransferReport(method, config_dict(cfg, strength))
    deltas, outputs = {}, {}
    for r in iter_transfer(lora, basis, drift, cfg, report):
        t = r.output.tensors
        deltas[r.layer] = (t[0].float() @ t[1].float()) if r.output.kind == "lowrank" else t[0].float()
        outputs[r.layer] = r.output
    return Expected(deltas, outputs, report, lora)


def lora_file_deltas(tensors: dict) -> dict:
    """Dense update per canonical layer of a ComfyUI-format LoRA (``diffusion_model.<layer>.lora_up/
    lora_down.weight`` + ``.alpha`` or ``.diff``), by ComfyUI's rule scale = alpha / rank (1 without alpha)."""
    out = {}
    pre = "diffusion_model."
    for key, t in tensors.items():
        if key.endswith(".lora_up.weight"):
            layer = key[len(pre):-len(".lora_up.weight")]
            down = tensors[f"{pre}{layer}.lora_down.weight"].float()
            alpha = tensors.get(f"{pre}{layer}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[layer] = scale * (t.float() @ down)
        elif key.endswith(".diff") and t.ndim == 2:
            out[key[len(pre):-len(".diff")]] = t.float()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = float(b.abs().max())
    d = float((a.float() - b.float()).abs().max())
    return d / scale if scale > 0 else d


# ---------------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module: ``from _fixtures_models import tiny_set, truth_cache``)
# ---------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

_SETS: dict = {}


def tiny_set_in(base_dir, prefix: str = "casa_t", **kw) -> TinySet:
    """The set ``prefix`` in ``base_dir``, written once per process (shared by every test module)."""
    key = (str(base_dir), prefix, tuple(sorted(kw.items())))
    if key not in _SETS:
        _SETS[key] = write_tiny_set(base_dir, prefix=prefix, **kw)
    return _SETS[key]


@pytest.fixture(scope="session")
def tiny_set(comfy_server) -> TinySet:
    """The dim-128 set in the server's base dir: base, distilled (fp32, fp8, scaled fp8), LoRAs."""
    return tiny_set_in(comfy_server.base_dir, "casa_t")


@pytest.fixture(scope="session")
def truth_cache(tmp_path_factory):
    """casa_core's own cache folder for ground-truth computations (never the server's casa_cache)."""
    return tmp_path_factory.mktemp("casa-truth-cache")

