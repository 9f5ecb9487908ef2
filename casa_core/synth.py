"""Synthetic Wan-shaped models for the demo and the benchmark (no download needed).

``wan_state_dict`` builds a complete Wan2.1 text-to-video state dict in the original key names
(ComfyUI's UNETLoader detects it), with linear weights that have a decaying singular spectrum
like trained weights.  ``distill`` adds a drift concentrated on the head singular clusters
(what step distillation does, paper section 3), ``style_lora`` makes a LoRA whose update
touches the same head directions, so the two interfere as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
)


@dataclass(frozen=True)
class WanShape:
    dim: int = 256
    ffn_dim: int = 768
    blocks: int = 4
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256

    def block_layers(self) -> dict[str, tuple[int, int]]:
        out = {}
        for b in range(self.blocks):
            for name in BLOCK_LINEARS:
                out[f"blocks.{b}.{name}"] = (self.dim, self.dim)
            out[f"blocks.{b}.ffn.0"] = (self.ffn_dim, self.dim)
            out[f"blocks.{b}.ffn.2"] = (self.dim, self.ffn_dim)
        return out


WAN21_1_3B = WanShape(dim=1536, ffn_dim=8960, blocks=30)
WAN21_14B = WanShape(dim=5120, ffn_dim=13824, blocks=40)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q * torch.sign(torch.diagonal(r))[None, :]


def spectral_weight(m: int, n: int, gen: torch.Generator, decay: float = 0.5) -> tuple[torch.Tensor, ...]:
    """``(W, U, S, V)`` with ``W = U diag(S) V^T`` and ``S_i ~ (i + 1)^-decay``, ``||W||_F ~ sqrt(n)/4``."""
    r = min(m, n)
    s = (torch.arange(1, r + 1, dtype=torch.float32) ** -decay)
    s = s * (0.25 * math.sqrt(n) / float(s.norm()))
    u = _orthonormal(m, r, gen)
    v = _orthonormal(n, r, gen)
    return (u * s) @ v.T, u, s, v


def head_clusters_delta(u: torch.Tensor, v: torch.Tensor, head: int, gen: torch.Generator) -> torch.Tensor:
    """A unit-norm update that rotates within the leading ``head`` singular directions."""
    h = min(head, u.shape[1])
    x = torch.randn(h, h, generator=gen)
    d = u[:, :h] @ x @ v[:, :h].T
    return d / d.norm()


def wan_state_dict(shape: WanShape, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A complete Wan2.1 t2v state dict; also returns the linear layers' ``(U, S, V)``."""
    gen = torch.Generator().manual_seed(seed)
    d, f = shape.dim, shape.ffn_dim
    sd: dict[str, torch.Tensor] = {}
    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rnd(*s, std=0.02):
        return torch.randn(*s, generator=gen) * std

    def linear(name: str, m: int, n: int):
        w, u, s, v = spectral_weight(m, n, gen)
        sd[name + ".weight"] = w
        sd[name + ".bias"] = rnd(m)
        svd[name] = (u, s, v)

    sd["patch_embedding.weight"] = rnd(d, shape.in_dim, 1, 2, 2)
    sd["patch_embedding.bias"] = rnd(d)
    linear("text_embedding.0", d, shape.text_dim)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", d, shape.freq_dim)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", 6 * d, d)
    for b in range(shape.blocks):
        p = f"blocks.{b}."
        sd[p + "modulation"] = rnd(1, 6, d)
        for name in BLOCK_LINEARS:
            linear(p + name, d, d)
        for attn in ("self_attn", "cross_attn"):
            sd[p + attn + ".norm_q.weight"] = torch.ones(d)
            sd[p + attn + ".norm_k.weight"] = torch.ones(d)
        sd[p + "norm3.weight"] = torch.ones(d)
        sd[p + "norm3.bias"] = torch.zeros(d)
        linear(p + "ffn.0", f, d)
        linear(p + "ffn.2", d, f)
    linear("head.head", shape.out_dim * 4, d)
    sd["head.modulation"] = rnd(1, 2, d)
    return {k: v.to(dtype) for k, v in sd.items()}, svd


def distill(base: dict, svd: dict, rel_drift: float = 3e-3, head: int = 16, seed: int = 1,
            layers=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The "distilled" model: every block linear moves by ``rel_drift`` of its norm, 80 % of it
    as rotations inside the head singular clusters and 20 % spread over all directions."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(base)
    for name, (u, s, v) in svd.items():
        if layers is not None and name not in layers:
            continue
        if not name.startswith("blocks."):
            continue
        w = base[name + ".weight"].float()
        noise = torch.randn(w.shape, generator=gen)
        delta = 0.8 * head_clusters_delta(u, v, head, gen) + 0.2 * noise / noise.norm()
        out[name + ".weight"] = (w + rel_drift * float(w.norm()) * delta / delta.norm()).to(dtype)
    return out


def style_lora(svd: dict, rank: int = 16, alpha: float = 8.0, rel_strength: float = 0.02, seed: int = 2,
               layers=None) -> dict[str, torch.Tensor]:
    """A musubi-tuner style LoRA (``lora_unet_…`` keys with ``.alpha``) on the block linears.

    Half of its update lives in the head directions (where it interferes with the drift)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (u, s, v) in svd.items():
        if not name.startswith("blocks.") or (layers is not None and name not in layers):
            continue
        m, n = u.shape[0], v.shape[0]
        h = min(rank // 2, u.shape[1])
        b_head = u[:, :h] @ torch.randn(h, rank, generator=gen)
        b = b_head / b_head.norm() + torch.randn(m, rank, generator=gen) / math.sqrt(m * rank)
        a_head = torch.randn(rank, h, generator=gen) @ v[:, :h].T
        a = a_head / a_head.norm() + torch.randn(rank, n, generator=gen) / math.sqrt(n * rank)
        scale = alpha / rank
        target = rel_strength * float(s.norm())
        cur = float((b @ a).norm()) * scale
        b = b * (target / cur)
        key = "lora_unet_" + name.replace(".", "_")
        sd[key + ".lora_up.weight"] = b.to(torch.bfloat16)
        sd[key + ".lora_down.weight"] = a.to(torch.bfloat16)
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd
