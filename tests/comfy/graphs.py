"""API-format prompt graphs used by the ComfyUI tests (what ``POST /prompt`` takes)."""
from __future__ import annotations


def api_node(class_type: str, **inputs) -> dict:
    """One API-format node: ``{"class_type": class_type, "inputs": inputs}`` (links as ``[node_id, slot]``)."""
    return {"class_type": class_type, "inputs": inputs}


def ksampler_graph(unet_name: str, steps: int = 2, seed: int = 0, cfg: float = 1.0, width: int = 32,
                   height: int = 32, length: int = 5, sampler: str = "euler", scheduler: str = "simple",
                   weight_dtype: str = "default", tokens: int = 8, model_source=None) -> dict:
    """UNETLoader -> KSampler on zero conditioning -> CasaTestLatentStats (the output node).

    Node ids: "unet", "cond", "latent", "sampler", "stats". ``model_source`` (``[node_id, slot]``) feeds
    KSampler from another node instead of the UNETLoader, e.g. a LoRA node added to the graph.
    The result's stats are in ``entry["outputs"]["stats"]["casa_latent_stats"][0]``.
    """
    return {
        "unet": api_node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype),
        "cond": api_node("CasaTestZeroConditioning", tokens=tokens, batch=1),
        "latent": api_node("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=1),
        "sampler": api_node("KSampler", model=model_source or ["unet", 0], positive=["cond", 0],
                            negative=["cond", 0], latent_image=["latent", 0], seed=seed, steps=steps, cfg=cfg,
                            sampler_name=sampler, scheduler=scheduler, denoise=1.0),
        "stats": api_node("CasaTestLatentStats", samples=["sampler", 0]),
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
        "basis": api_node("CASALoadSourceBasis", base_model=base, storage=storage),
        "target": api_node("UNETLoader", unet_name=target, weight_dtype=weight_dtype),
    }
    model = ["target", 0]
    if distill_lora is not None:
        g["distill"] = api_node("LoraLoaderModelOnly", model=model, lora_name=distill_lora,
                                strength_model=distill_strength)
        model = ["distill", 0]
    g["drift"] = api_node("CASAComputeDrift", basis=["basis", 0], model=model)
    g["transfer"] = api_node("CASATransferLoRA", model=model, drift=["drift", 0], lora_name=lora,
                             strength=strength, method=method, tau=tau, q_dom=q_dom, q_act=q_act, energy=energy,
                             injection=injection, rank=rank, kept_energy=kept_energy)
    return g


def target_model(graph: dict) -> list:
    return ["distill", 0] if "distill" in graph else ["target", 0]


# add_*(graph, node_id, ...): add one node to ``graph`` under ``node_id``; return ``graph``


def add_dump(graph: dict, node_id: str, model, filename: str, keys: str = "*", after=None) -> dict:
    """CasaTestDumpWeights: the live weights of ``model`` after ComfyUI loads it (patches baked in)."""
    graph[node_id] = api_node("CasaTestDumpWeights", model=model, keys=keys, filename=filename)
    if after is not None:
        graph[node_id]["inputs"]["after"] = after
    return graph


def add_patch_info(graph: dict, node_id: str, model) -> dict:
    graph[node_id] = api_node("CasaTestPatchInfo", model=model)
    return graph


def add_save(graph: dict, node_id: str, prefix: str, dtype: str = "float16", report=None) -> dict:
    graph[node_id] = api_node("CASASaveLoRA", report=report or ["transfer", 1], filename_prefix=prefix, dtype=dtype)
    return graph


def add_heatmap(graph: dict, node_id: str, layer: str = "auto", report=None) -> dict:
    graph[node_id] = api_node("CASARoutingHeatmap", report=report or ["transfer", 1], layer=layer)
    return graph


def add_ksampler(graph: dict, model, prefix: str = "ks_", seed: int = 0, steps: int = 2, **kw) -> str:
    """Add the KSampler part of ``ksampler_graph`` (zero conditioning, latent, sampler, stats) on ``model``;
    returns the id of its CasaTestLatentStats node."""
    part = ksampler_graph("unused", steps=steps, seed=seed, model_source=model, **kw)
    del part["unet"]
    ren = {k: prefix + k for k in part}
    for nid, n in part.items():
        for name, v in n["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and v[0] in ren:
                n["inputs"][name] = [ren[v[0]], v[1]]
        graph[ren[nid]] = n
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


# ---------------------------------------------------------------------------------------------------
# example workflows (workflows/*.json in the frontend's format, workflows/api/*.json their API twins)
# ---------------------------------------------------------------------------------------------------

#: the file names the example workflows use, by role (the tests copy tiny models under these names)
WF_FILES = {
    "base": "wan2.1_t2v_1.3B_bf16.safetensors",
    "distilled": "wan2.1_t2v_1.3B_causvid.safetensors",
    "style": "my_style_lora.safetensors",
    "distill_lora": "Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors",
    "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    # Wan2.2 A14B: two experts, each with its base, its distilled version and its own LoRA
    "high_base": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
    "low_base": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
    "high_distilled": "wan2.2_t2v_high_noise_14B_lightning_4steps.safetensors",
    "low_distilled": "wan2.2_t2v_low_noise_14B_lightning_4steps.safetensors",
    "high_style": "my_style_high_noise.safetensors",
    "low_style": "my_style_low_noise.safetensors",
}

#: the examples: API twin name (workflows/api/<name>.json) -> (title = the UI file's name, workflows/<title>.json,
#: which the template browser shows as the title; one-line description, drawn on the thumbnail <title>.jpg)
WORKFLOWS = {
    "casa_transfer_basic": ("Transfer a LoRA (CASA)",
                            "Use a LoRA trained on the base model on its fast distilled version."),
    "casa_compare_methods": ("Compare CASA, ProLoRA, direct",
                             "The same LoRA three ways, same seed: see what CASA changes."),
    "casa_save_lora": ("Save a transferred LoRA",
                       "Write the transferred LoRA to models/loras for the normal LoRA loader."),
    "casa_routing_heatmap": ("See what CASA did (heatmap)",
                             "Where CASA restored, preserved or arbitrated, layer by layer."),
    "casa_distill_lora_target": ("Base + distillation LoRA",
                                 "No distilled checkpoint? The base model plus a distillation LoRA as target."),
    "casa_wan22_two_experts": ("Wan2.2 A14B two experts",
                               "High- and low-noise experts, each with its LoRA; two samplers split at step 2 of 4."),
}
WF_NAMES = tuple(WORKFLOWS)


def wf_title(name: str) -> str:
    return WORKFLOWS[name][0]


_POSITIVE = ("a red fox trotting through fresh snow in a birch forest, morning light, slow tracking shot, "
             "in the style of my LoRA")
_NEGATIVE = ("blurry, low quality, static, overexposed, jpeg artifacts, deformed, extra limbs, "
             "watermark, text, subtitles")


def _n(nid, typ, pos, widgets=None, inputs=None, title=None):
    return {"id": nid, "type": typ, "pos": list(pos), "widgets": dict(widgets or {}),
            "inputs": dict(inputs or {}), "title": title}


def _note(nid, pos, text):
    return {"id": nid, "type": "MarkdownNote", "pos": list(pos), "note": text, "title": "Read me"}


def _primitive(nid, pos, value, targets, title):
    """A frontend Primitive node feeding the widget ``name`` of each ``(node id, name)`` in ``targets``: the
    file is picked once for all of them (graphToPrompt writes its value into each)."""
    return {"id": nid, "type": "PrimitiveNode", "pos": list(pos), "value": value, "targets": list(targets),
            "title": title}


def _transfer(nid, pos, model, drift, method="CASA", title=None, lora=None):
    return _n(nid, "CASATransferLoRA", pos, {
        "lora_name": lora or WF_FILES["style"], "strength": 1.0, "method": method, "tau": 0.5, "q_dom": 0.5,
        "q_act": 0.85, "energy": 0.9, "injection": "low-rank", "rank": 128, "kept_energy": 0.0},
        {"model": model, "drift": drift}, title=title)


def _text_and_latent(clip_id, pos_id, neg_id, latent_id, x, y, length=33):
    return [
        _n(clip_id, "CLIPLoader", (x, y), {"clip_name": WF_FILES["text_encoder"], "type": "wan", "device": "default"}),
        _n(pos_id, "CLIPTextEncode", (x, y + 150), {"text": _POSITIVE}, {"clip": (clip_id, 0)},
           title="CLIP Text Encode (Positive Prompt)"),
        _n(neg_id, "CLIPTextEncode", (x, y + 390), {"text": _NEGATIVE}, {"clip": (clip_id, 0)},
           title="CLIP Text Encode (Negative Prompt)"),
        _n(latent_id, "EmptyHunyuanLatentVideo", (x, y + 630),
           {"width": 832, "height": 480, "length": length, "batch_size": 1}),
    ]


def _sample_and_save(ks_id, dec_id, save_id, vae_id, model, pos_id, neg_id, latent_id, x, y, prefix, steps=8,
                     title=None, vae_node=True, vae_y=340):
    nodes = [
        _n(ks_id, "KSampler", (x, y), {"seed": 42, "control_after_generate": "fixed", "steps": steps, "cfg": 1.0,
                                       "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0},
           {"model": model, "positive": (pos_id, 0), "negative": (neg_id, 0), "latent_image": (latent_id, 0)},
           title=title),
        _n(dec_id, "VAEDecode", (x + 330, y), {}, {"samples": (ks_id, 0), "vae": (vae_id, 0)}),
        _n(save_id, "SaveAnimatedWEBP", (x + 560, y), {"filename_prefix": prefix, "fps": 16.0, "lossless": False,
                                                       "quality": 90, "method": "default"}, {"images": (dec_id, 0)}),
    ]
    if vae_node:
        nodes.append(_n(vae_id, "VAELoader", (x, vae_y), {"vae_name": WF_FILES["vae"]}))
    return nodes


def _head(name: str) -> str:
    title, desc = WORKFLOWS[name]
    return f"**{title}** — {desc}\n\n"


_STEPS = ("1. **CASA Load Source Basis**: pick the base model file (the one the LoRA was trained on). Analysed "
          "once, cached in `models/casa_cache`.\n2. **Load Diffusion Model**: the distilled model you want to run "
          "(here a CausVid checkpoint).\n3. **CASA Compute Drift**: how distillation moved the weights (cached "
          "too).\n4. **CASA Transfer LoRA**: pick your LoRA; the patched model goes to the sampler. Do not also "
          "load the LoRA with a normal LoRA loader.\n\nEach CASA node shows a summary of its run; the ? of a "
          "selected node opens its help page. First run: a few minutes for the analysis; later runs reuse the "
          "cache.")


def workflow_specs() -> dict[str, list[dict]]:
    """The example workflows as node specs: id, type, pos, widgets by name, inputs {name: (src id, slot)}.
    Positions leave room under the CASA nodes for the summaries they show after a run."""
    f = WF_FILES
    specs = {}

    core = [
        _n(2, "CASALoadSourceBasis", (0, 0), {"base_model": f["base"], "storage": "float16"}),
        _n(3, "UNETLoader", (0, 240), {"unet_name": f["distilled"], "weight_dtype": "default"},
           title="Load Diffusion Model (distilled)"),
        _n(4, "CASAComputeDrift", (400, 40), {}, {"basis": (2, 0), "model": (3, 0)}),
    ]

    specs["casa_transfer_basic"] = [
        _note(1, (-480, 0), _head("casa_transfer_basic") + _STEPS), *core,
        _transfer(5, (780, 0), (3, 0), (4, 0)),
        *_text_and_latent(6, 7, 8, 9, 0, 420),
        *_sample_and_save(10, 11, 12, 13, (5, 0), 7, 8, 9, 1160, 0, "casa/transfer_basic"),
    ]

    cmp_note = (_head("casa_compare_methods") + "The same LoRA (picked once, in **LoRA for all three**), the same "
                "seed, three ways onto the distilled model:\n\n- **CASA** (restoration + arbitration)\n- **ProLoRA** "
                "(the baseline of the CASA paper)\n- **direct reuse** (what the normal LoRA loader does)\n\nThe basis "
                "and drift are computed once and shared by the three transfers.")
    specs["casa_compare_methods"] = [
        _note(1, (-480, 0), cmp_note), *core,
        _primitive(21, (400, 300), f["style"], [(5, "lora_name"), (6, "lora_name"), (7, "lora_name")],
                   "LoRA for all three"),
        _transfer(5, (780, 0), (3, 0), (4, 0), "CASA", title="Transfer: CASA"),
        _transfer(6, (780, 600), (3, 0), (4, 0), "ProLoRA", title="Transfer: ProLoRA"),
        _transfer(7, (780, 1200), (3, 0), (4, 0), "direct reuse", title="Transfer: direct reuse"),
        *_text_and_latent(8, 9, 10, 11, 0, 420),
        *_sample_and_save(12, 13, 14, 30, (5, 0), 9, 10, 11, 1160, 0, "casa/compare_CASA", title="KSampler (CASA)",
                          vae_y=1500),
        *_sample_and_save(15, 16, 17, 30, (6, 0), 9, 10, 11, 1160, 600, "casa/compare_ProLoRA",
                          title="KSampler (ProLoRA)", vae_node=False),
        *_sample_and_save(18, 19, 20, 30, (7, 0), 9, 10, 11, 1160, 1200, "casa/compare_direct",
                          title="KSampler (direct reuse)", vae_node=False),
    ]

    save_note = (_head("casa_save_lora") + "Writes `models/loras/casa/my_style_lora_causvid_00001.safetensors` "
                 "(ComfyUI's LoRA format; the counter goes up, nothing is overwritten) and shows the path it wrote. "
                 "Load it later on the distilled model with the normal **LoraLoaderModelOnly** at strength 1; no "
                 "CASA node needed then.")
    specs["casa_save_lora"] = [
        _note(1, (-480, 0), save_note), *core,
        _transfer(5, (780, 0), (3, 0), (4, 0)),
        _n(6, "CASASaveLoRA", (1160, 0), {"filename_prefix": "casa/my_style_lora_causvid", "dtype": "float16"},
           {"report": (5, 1)}),
    ]

    hm_note = (_head("casa_routing_heatmap") + "What CASA saw and decided on one layer: where distillation and the "
               "LoRA change the model, whether they push the same way, and which regions were restored, preserved or "
               "arbitrated, with a one-line verdict. Use the pickers on the node (block, projection, overview); "
               "`layer` = `auto` starts with the layer with the most arbitration.")
    specs["casa_routing_heatmap"] = [
        _note(1, (-480, 0), hm_note), *core,
        _transfer(5, (780, 0), (3, 0), (4, 0)),
        _n(6, "CASARoutingHeatmap", (1160, 0), {"layer": "auto"}, {"report": (5, 1)}),
    ]

    dl_note = (_head("casa_distill_lora_target") + "Build the target from the base model (picked once, in **Base "
               "model**, for the basis and the loader) plus a distillation LoRA (lightx2v, CausVid, Self-Forcing "
               "extracts) with the normal **LoraLoaderModelOnly**, then transfer your style LoRA onto that. The "
               "drift and the sampler share the distillation LoRA's node, so its strength is the same for both.")
    specs["casa_distill_lora_target"] = [
        _note(1, (-480, 0), dl_note),
        _primitive(15, (-420, 420), f["base"], [(2, "base_model"), (3, "unet_name")], "Base model"),
        _n(2, "CASALoadSourceBasis", (0, 0), {"base_model": f["base"], "storage": "float16"}),
        _n(3, "UNETLoader", (0, 240), {"unet_name": f["base"], "weight_dtype": "default"},
           title="Load Diffusion Model (base)"),
        _n(14, "LoraLoaderModelOnly", (0, 370), {"lora_name": f["distill_lora"], "strength_model": 1.0},
           {"model": (3, 0)}, title="Distillation LoRA"),
        _n(4, "CASAComputeDrift", (400, 40), {}, {"basis": (2, 0), "model": (14, 0)}),
        _transfer(5, (780, 0), (14, 0), (4, 0)),
        *_text_and_latent(6, 7, 8, 9, 0, 540),
        *_sample_and_save(10, 11, 12, 13, (5, 0), 7, 8, 9, 1160, 0, "casa/distill_lora_target", steps=6),
    ]

    w22_note = (_head("casa_wan22_two_experts") + "Wan2.2 A14B generates with two experts: the **high-noise** expert "
                "for the first steps, the **low-noise** expert for the rest. Each has its own base model, its own "
                "distilled version (e.g. a Lightning merge) and its own LoRA, so each gets its own transfer:\n\n"
                "- top row: high-noise base → basis, distilled high-noise expert → drift → transfer of the "
                "high-noise LoRA;\n- bottom row: the same for the low-noise expert.\n\nThe two **KSampler "
                "(Advanced)** nodes split one 4-step schedule at step 2, as for Wan2.2 distills: the high-noise "
                "sampler adds the noise and runs steps 0-2 returning the leftover noise, the low-noise sampler "
                "finishes steps 2-4 without adding noise. Same seed in both.")
    specs["casa_wan22_two_experts"] = [
        _note(1, (-480, 0), w22_note),
        _n(2, "CASALoadSourceBasis", (0, 0), {"base_model": f["high_base"], "storage": "float16"},
           title="Source Basis (high noise)"),
        _n(3, "UNETLoader", (0, 240), {"unet_name": f["high_distilled"], "weight_dtype": "default"},
           title="Distilled high-noise expert"),
        _n(4, "CASAComputeDrift", (400, 40), {}, {"basis": (2, 0), "model": (3, 0)}, title="Drift (high noise)"),
        _transfer(5, (780, 0), (3, 0), (4, 0), title="Transfer (high noise)", lora=f["high_style"]),
        _n(6, "CASALoadSourceBasis", (0, 620), {"base_model": f["low_base"], "storage": "float16"},
           title="Source Basis (low noise)"),
        _n(7, "UNETLoader", (0, 860), {"unet_name": f["low_distilled"], "weight_dtype": "default"},
           title="Distilled low-noise expert"),
        _n(8, "CASAComputeDrift", (400, 660), {}, {"basis": (6, 0), "model": (7, 0)}, title="Drift (low noise)"),
        _transfer(9, (780, 620), (7, 0), (8, 0), title="Transfer (low noise)", lora=f["low_style"]),
        _n(10, "ModelSamplingSD3", (1160, 0), {"shift": 5.0}, {"model": (5, 0)}, title="Shift (high noise)"),
        _n(11, "ModelSamplingSD3", (1160, 620), {"shift": 5.0}, {"model": (9, 0)}, title="Shift (low noise)"),
        *_text_and_latent(12, 13, 14, 15, 0, 1240),
        _n(16, "KSamplerAdvanced", (1480, 0), {
            "add_noise": "enable", "noise_seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0, "end_at_step": 2,
            "return_with_leftover_noise": "enable"},
           {"model": (10, 0), "positive": (13, 0), "negative": (14, 0), "latent_image": (15, 0)},
           title="KSampler (high noise, steps 0-2)"),
        _n(17, "KSamplerAdvanced", (1480, 620), {
            "add_noise": "disable", "noise_seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "start_at_step": 2, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"},
           {"model": (11, 0), "positive": (13, 0), "negative": (14, 0), "latent_image": (16, 0)},
           title="KSampler (low noise, steps 2-4)"),
        _n(18, "VAEDecode", (1840, 620), {}, {"samples": (17, 0), "vae": (19, 0)}),
        _n(19, "VAELoader", (1840, 460), {"vae_name": f["vae"]}),
        _n(20, "SaveAnimatedWEBP", (2080, 620), {"filename_prefix": "casa/wan22_two_experts", "fps": 16.0,
                                                 "lossless": False, "quality": 90, "method": "default"},
           {"images": (18, 0)}),
    ]
    return specs


def _is_widget(spec) -> bool:
    first = spec[0]
    return isinstance(first, list) or first in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's widget inputs in the order the frontend creates them (input_order)."""
    order = info.get("input_order") or {}
    names = list(order.get("required", info["input"].get("required", {}))) + \
        list(order.get("optional", info["input"].get("optional", {}) or {}))
    out = []
    for name in names:
        spec = (info["input"].get("required") or {}).get(name) or (info["input"].get("optional") or {}).get(name)
        if spec is not None and _is_widget(spec):
            out.append((name, spec))
    return out


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO":
        return (opts.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])


def ui_from_specs(nodes: list[dict], object_info: dict) -> dict:
    """A workflow in the frontend's format from node specs (widget values positional, in input_order, with
    the frontend's ``control_after_generate`` entry after seeds). Widgets a spec leaves out get the schema's
    default. The frontend normalises the result when it loads it (tests/comfy/test_nodes_workflows.py)."""
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        for name, (src, slot) in n.get("inputs", {}).items():
            lid = len(links) + 1
            typ = object_info[by_id[src]["type"]]["output"][slot]
            links.append([lid, src, slot, n["id"], name, typ])  # target slot resolved below
            out_links.setdefault((src, slot), []).append(lid)
    primed: dict[tuple[int, str], int] = {}  # (node id, widget name) -> link from a PrimitiveNode
    for n in nodes:
        if n["type"] == "PrimitiveNode":
            for tid, wname in n["targets"]:
                lid = len(links) + 1
                links.append([lid, n["id"], 0, tid, wname, "COMBO"])
                out_links.setdefault((n["id"], 0), []).append(lid)
                primed[(tid, wname)] = lid
    for order, n in enumerate(nodes):
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"], "flags": {}, "order": order, "mode": 0,
                "inputs": [], "outputs": [], "properties": {"Node name for S&R": n["type"]}}
        if n.get("title"):
            node["title"] = n["title"]
        if n["type"] == "MarkdownNote":
            node["widgets_values"] = [n["note"]]
            node["size"] = [420, 360]
            node["color"], node["bgcolor"] = "#432", "#653"
            ui_nodes.append(node)
            continue
        if n["type"] == "PrimitiveNode":
            wname = n["targets"][0][1]
            node["outputs"] = [{"name": "COMBO", "type": "COMBO", "widget": {"name": wname},
                                "links": out_links.get((n["id"], 0), [])}]
            node["properties"] = {"Run widget replace on values": False}
            node["widgets_values"] = [n["value"], "fixed", ""]
            node["size"] = [360, 106]
            ui_nodes.append(node)
            continue
        info = object_info[n["type"]]
        req = info["input"].get("required") or {}
        opt = info["input"].get("optional") or {}
        order_names = [name for name in (info.get("input_order") or {}).get("required", req)] + \
            [name for name in (info.get("input_order") or {}).get("optional", opt)]
        for name in order_names:
            spec = req.get(name) or opt.get(name)
            if spec is None or _is_widget(spec):
                continue
            lid = next((lk[0] for lk in links if lk[3] == n["id"] and lk[4] == name), None)
            node["inputs"].append({"name": name, "type": spec[0], "link": lid})
        if any(tid == n["id"] for tid, _ in primed):  # the frontend's form: every widget is also an input
            for name, spec in widget_inputs(info):
                typ = "COMBO" if isinstance(spec[0], list) else spec[0]
                node["inputs"].append({"name": name, "type": typ, "widget": {"name": name},
                                       "link": primed.get((n["id"], name))})
        for lk in links:
            if lk[3] == n["id"]:
                lk[4] = next(i for i, inp in enumerate(node["inputs"]) if inp["name"] == lk[4])
        for slot, typ in enumerate(info["output"]):
            node["outputs"].append({"name": info["output_name"][slot], "type": typ,
                                    "links": out_links.get((n["id"], slot), []), "slot_index": slot})
        values = []
        for name, spec in widget_inputs(info):
            values.append(n["widgets"].get(name, _default(spec)))
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("control_after_generate"):
                values.append(n["widgets"].get("control_after_generate", "fixed"))
        unknown = set(n["widgets"]) - {name for name, _ in widget_inputs(info)} - {"control_after_generate"}
        if unknown:
            raise KeyError(f"{n['type']} has no widget(s) {sorted(unknown)}")
        node["widgets_values"] = values
        ui_nodes.append(node)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [640, 150]}},
            "version": 0.4}


def api_from_ui(workflow: dict, object_info: dict) -> dict:
    """What the frontend's graphToPrompt makes of a UI workflow, restated in Python (without ``_meta``):
    virtual nodes (not in /object_info, e.g. MarkdownNote) and muted/bypassed nodes left out, widget values
    taken positionally in input_order (skipping the control_after_generate entry), links as [src id, slot];
    a widget fed by a PrimitiveNode keeps its value (the primitive writes it into the widget)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    out = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']}: widgets_values as a dict is not the saved format")
        for name, spec in widget_inputs(info):
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
            inputs[name] = values.pop(0)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("control_after_generate"):
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget value(s) left over: {values}")
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                if types.get(lk[1]) == "PrimitiveNode":
                    continue
                inputs[inp["name"]] = [str(lk[1]), lk[2]]
        out[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return out
