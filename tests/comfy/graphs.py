"""API-format prompt graphs used by the ComfyUI tests (what ``POST /prompt`` takes)."""
from __future__ import annotations


def ksampler_graph(unet_name: str, steps: int = 2, seed: int = 0, cfg: float = 1.0, width: int = 32,
                   height: int = 32, length: int = 5, sampler: str = "euler", scheduler: str = "simple",
                   weight_dtype: str = "default", tokens: int = 8, model_source=None) -> dict:
    """UNETLoader -> KSampler on zero conditioning -> CasaTestLatentStats (the output node).

    Node ids: "unet", "cond", "latent", "sampler", "stats". ``model_source`` (``[node_id, slot]``) feeds
    KSampler from another node instead of the UNETLoader, e.g. a LoRA node added to the graph.
    The result's stats are in ``entry["outputs"]["stats"]["casa_latent_stats"][0]``.
    """
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": weight_dtype}},
        "cond": {"class_type": "CasaTestZeroConditioning", "inputs": {"tokens": tokens, "batch": 1}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model_source or ["unet", 0], "positive": ["cond", 0], "negative": ["cond", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        "stats": {"class_type": "CasaTestLatentStats", "inputs": {"samples": ["sampler", 0]}},
    }


def latent_stats(entry: dict, node_id: str = "stats") -> dict:
    """The CasaTestLatentStats result of a /history entry: shape, mean, std, finite."""
    return entry["outputs"][node_id]["casa_latent_stats"][0]
