"""The example workflows in workflows/ (frontend format) and workflows/api/ (their API twins).

* (b) every API twin runs to completion on the real server, with the tiny models copied under the file
  names the workflows use; the parts a tiny test cannot run for real are substituted (see
  ``substitute_for_tiny_models`` and workflows/README.md): CLIPLoader + CLIPTextEncode become the test
  node CasaTestZeroConditioning, VAELoader + VAEDecode + SaveAnimatedWEBP become CasaTestLatentStats, the
  latent is 32x32x5 and KSampler takes at most 2 steps. Everything CASA stays exactly as in the file.
* the frontend-format files are consistent with the nodes' schemas (GET /object_info: node types, socket
  types, link bookkeeping, widget values in input_order, COMBO options, numeric ranges) and with their
  API twins (graphToPrompt restated in Python, graphs.api_from_ui);
* with Chromium installed (driven through chromium_cdp.py; skipped without it): the REAL frontend served
  by the server loads each file and its ``graphToPrompt()`` gives exactly the API twin;
* GET /workflow_templates lists them under the pack, and the server serves them.

Regenerate the files (after a node schema change) through the real frontend with
``.venv-comfy/bin/python tests/comfy/test_nodes_workflows.py --write`` (needs Chromium).
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from chromium_cdp import Chromium, find_chromium, require_chromium  # noqa: E402
from graphs import WF_FILES, WF_NAMES, api_from_ui, ui_from_specs, workflow_specs  # noqa: E402

REPO = HERE.parents[1]
WF_DIR = REPO / "workflows"
API_DIR = WF_DIR / "api"
VIRTUAL_NODES = {"MarkdownNote", "Note", "PrimitiveNode", "Reroute"}  # frontend-only node types
FILE_INPUTS = {"unet_name", "base_model", "lora_name", "clip_name", "vae_name"}
COMFY_READY = ("KSampler", "CasaTestZeroConditioning")  # node types the frontend must have registered


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def strip_meta(api: dict) -> dict:
    return {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in api.items()}


# ---------------------------------------------------------------------------------------------------
# substitution for tiny models
# ---------------------------------------------------------------------------------------------------

def substitute_for_tiny_models(api: dict) -> dict:
    """The API twin with the parts that need real umt5-xxl / Wan VAE files replaced (see module docstring)."""
    g = {nid: copy.deepcopy({k: v for k, v in node.items() if k != "_meta"}) for nid, node in api.items()}
    decoded = {}  # VAEDecode id -> its samples source
    for nid, node in list(g.items()):
        ct = node["class_type"]
        if ct == "CLIPTextEncode":
            g[nid] = {"class_type": "CasaTestZeroConditioning", "inputs": {"tokens": 8, "batch": 1}}
        elif ct in ("CLIPLoader", "VAELoader"):
            del g[nid]
        elif ct == "VAEDecode":
            decoded[nid] = node["inputs"]["samples"]
            del g[nid]
        elif ct == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=32, height=32, length=5)
        elif ct == "KSampler":
            node["inputs"]["steps"] = min(int(node["inputs"]["steps"]), 2)
    for nid, node in list(g.items()):
        if node["class_type"] in ("SaveAnimatedWEBP", "SaveWEBM", "SaveVideo", "PreviewImage", "SaveImage"):
            src = node["inputs"]["images"]
            assert src[0] in decoded, f"node {nid} saves something that is not a decoded latent"
            g[nid] = {"class_type": "CasaTestLatentStats", "inputs": {"samples": decoded[src[0]]}}
    for nid, node in g.items():
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                assert v[0] in g, f"node {nid}.{name} still refers to removed node {v[0]}"
    return g


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_the_five_workflows_and_their_api_twins_exist():
    top = sorted(p.stem for p in WF_DIR.glob("*.json"))
    api = sorted(p.stem for p in API_DIR.glob("*.json"))
    assert top == sorted(WF_NAMES), "workflows/*.json (listed as templates) are exactly the examples"
    assert api == sorted(WF_NAMES)


@pytest.mark.parametrize("name", WF_NAMES)
def test_ui_workflow_matches_schemas_and_api_twin(object_info, name):
    wf = load(WF_DIR / f"{name}.json")
    api = load(API_DIR / f"{name}.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max((lk[0] for lk in wf["links"]), default=0)
    for n in wf["nodes"]:
        assert n["type"] in object_info or n["type"] in VIRTUAL_NODES, f"unknown node type {n['type']}"
        if n["type"] in object_info:
            info = object_info[n["type"]]
            for slot, o in enumerate(n.get("outputs", [])):
                # a linked output must exist with this type; unlinked extras are dropped by the frontend
                # (SaveAnimatedWEBP has an IMAGE output in 0.33.0, none in 0.8.0)
                if o.get("links"):
                    assert slot < len(info["output"]) and info["output"][slot] == o["type"], \
                        f"{name}: node {n['id']} ({n['type']}) output {slot} {o['type']} vs {info['output']}"
    seen = set()
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        assert lid not in seen
        seen.add(lid)
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid, f"{name}: link {lid} bookkeeping"
        assert out["type"] == typ, f"{name}: link {lid} type {typ} != output {out['type']}"
        info = object_info[nodes[dst]["type"]]
        spec = (info["input"].get("required") or {}).get(inp["name"]) or \
            (info["input"].get("optional") or {})[inp["name"]]
        assert spec[0] in (typ, "*"), f"{name}: link {lid} {typ} into {nodes[dst]['type']}.{inp['name']} ({spec[0]})"
    for n in wf["nodes"]:  # every link an input or output claims exists
        for inp in n.get("inputs", []):
            assert inp.get("link") is None or inp["link"] in seen
        for out in n.get("outputs", []):
            assert set(out.get("links") or []) <= seen

    # required sockets are connected; widget values are valid for the schema
    conv = api_from_ui(wf, object_info)
    for nid, node in conv.items():
        info = object_info[node["class_type"]]
        for iname, spec in (info["input"].get("required") or {}).items():
            assert iname in node["inputs"], f"{name}: node {nid} ({node['class_type']}) misses {iname}"
            v = node["inputs"][iname]
            if isinstance(v, list):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            options = spec[0] if isinstance(spec[0], list) else opts.get("options") if spec[0] == "COMBO" else None
            if options is not None and iname not in FILE_INPUTS:
                assert v in options, f"{name}: node {nid}.{iname} = {v!r} not in {options}"
            if spec[0] in ("INT", "FLOAT"):
                assert opts.get("min", v) <= v <= opts.get("max", v), f"{name}: node {nid}.{iname} = {v}"
            if iname in FILE_INPUTS:
                assert v in WF_FILES.values(), f"{name}: node {nid}.{iname} = {v!r} is not a documented default"
    assert conv == strip_meta(api), f"{name}: the UI file and its API twin disagree"


@pytest.fixture(scope="module")
def browser(comfy_server, comfy_root, tmp_path_factory):
    """Headless Chromium on the test server's frontend, or, with ``CASA_FRONTEND_ROOT=<dir>`` (the ``static``
    folder of another comfyui-frontend-package, e.g. 1.35.9, the one ComfyUI 0.8.0 pins), on a second server
    started with ``--front-end-root <dir>``."""
    import os

    exe = require_chromium("the real-frontend round trip")
    server = None
    url = comfy_server.url
    fe_root = os.environ.get("CASA_FRONTEND_ROOT")
    if fe_root:
        from comfy_client import ComfyServer, prepare_base_dir

        base = prepare_base_dir(tmp_path_factory.mktemp("comfyui-frontend"), pack_root=REPO,
                                test_nodes=HERE / "testnodes")
        server = ComfyServer(comfy_root, base, extra_args=["--front-end-root", fe_root])
        url = server.start().url
    b = Chromium(exe)
    try:
        b.open_comfy(url, COMFY_READY)
        b.frontend_version = b.eval("window.__COMFYUI_FRONTEND_VERSION__ || ''")
        print(f"frontend {b.frontend_version} at {url}")
        yield b
    finally:
        b.close()
        if server is not None:
            server.stop()


@pytest.mark.parametrize("name", WF_NAMES)
def test_real_frontend_loads_workflow_and_exports_the_api_twin(browser, object_info, name, record_property):
    wf = load(WF_DIR / f"{name}.json")
    api = load(API_DIR / f"{name}.json")
    n_console = len(browser.console)
    got = browser.load_workflow(wf)
    assert strip_meta(got["output"]) == strip_meta(api), f"{name}: graphToPrompt differs from workflows/api/{name}.json"
    if browser.frontend_version == (wf.get("extra") or {}).get("frontendVersion"):
        # the frontend that wrote the files: even the titles in _meta agree (older ones title some nodes
        # by their type, e.g. "SaveAnimatedWEBP")
        assert got["output"] == api
    saved = got["workflow"]
    assert sorted(n["id"] for n in saved["nodes"]) == sorted(n["id"] for n in wf["nodes"])
    assert sorted(tuple(lk) for lk in saved["links"]) == sorted(tuple(lk) for lk in wf["links"])
    for a, b in zip(sorted(saved["nodes"], key=lambda n: n["id"]), sorted(wf["nodes"], key=lambda n: n["id"])):
        assert a["type"] == b["type"] and (a.get("widgets_values") or []) == (b.get("widgets_values") or []), \
            (name, a["id"])
    errors = [c for c in browser.console[n_console:] if c.startswith("error") and "canvas is null" not in c]
    assert not errors, errors
    record_property("frontend_version", browser.frontend_version)


def test_templates_are_listed_and_served(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get("casa-lora", [])) == sorted(WF_NAMES), listed
    for name in WF_NAMES:
        served = comfy_server.get(f"/api/workflow_templates/casa-lora/{name}.json")
        if isinstance(served, bytes):
            served = json.loads(served)
        assert served == load(WF_DIR / f"{name}.json")


@pytest.fixture(scope="module")
def workflow_models(comfy_server):
    """Tiny models under the workflows' file names (a fresh set: its own basis and drift)."""
    from _fixtures_models import copy_model, tiny_set_in

    ts = tiny_set_in(comfy_server.base_dir, "casa_t")
    copy_model(ts, ts.base, WF_FILES["base"])
    copy_model(ts, ts.distilled, WF_FILES["distilled"])
    copy_model(ts, ts.style_lora, WF_FILES["style"], folder="loras")
    copy_model(ts, ts.distill_lora, WF_FILES["distill_lora"], folder="loras")
    return ts


@pytest.mark.parametrize("name", WF_NAMES)
def test_api_workflow_runs(comfy_server, workflow_models, name):
    api = load(API_DIR / f"{name}.json")
    g = substitute_for_tiny_models(api)
    kinds = {node["class_type"] for node in api.values()}
    assert {"CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA"} <= kinds
    entry = comfy_server.run(g, timeout=600)
    outs = entry["outputs"]
    for nid, node in g.items():
        ct = node["class_type"]
        if ct == "CasaTestLatentStats":
            st = outs[nid]["casa_latent_stats"][0]
            assert st["finite"] and st["shape"] == [1, 16, 2, 4, 4], (nid, st)
        elif ct == "CASASaveLoRA":
            text = " ".join(outs[nid]["text"])
            assert ".safetensors" in text, text
        elif ct == "CASARoutingHeatmap":
            assert outs[nid].get("images"), outs[nid]
    if name == "casa_compare_methods":  # three methods, three different samples
        stats = [outs[nid]["casa_latent_stats"][0]["mean"] for nid, n in g.items()
                 if n["class_type"] == "CasaTestLatentStats"]
        assert len(stats) == 3 and len(set(stats)) == 3, stats


# ---------------------------------------------------------------------------------------------------
# regeneration through the real frontend
# ---------------------------------------------------------------------------------------------------

def write_workflows(comfy_root: Path | None = None) -> None:
    """Build each workflow from graphs.workflow_specs(), load it in the real frontend and write what the
    frontend exports: workflows/<name>.json (graphToPrompt().workflow) and workflows/api/<name>.json
    (graphToPrompt().output)."""
    import comfy_locate
    from comfy_client import ComfyServer, prepare_base_dir

    root = comfy_root or comfy_locate.locate().root
    exe = find_chromium()
    if exe is None:
        raise SystemExit("needs Chromium")
    base = prepare_base_dir(tempfile.mkdtemp(prefix="casa-wf-"), pack_root=REPO, test_nodes=HERE / "testnodes")
    server = ComfyServer(root, base)
    client = server.start()
    browser = None
    try:
        info = client.object_info()
        browser = Chromium(exe)
        browser.open_comfy(client.url, COMFY_READY)
        API_DIR.mkdir(parents=True, exist_ok=True)
        for name, spec in workflow_specs().items():
            wf = ui_from_specs(spec, info)
            got = browser.load_workflow(wf)
            mine = api_from_ui(got["workflow"], info)
            if mine != strip_meta(got["output"]):
                raise SystemExit(f"{name}: the frontend's export disagrees with graphs.api_from_ui:\n"
                                 f"frontend: {json.dumps(strip_meta(got['output']), sort_keys=True)}\n"
                                 f"python:   {json.dumps(mine, sort_keys=True)}")
            (WF_DIR / f"{name}.json").write_text(json.dumps(got["workflow"], indent=2) + "\n", encoding="utf-8")
            (API_DIR / f"{name}.json").write_text(json.dumps(got["output"], indent=2) + "\n", encoding="utf-8")
            print(f"wrote workflows/{name}.json and workflows/api/{name}.json ({len(got['output'])} nodes)")
    finally:
        if browser is not None:
            browser.close()
        server.stop()


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit(__doc__)
    write_workflows()
