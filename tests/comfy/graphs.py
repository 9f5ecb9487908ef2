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


# ---------------------------------------------------------------------------------------------------
# CASA node graphs (node ids and widget names are the pack's public contract)
# ---------------------------------------------------------------------------------------------------

#: the method COMBO's labels -> casa_core method names
METHODS = {
    "CASA": "casa",
    "CASA restoration only": "restoration_only",
    "CASA arbitration only": "arbitration_only",
    "ProLoRA": "prolora",
    "direct reuse": "direct",
}
#: the injection COMBO's labels -> casa_core OutputSpec modes
INJECTIONS = {"low-rank": "lowrank", "exact": "exact"}

CASA_NODES = ("CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA", "CASARoutingHeatmap")


def casa_transfer_graph(base: str, target: str, lora: str, *, storage: str = "float16",
                        weight_dtype: str = "default", distill_lora: str | None = None,
                        distill_strength: float = 1.0, strength: float = 1.0, method: str = "CASA",
                        tau: float = 0.5, q_dom: float = 0.5, q_act: float = 0.85, energy: float = 0.9,
                        injection: str = "low-rank", rank: int = 128, kept_energy: float = 0.0) -> dict:
    """CASALoadSourceBasis(base) ; UNETLoader(target) [-> LoraLoaderModelOnly(distill_lora)] ->
    CASAComputeDrift -> CASATransferLoRA(lora). No output node yet: add one (add_dump, add_save, ...).

    Node ids: "basis", "target", "distill" (only with ``distill_lora``), "drift", "transfer".
    ``["transfer", 0]`` is the patched MODEL, ``["transfer", 1]`` the CASA_REPORT; the target MODEL the
    drift was computed on is ``target_model(graph)``.
    """
    g = {
        "basis": {"class_type": "CASALoadSourceBasis", "inputs": {"base_model": base, "storage": storage}},
        "target": {"class_type": "UNETLoader", "inputs": {"unet_name": target, "weight_dtype": weight_dtype}},
    }
    model = ["target", 0]
    if distill_lora is not None:
        g["distill"] = {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": model, "lora_name": distill_lora, "strength_model": distill_strength}}
        model = ["distill", 0]
    g["drift"] = {"class_type": "CASAComputeDrift", "inputs": {"basis": ["basis", 0], "model": model}}
    g["transfer"] = {"class_type": "CASATransferLoRA", "inputs": {
        "model": model, "drift": ["drift", 0], "lora_name": lora, "strength": strength, "method": method,
        "tau": tau, "q_dom": q_dom, "q_act": q_act, "energy": energy, "injection": injection, "rank": rank,
        "kept_energy": kept_energy}}
    return g


def target_model(graph: dict) -> list:
    return ["distill", 0] if "distill" in graph else ["target", 0]


def add_dump(graph: dict, node_id: str, model, filename: str, keys: str = "*", after=None) -> dict:
    """CasaTestDumpWeights: the live weights of ``model`` after ComfyUI loads it (patches baked in)."""
    inputs = {"model": model, "keys": keys, "filename": filename}
    if after is not None:
        inputs["after"] = after
    graph[node_id] = {"class_type": "CasaTestDumpWeights", "inputs": inputs}
    return graph


def add_patch_info(graph: dict, node_id: str, model) -> dict:
    graph[node_id] = {"class_type": "CasaTestPatchInfo", "inputs": {"model": model}}
    return graph


def add_save(graph: dict, node_id: str, prefix: str, dtype: str = "float16", report=None) -> dict:
    graph[node_id] = {"class_type": "CASASaveLoRA", "inputs": {
        "report": report or ["transfer", 1], "filename_prefix": prefix, "dtype": dtype}}
    return graph


def add_heatmap(graph: dict, node_id: str, layer: str = "auto", report=None) -> dict:
    graph[node_id] = {"class_type": "CASARoutingHeatmap", "inputs": {"report": report or ["transfer", 1],
                                                                     "layer": layer}}
    return graph


def add_ksampler(graph: dict, model, prefix: str = "ks_", seed: int = 0, steps: int = 2, **kw) -> str:
    """Add the KSampler part of ``ksampler_graph`` (zero conditioning, latent, sampler, stats) on ``model``;
    returns the id of its CasaTestLatentStats node."""
    part = ksampler_graph("unused", steps=steps, seed=seed, model_source=model, **kw)
    del part["unet"]
    ren = {k: prefix + k for k in part}
    for nid, node in part.items():
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and v[0] in ren:
                node["inputs"][name] = [ren[v[0]], v[1]]
        graph[ren[nid]] = node
    return ren["stats"]


def ui_text(entry: dict, node_id: str) -> str:
    """The text a node put in its ui dict (``ui.PreviewText``: ``{"text": [...]}``), joined; "" if none."""
    out = (entry.get("outputs") or {}).get(node_id) or {}
    text = out.get("text")
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    return "\n".join(str(t) for t in text)


def dump_ref(entry: dict, node_id: str) -> dict:
    """The {"filename", "subfolder", "type"} of a CasaTestDumpWeights result in a /history entry."""
    return entry["outputs"][node_id]["casa_dump"][0]


def patch_info(entry: dict, node_id: str) -> dict:
    return entry["outputs"][node_id]["casa_patches"][0]
