"""(a) The five CASA nodes are registered with the contract's inputs, outputs and defaults (GET /object_info),
and the pack imports without failure. HTTP only, on the real server."""
import pytest

from graphs import CASA_NODES, METHODS

CATEGORY = "casa-lora"

# node -> [(input name, type, default or None, options or None)] in the contract's order
CONTRACT_INPUTS = {
    "CASALoadSourceBasis": [
        ("base_model", "COMBO", None, "diffusion_models"),
        ("storage", "COMBO", "float16", ["float16", "float32"]),
    ],
    "CASAComputeDrift": [
        ("basis", "CASA_BASIS", None, None),
        ("model", "MODEL", None, None),
    ],
    "CASATransferLoRA": [
        ("model", "MODEL", None, None),
        ("drift", "CASA_DRIFT", None, None),
        ("lora_name", "COMBO", None, "loras"),
        ("strength", "FLOAT", 1.0, None),
        ("method", "COMBO", "CASA", list(METHODS)),
        ("tau", "FLOAT", 0.5, None),
        ("q_dom", "FLOAT", 0.5, None),
        ("q_act", "FLOAT", 0.85, None),
        ("energy", "FLOAT", 0.9, None),
        ("injection", "COMBO", "low-rank", ["low-rank", "exact"]),
        ("rank", "INT", 128, None),
        ("kept_energy", "FLOAT", 0.0, None),
    ],
    "CASASaveLoRA": [
        ("report", "CASA_REPORT", None, None),
        ("filename_prefix", "STRING", "casa/transferred", None),
        ("dtype", "COMBO", "float16", ["float16", "bfloat16", "float32"]),
    ],
    "CASARoutingHeatmap": [
        ("report", "CASA_REPORT", None, None),
        ("layer", "STRING", "auto", None),
    ],
}
CONTRACT_OUTPUTS = {
    "CASALoadSourceBasis": (["CASA_BASIS"], False),
    "CASAComputeDrift": (["CASA_DRIFT"], False),
    "CASATransferLoRA": (["MODEL", "CASA_REPORT"], False),
    "CASASaveLoRA": ([], True),
    "CASARoutingHeatmap": (["IMAGE"], True),
}


def input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        spec = (info["input"].get(section) or {}).get(name)
        if spec is not None:
            return section, spec
    return None, None


def spec_type_and_options(spec) -> tuple[str, list | None, dict]:
    """(type, combo options or None, options dict) for both /object_info spellings of a COMBO:
    V1 ``[[a, b], {...}]`` and V3 ``["COMBO", {"options": [a, b], ...}]``."""
    first = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(first, list):
        return "COMBO", first, opts
    if first == "COMBO":
        return "COMBO", list(opts.get("options", [])), opts
    return first, None, opts


def input_order(info: dict) -> list[str]:
    order = info.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    return list((info["input"].get("required") or {})) + list((info["input"].get("optional") or {}))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_pack_imports_without_failure(comfy_server, object_info):
    failures = comfy_server.custom_node_import_failures()
    assert not [f for f in failures if "casa-lora" in f], failures
    missing = [n for n in CASA_NODES if n not in object_info]
    assert not missing, f"not registered: {missing}\n{comfy_server.log_tail(60)}"


@pytest.mark.parametrize("node", CASA_NODES)
def test_node_schema_matches_the_contract(comfy_server, object_info, node):
    info = object_info[node]
    assert info["category"] == CATEGORY
    assert info["python_module"].endswith("casa-lora"), info["python_module"]
    outputs, is_output = CONTRACT_OUTPUTS[node]
    assert info["output"] == outputs
    assert bool(info["output_node"]) is is_output

    expected = CONTRACT_INPUTS[node]
    # the order matters: UI workflows store widget values positionally
    order = [n for n in input_order(info) if n in {e[0] for e in expected}]
    assert order == [e[0] for e in expected], f"{node}: input order {input_order(info)}"
    for name, typ, default, options in expected:
        section, spec = input_spec(info, name)
        assert spec is not None, f"{node}: no input {name!r}"
        assert section == "required", f"{node}.{name} is {section}"
        got_type, got_options, opts = spec_type_and_options(spec)
        assert got_type == typ, f"{node}.{name}: {spec}"
        if default is not None:
            assert opts.get("default") == default, f"{node}.{name}: default {opts.get('default')!r}"
        if isinstance(options, list):
            assert got_options == options, f"{node}.{name}: options {got_options}"
    extra = [n for n in input_order(info) if n not in {e[0] for e in expected}]
    assert not [n for n in extra if input_spec(info, n)[0] == "required"], f"{node}: unexpected required inputs {extra}"


def test_file_lists_follow_comfyui_folders(comfy_server, tiny_set):
    """base_model lists models/diffusion_models and lora_name lists models/loras, as the core loaders do."""
    info = comfy_server.object_info()
    _, unet_files, _ = spec_type_and_options(info["UNETLoader"]["input"]["required"]["unet_name"])
    _, lora_files, _ = spec_type_and_options(info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"])
    _, base_opts, _ = spec_type_and_options(info["CASALoadSourceBasis"]["input"]["required"]["base_model"])
    _, lora_opts, _ = spec_type_and_options(info["CASATransferLoRA"]["input"]["required"]["lora_name"])
    assert tiny_set.base in base_opts and tiny_set.style_lora in lora_opts
    assert sorted(base_opts) == sorted(unet_files)
    assert sorted(lora_opts) == sorted(lora_files)


#: the expert inputs (advanced: listed apart by frontends that know the flag) and what they default to
EXPERT = {"CASALoadSourceBasis": ["storage"], "CASATransferLoRA": ["tau", "q_dom", "q_act", "energy", "kept_energy"],
          "CASASaveLoRA": ["dtype"]}


@pytest.mark.parametrize("node", CASA_NODES)
def test_tooltips_say_when_to_change_an_input_and_expert_inputs_are_advanced(comfy_server, object_info, node):
    """Every widget has a tooltip in plain words; a tuning input says "Leave at <its default> unless ...", and
    nothing else in it names another value as the default; expert inputs carry the advanced flag where the
    ComfyUI has it (0.33.0; 0.8.0's API has no such argument)."""
    from comfy_api_flag import comfy_has_advanced

    info = object_info[node]
    tuning = {name for name, typ, default, _ in CONTRACT_INPUTS[node] if default is not None and name != "layer"}
    has_flag = comfy_has_advanced(comfy_server)
    for name, typ, default, _ in CONTRACT_INPUTS[node]:
        _, spec = input_spec(info, name)
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        tip = opts.get("tooltip") or ""
        assert len(tip) > 20, f"{node}.{name} has no tooltip"
        for jargon in ("C = U^T", "RMS", "cos(", "quantile", "energy", "arbitrat"):
            assert jargon not in tip, f"{node}.{name}: {jargon!r} in {tip!r}"
        if name in tuning and name not in ("strength", "filename_prefix"):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"Leave at {shown}" in tip, f"{node}.{name}: no 'Leave at {shown} ... unless ...' in {tip!r}"
            assert "unless" in tip.split(f"Leave at {shown}", 1)[1], f"{node}.{name}: {tip!r}"
        if has_flag:
            assert bool(opts.get("advanced")) == (name in EXPERT.get(node, [])), f"{node}.{name}: advanced {opts}"
    if node == "CASATransferLoRA":  # the old tau tooltip named two defaults ("1-10 stable; 0.5 is the default")
        tau = input_spec(info, "tau")[1][1]["tooltip"]
        assert "1-10" not in tau and tau.count("default") == 1, tau


def test_the_web_extension_and_the_help_pages_are_served(comfy_server):
    listed = comfy_server.get("/extensions")
    for js in ("casa_common.js", "casa_summary.js", "casa_heatmap.js"):
        assert f"/extensions/casa-lora/{js}" in listed, listed
    for node in CASA_NODES:
        status, body = comfy_server.request("GET", f"/extensions/casa-lora/docs/{node}.md")
        assert status == 200 and body.startswith(b"# CASA "), (node, status)


from _fixtures_models import tiny_set  # noqa: E402,F401  (fixture)
