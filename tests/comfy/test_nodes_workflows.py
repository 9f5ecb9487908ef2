"""The example workflows: workflows/<title>.json (frontend format; the template browser shows the file's
name as the title and <title>.jpg as the thumbnail) and workflows/api/<name>.json (their API twins);
graphs.WORKFLOWS maps each name to its title and one-line description.

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
* GET /workflow_templates lists them under the pack, and the server serves them and their thumbnails;
  each thumbnail is the one wf_thumbnails.render draws (title, description, the CASA chain);
* each example asks for each file once (a Primitive node feeds widgets that need the same file);
* with Chromium: the template browser shows each title whole with its thumbnail.

Regenerate the files (after a node schema change) through the real frontend with
``.venv-comfy/bin/python tests/comfy/test_nodes_workflows.py --write`` (needs Chromium); it writes the
thumbnails too.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from chromium_cdp import Chromium, find_chromium, require_chromium  # noqa: E402
from graphs import WF_FILES, WF_NAMES, WORKFLOWS, api_from_ui, ui_from_specs, wf_title, workflow_specs  # noqa: E402

REPO = HERE.parents[1]
WF_DIR = REPO / "workflows"
API_DIR = WF_DIR / "api"
VIRTUAL_NODES = {"MarkdownNote", "Note", "PrimitiveNode", "Reroute"}  # frontend-only node types
SAMPLERS = ("KSampler", "KSamplerAdvanced")
FILE_INPUTS = {"unet_name", "base_model", "lora_name", "clip_name", "vae_name"}
COMFY_READY = ("KSampler", "CasaTestZeroConditioning")  # node types the frontend must have registered


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ui_path(name: str) -> Path:
    return WF_DIR / f"{wf_title(name)}.json"


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
        elif ct == "KSamplerAdvanced":  # fewer steps, the boundary between the samplers scaled with them
            steps = int(node["inputs"]["steps"])
            new = min(steps, 2)
            for key in ("start_at_step", "end_at_step"):
                if node["inputs"][key] < steps:
                    node["inputs"][key] = round(node["inputs"][key] * new / steps)
            node["inputs"]["steps"] = new
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


def test_the_six_workflows_their_api_twins_and_thumbnails_exist():
    top = sorted(p.stem for p in WF_DIR.glob("*.json"))
    api = sorted(p.stem for p in API_DIR.glob("*.json"))
    assert top == sorted(wf_title(n) for n in WF_NAMES), "workflows/*.json (listed as templates) are the examples"
    assert api == sorted(WF_NAMES)
    assert sorted(p.stem for p in WF_DIR.glob("*.jpg")) == top
    # the titles are file names on every system (no Windows-reserved characters) and fit a template card
    for name in WF_NAMES:
        title = wf_title(name)
        assert not set(title) & set('<>:"/\\|?*') and title == title.strip() and len(title) <= 32, title


@pytest.mark.parametrize("name", WF_NAMES)
def test_thumbnail_shows_the_title_and_the_description(name):
    """workflows/<title>.jpg is what wf_thumbnails.render draws now (title, description, chain): a JPEG of
    512 x 512 whose pixels differ from the rendering by JPEG noise only."""
    import numpy as np
    import wf_thumbnails

    got = wf_thumbnails.read(WF_DIR / f"{wf_title(name)}.jpg").astype(np.float64)
    want = wf_thumbnails.render(name).astype(np.float64)
    assert got.shape == want.shape == (512, 512, 3)
    assert np.abs(got - want).mean() < 2.0, "the thumbnail is out of date: run this file with --write"
    # and what it draws are the title and the description, whole
    texts = wf_thumbnails.texts(name)
    assert " ".join(texts["title"]) == WORKFLOWS[name][0]
    assert " ".join(texts["description"]) == WORKFLOWS[name][1]


@pytest.mark.parametrize("name", WF_NAMES)
def test_each_example_asks_for_each_file_once(object_info, name):
    """No model or LoRA file is picked in two places: widgets that need the same file are fed by one
    Primitive node."""
    wf = load(ui_path(name))
    links = {lk[0]: lk for lk in wf["links"]}
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    picks = []
    conv = api_from_ui(wf, object_info)
    for n in wf["nodes"]:
        if n["type"] == "PrimitiveNode":
            picks.append(n["widgets_values"][0])
            continue
        if n["type"] not in object_info:
            continue
        fed = {inp["name"] for inp in n.get("inputs", []) if inp.get("link") is not None
               and types.get(links[inp["link"]][1]) == "PrimitiveNode"}
        inputs = conv[str(n["id"])]["inputs"]
        picks += [v for k, v in inputs.items() if k in FILE_INPUTS and k not in fed and not isinstance(v, list)]
    assert len(picks) == len(set(picks)), f"{name} asks for a file twice: {sorted(picks)}"


@pytest.mark.parametrize("name", WF_NAMES)
def test_ui_workflow_matches_schemas_and_api_twin(object_info, name):
    wf = load(ui_path(name))
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
        if nodes[src]["type"] == "PrimitiveNode":  # a primitive feeds a widget of the same kind
            assert inp.get("widget", {}).get("name") == inp["name"], f"{name}: link {lid} into a socket"
            assert (typ == "COMBO") == (isinstance(spec[0], list) or spec[0] == "COMBO"), (name, lid, spec[0])
            continue
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
    wf = load(ui_path(name))
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
    assert sorted(listed.get("casa-lora", [])) == sorted(wf_title(n) for n in WF_NAMES), listed
    for name in WF_NAMES:
        quoted = urllib.parse.quote(wf_title(name))
        served = comfy_server.get(f"/api/workflow_templates/casa-lora/{quoted}.json")
        if isinstance(served, bytes):
            served = json.loads(served)
        assert served == load(ui_path(name))
        status, jpg = comfy_server.request("GET", f"/api/workflow_templates/casa-lora/{quoted}.jpg")
        assert status == 200 and jpg == (WF_DIR / f"{wf_title(name)}.jpg").read_bytes()


@pytest.fixture(scope="module")
def workflow_models(comfy_server):
    """Tiny models under the workflows' file names (a fresh set: its own basis and drift)."""
    from _fixtures_models import copy_model, tiny_set_in

    ts = tiny_set_in(comfy_server.base_dir, "casa_t")
    copy_model(ts, ts.base, WF_FILES["base"])
    copy_model(ts, ts.distilled, WF_FILES["distilled"])
    copy_model(ts, ts.style_lora, WF_FILES["style"], folder="loras")
    copy_model(ts, ts.distill_lora, WF_FILES["distill_lora"], folder="loras")
    # Wan2.2 A14B: two tiny experts of one architecture, each a base, a distilled model and its own LoRA
    for expert, seed in (("high", 40), ("low", 50)):
        ex = tiny_set_in(comfy_server.base_dir, f"casa_{expert}", seed=seed, fp8=False, distill_lora=False,
                         other_size=False, style_formats=("kohya",))
        copy_model(ex, ex.base, WF_FILES[f"{expert}_base"])
        copy_model(ex, ex.distilled, WF_FILES[f"{expert}_distilled"])
        copy_model(ex, ex.style_lora, WF_FILES[f"{expert}_style"], folder="loras")
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
    if name == "casa_wan22_two_experts":
        # each expert's LoRA was transferred onto that expert, and the low-noise sampler finished the latent
        # the high-noise sampler left (steps 0-1 then 1-2 of 2 here)
        texts = {g[nid]["inputs"]["lora_name"]: " ".join(outs[nid]["text"]) for nid, n in g.items()
                 if n["class_type"] == "CASATransferLoRA"}
        assert set(texts) == {WF_FILES["high_style"], WF_FILES["low_style"]}
        for lora, text in texts.items():
            assert f"transfer of {lora}" in text, text
        drifts = [" ".join(outs[nid]["text"]) for nid, n in g.items() if n["class_type"] == "CASAComputeDrift"]
        assert len(drifts) == 2 and all("layers differ" in t for t in drifts)
        ks = {nid: n["inputs"] for nid, n in g.items() if n["class_type"] == "KSamplerAdvanced"}
        hi = next(i for i, v in ks.items() if v["add_noise"] == "enable")
        lo = next(i for i, v in ks.items() if v["add_noise"] == "disable")
        assert ks[lo]["latent_image"] == [hi, 0] and ks[hi]["end_at_step"] == ks[lo]["start_at_step"] == 1
        assert ks[hi]["return_with_leftover_noise"] == "enable"


# ---------------------------------------------------------------------------------------------------
# regeneration through the real frontend
# ---------------------------------------------------------------------------------------------------

def write_workflows(comfy_root: Path | None = None) -> None:
    """Build each workflow from graphs.workflow_specs(), load it in the real frontend and write what the
    frontend exports: workflows/<name>.json (graphToPrompt().workflow) and workflows/api/<name>.json
    (graphToPrompt().output)."""
    import comfy_locate
    import wf_thumbnails
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
            ui_path(name).write_text(json.dumps(got["workflow"], indent=2) + "\n", encoding="utf-8")
            (API_DIR / f"{name}.json").write_text(json.dumps(got["output"], indent=2) + "\n", encoding="utf-8")
            thumb = wf_thumbnails.write(name, WF_DIR)
            print(f"wrote {ui_path(name).name}, api/{name}.json ({len(got['output'])} nodes) and {thumb.name}")
    finally:
        if browser is not None:
            browser.close()
        server.stop()


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit(__doc__)
    write_workflows()
