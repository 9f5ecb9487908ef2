"""The heatmap widget (web/casa_heatmap.js) in ComfyUI's REAL frontend (comfyui-frontend-package),
driven in headless Chromium over the DevTools protocol (chromium_cdp.py).

A real ComfyUI server with this pack (the ``comfy_server`` fixture) and tiny synthetic models; the
example workflow ``workflows/casa_routing_heatmap.json`` is loaded into the page (its model names
swapped for the tiny ones) and queued as a user would; then, in the widget: the picture appears,
legible at the node's default size (no text under 10 px on screen), the block and projection
pickers are filled from the report, picking another block and another projection redraws the
picture for that layer by re-running ONLY the heatmap node (the transfer comes from ComfyUI's cache),
hovering a cell reads out its values, and the overview opens a layer on click. The picture and the
picks come back after a tab switch and after a reload of the page; the picture is marked out of date
when an input upstream changes and after a run that failed before reaching the node.
Screenshots, the loaded workflow, the browser console and a trace of what the frontend did with the
workflow's tracked state (``frontend_trace.json``; ``restore_trace.json`` when a restore check fails) go to
``test-artifacts/web_heatmap/<ComfyUI version>/`` (gitignored).

Needs Chromium (Debian: ``apt-get install -y chromium``; or set ``CASA_CHROMIUM`` to a browser
binary).  Without it the test is skipped with that reason through conftest's mechanism (a failure
when ``CASA_REQUIRE_COMFYUI=1``).  The DevTools client (chromium_cdp.py) uses aiohttp, one of ComfyUI's
requirements.
"""
from __future__ import annotations

import io
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chromium_cdp import Chromium, quiet_frontend_settings, require_chromium
from graphs import wf_title
from test_heatmap_payload import write_tiny_models

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / f"{wf_title('casa_routing_heatmap')}.json"
ARTIFACTS = REPO / "test-artifacts" / "web_heatmap"
NODE = "CASARoutingHeatmap"
VIEWPORT = (1600, 1200)


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium_exe(comfy_root):
    return require_chromium("the web widget test")


@pytest.fixture(scope="module")
def server(comfy_server, comfy_root, tmp_path_factory):
    """The test server, or with CASA_FRONTEND_ROOT=<static folder of another comfyui-frontend-package> a
    second one on that frontend (``--front-end-root``), e.g. 1.35.9, the one ComfyUI 0.8.0 pins."""
    import os

    fe_root = os.environ.get("CASA_FRONTEND_ROOT")
    if not fe_root:
        yield comfy_server
        return
    from comfy_client import ComfyServer, prepare_base_dir

    base = prepare_base_dir(tmp_path_factory.mktemp("comfyui-fe-hm"), pack_root=REPO,
                            test_nodes=Path(__file__).resolve().parent / "testnodes")
    srv = ComfyServer(comfy_root, base, extra_args=["--front-end-root", fe_root])
    client = srv.start()
    infos = sorted(Path(fe_root).resolve().parents[1].glob("comfyui_frontend_package-*.dist-info"))
    tag = infos[-1].name.split("-")[1].removesuffix(".dist") if infos else "other"
    client.version = f"{comfy_server.version}-frontend-{tag}"
    try:
        yield client
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def artifacts(server):
    d = ARTIFACTS / f"ComfyUI-{server.version or 'unknown'}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(server, chromium_exe, artifacts):
    quiet_frontend_settings(server.base_dir)
    browser = Chromium(chromium_exe, window=VIEWPORT)
    try:
        browser.open_comfy(server.url, (NODE,))
        browser.press("Escape", 27)
        yield browser
    finally:
        (artifacts / "console.log").write_text("\n".join(browser.console))
        browser.close()


# ---------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------

def built_workflow() -> dict:
    """A UI-format graph like the example's, for when workflows/casa_routing_heatmap.json is absent."""
    def node(i, type_, pos, size, widgets, inputs=(), outputs=()):
        return {"id": i, "type": type_, "pos": pos, "size": size, "flags": {}, "order": i - 1, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
                "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}

    nodes = [
        node(1, "CASALoadSourceBasis", [0, 0], [270, 82], ["base.safetensors", "float16"],
             outputs=[("basis", "CASA_BASIS", [1])]),
        node(2, "UNETLoader", [0, 140], [300, 82], ["distilled.safetensors", "default"],
             outputs=[("MODEL", "MODEL", [2, 3])]),
        node(3, "CASAComputeDrift", [440, 40], [180, 46], None,
             inputs=[("basis", "CASA_BASIS", 1), ("model", "MODEL", 2)], outputs=[("drift", "CASA_DRIFT", [4])]),
        node(4, "CASATransferLoRA", [760, 0], [270, 294],
             ["lora.safetensors", 1, "CASA", 0.5, 0.5, 0.85, 0.9, "low-rank", 128, 0],
             inputs=[("model", "MODEL", 3), ("drift", "CASA_DRIFT", 4)],
             outputs=[("model", "MODEL", []), ("report", "CASA_REPORT", [5])]),
        node(5, NODE, [1120, 0], [660, 640], ["auto", "layer"], inputs=[("report", "CASA_REPORT", 5)],
             outputs=[("image", "IMAGE", [])]),
    ]
    links = [[1, 1, 0, 3, 0, "CASA_BASIS"], [2, 2, 0, 3, 1, "MODEL"], [3, 2, 0, 4, 0, "MODEL"],
             [4, 3, 0, 4, 1, "CASA_DRIFT"], [5, 4, 1, 5, 0, "CASA_REPORT"]]
    return {"last_node_id": 5, "last_link_id": 5, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def example_workflow() -> tuple[dict, str]:
    if WORKFLOW.exists():
        return json.loads(WORKFLOW.read_text()), str(WORKFLOW.relative_to(REPO))
    return built_workflow(), "built in the test (workflows/casa_routing_heatmap.json is absent)"


JS_HELPERS = r"""
window.__casa = window.__casa || (() => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  const log = [];
  for (const ev of ["execution_start", "execution_cached", "executing", "executed", "execution_error",
                    "execution_success"]) {
    api.addEventListener(ev, (e) => log.push([ev, e.detail]));
  }
  const hmNode = () => app.graph.nodes.find((n) => n.type === "CASARoutingHeatmap");
  const widget = () => hmNode()?.casaHeatmap;
  const canvasHash = () => {
    const c = widget()?.canvas; if (!c || !c.width) return null;
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let h = 0; for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0;
    return h;
  };
  // a trace of what the frontend does with the workflow's tracked state (written out when a restore
  // check fails): loads, resets, captures that changed the heatmap's widget values, deactivations, undo
  const trace = [];
  const hmVals = (g) => g?.nodes?.find((n) => n.type === "CASARoutingHeatmap")?.widgets_values ?? null;
  const note = (...row) => { trace.push([Date.now() % 1e6, ...row]); if (trace.length > 400) trace.shift(); };
  const CT = app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.constructor;
  if (CT && !CT.prototype.__casaTraced) {
    CT.prototype.__casaTraced = true;
    const wrap = (name, info) => {
      const orig = CT.prototype[name];
      if (!orig) return;
      CT.prototype[name] = function (...args) {
        const before = JSON.stringify(hmVals(this.activeState));
        const r = orig.apply(this, args);
        const after = JSON.stringify(hmVals(this.activeState));
        if (info || before !== after) note(name, this.workflow?.path, before, after, this.changeCount,
          !!CT.isLoadingGraph, !!this._restoringState, JSON.stringify(hmVals(app.graph?.serialize?.())));
        return r;
      };
    };
    wrap("reset", true); wrap("deactivate", true); wrap("captureCanvasState", false); wrap("updateState", true);
  }
  if (!app.__casaTraced) {
    app.__casaTraced = true;
    const load = app.loadGraphData;
    app.loadGraphData = function (data, clean, restoreView, workflow, ...rest) {
      note("loadGraphData", typeof workflow === "string" ? workflow : workflow?.path ?? null,
        JSON.stringify(hmVals(data)),
        JSON.stringify(data?.nodes?.find((n) => n.type === "UNETLoader")?.widgets_values));
      return load.call(this, data, clean, restoreView, workflow, ...rest);
    };
  }
  return { app, api, log, hmNode, widget, canvasHash, trace };
})();
true
"""


def state(page) -> dict:
    return page.eval("""(() => { const w = window.__casa.widget(); if (!w) return null;
        const d = w.root.dataset;
        return { url: d.imageUrl || null, layer: d.layer || null, view: d.view || null,
                 stale: d.stale === "1", banner: w.staleBanner?.textContent || "",
                 block: w.blockSel.value, proj: w.projSel.value,
                 blocks: Array.from(w.blockSel.options).map(o => o.value),
                 projs: Array.from(w.projSel.options).map(o => o.value),
                 layerWidget: w.widget("layer")?.value, viewWidget: w.widget("view")?.value,
                 readout: w.readout.textContent, status: w.status.textContent,
                 hash: window.__casa.canvasHash(), pending: !!w.pending }; })()""")


def wait_new_picture(page, old_url: str | None, timeout=120.0) -> dict:
    page.wait_for(f"(() => {{ const w = window.__casa.widget(); const d = w?.root.dataset;"
                  f" return !!(d?.imageUrl && d.imageUrl !== {json.dumps(old_url)} && w.image && !w.pending); }})()",
                  timeout, "a new picture in the widget")
    time.sleep(0.3)
    return state(page)


def click_tab(page, label: str) -> None:
    """A real click on the workflow tab named ``label``."""
    box = page.eval(f"""(() => {{ const el = [...document.querySelectorAll(".workflow-label, [class*=workflow-label]")]
        .find(e => e.textContent.trim() === {json.dumps(label)});
        if (!el) return null; const r = el.getBoundingClientRect(); return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()""")
    assert box, f"no workflow tab {label!r}"
    page.click(box["x"], box["y"])


def wait_restored(page, before: dict, artifacts: Path, timeout=60.0) -> dict:
    """The widget shows the same picture and picks as ``before`` (after a tab switch or a reload)."""
    page.wait_for(f"""(() => {{ const w = window.__casa.widget(); const d = w?.root.dataset;
        return !!(w && w.image && d.imageUrl === {json.dumps(before["url"])}); }})()""", timeout, "the restored picture")
    time.sleep(0.3)
    now = state(page)
    wrong = [(key, now[key], before[key]) for key in ("layer", "view", "block", "proj", "blocks", "projs",
                                                       "layerWidget") if now[key] != before[key]]
    if wrong:
        trace = page.eval("window.__casa.trace")
        graph = page.eval("window.comfyAPI.app.app.graph.serialize().nodes.map(n => [n.type, n.widgets_values])")
        (artifacts / "restore_trace.json").write_text(json.dumps({"wrong": wrong, "graph": graph, "trace": trace},
                                                                  indent=1))
        raise AssertionError(f"{wrong}; graph now: {graph}; the frontend's trace: {trace[-25:]}")
    assert now["hash"] is not None and now["readout"], now
    return now


def set_widget(page, node_type: str, name: str, value) -> None:
    page.eval(f"""(() => {{ const n = window.comfyAPI.app.app.graph.nodes.find(n => n.type === {json.dumps(node_type)});
        const w = n.widgets.find(w => w.name === {json.dumps(name)}); w.value = {json.dumps(value)};
        w.callback?.(w.value); window.comfyAPI.app.app.canvas.setDirty(true, true); return true; }})()""")


def fetch_picture(comfy_server, url: str) -> np.ndarray:
    from PIL import Image

    path = url[url.index("/view"):]
    status, body = comfy_server.request("GET", path)
    assert status == 200, (url, status)
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def last_run(page, comfy_server) -> tuple[dict, list]:
    """(history entry, executing node ids) of the last prompt the page saw start."""
    log = page.eval("window.__casa.log.map(([k, d]) => [k, d])")
    starts = [i for i, (k, _) in enumerate(log) if k == "execution_start"]
    assert starts, log
    pid = log[starts[-1]][1]["prompt_id"]
    # the frontend hands on `executing` as the bare node id (older ones: {"node", "prompt_id"})
    executing = [d.get("node") if isinstance(d, dict) else d for k, d in log[starts[-1]:] if k == "executing"]
    return comfy_server.wait(pid, timeout=120), [str(n) for n in executing if n is not None]


def cell_client_point(page, panel_id: str, row: int, col: int) -> dict:
    return page.eval(f"""(() => {{ const w = window.__casa.widget(); const f = w.payload.figure;
        const p = f.panels.find(p => p.id === {json.dumps(panel_id)});
        const [x0, x1] = p.x[{col}], [y0, y1] = p.y[{row}];
        return w.toClient((x0 + x1) / 2, (y0 + y1) / 2); }})()""")


# ---------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------

def test_widget_picks_layers_redraws_and_reads_out_cells(server, page, artifacts):
    comfy_server = server
    from casa_core.pictures import fmt_share

    names = write_tiny_models(comfy_server.base_dir)
    wf, source = example_workflow()
    wf["id"] = str(uuid.uuid4())  # a workflow never run on this server (the widget would restore that run)
    (artifacts / "workflow_loaded.json").write_text(json.dumps(wf, indent=1))
    print(f"workflow: {source}")

    # load the example workflow as the frontend does, point it at the tiny models
    page.eval(JS_HELPERS)
    # loaded once and waited for: a retry could open a second tab of the same name, and the tab switch
    # below picks its tab by name
    page.eval(f"""(async () => {{ const app = window.comfyAPI.app.app;
        await app.loadGraphData({json.dumps(wf)}, true, true, "casa_routing_heatmap"); return true; }})()""")
    count = f"window.comfyAPI.app.app.graph.nodes.filter(n => n.type === {json.dumps(NODE)}).length"
    page.wait_for(f"{count} >= 1", 60, "the example workflow's heatmap node")
    time.sleep(0.3)
    n = page.eval(count)
    assert n == 1, "the example workflow has several CASARoutingHeatmap nodes"
    tabs = page.eval("""[...document.querySelectorAll(".workflow-label, [class*=workflow-label]")]
        .filter(e => e.textContent.trim() === "casa_routing_heatmap").length""")
    assert tabs == 1, f"{tabs} workflow tabs named casa_routing_heatmap"
    page.eval(f"""(() => {{ const app = window.comfyAPI.app.app;
        const set = (type, name, v) => {{ for (const n of app.graph.nodes.filter(n => n.type === type)) {{
            const w = n.widgets.find(w => w.name === name); if (w) w.value = v; }} }};
        set("CASALoadSourceBasis", "base_model", {json.dumps(names[0])});
        set("CASALoadSourceBasis", "storage", "float32");
        set("UNETLoader", "unet_name", {json.dumps(names[1])});
        set("CASATransferLoRA", "lora_name", {json.dumps(names[2])});
        set("CASATransferLoRA", "rank", 16);
        const hm = window.__casa.hmNode();
        hm.widgets.find(w => w.name === "layer").value = "auto";
        // bring the heatmap node to the top left of the screen at 100 %
        const ds = app.canvas.ds; ds.scale = 1;
        ds.offset = [90 - hm.pos[0], 110 - hm.pos[1]];
        app.canvas.setDirty(true, true); return true; }})()""")
    default_size = page.eval("window.__casa.hmNode().size.slice()")
    ids = page.eval("""(() => { const g = window.comfyAPI.app.app.graph;
        const id = (t) => String(g.nodes.find(n => n.type === t)?.id);
        return {hm: id("CASARoutingHeatmap"), transfer: id("CASATransferLoRA"), basis: id("CASALoadSourceBasis")}; })()""")
    assert page.eval("!!window.__casa.widget()"), "the extension did not add its widget to the node"
    assert "run the graph" in state(page)["status"]

    # 1. run the workflow (the Run button's action): the picture appears, the pickers are filled
    page.eval("window.comfyAPI.app.app.queuePrompt(0, 1).then(() => true)")
    s1 = wait_new_picture(page, None, timeout=300)
    entry, _ = last_run(page, comfy_server)
    payload = entry["outputs"][ids["hm"]]["casa_heatmap"][0]
    assert s1["layer"] == payload["layer"] and s1["view"] == "layer"
    layers = [r for r in payload["layers"] if r["routing"]]
    assert s1["blocks"] == sorted({str(r["block"]) for r in layers}, key=int)
    first = next(r for r in layers if r["name"] == s1["layer"])
    assert (s1["block"], s1["proj"]) == (str(first["block"]), first["projection"])
    assert s1["projs"] == [r["projection"] for r in layers if r["block"] == first["block"]]
    assert s1["hash"] is not None
    pic1 = fetch_picture(comfy_server, s1["url"])
    assert pic1.shape == (payload["figure"]["height"], payload["figure"]["width"], 3)
    # legible at the node's default size (the example's size is the default the widget gives a new node):
    # the smallest text of the picture, at the scale the widget draws it at 100 % zoom, is >= 10 px
    new_size = page.eval("""(() => { const n = window.LiteGraph.createNode("CASARoutingHeatmap");
        const s = n.size.slice(); n.onRemoved?.(); return s; })()""")
    assert default_size == new_size, (default_size, new_size)
    shown = page.eval("window.__casa.widget().transform.s")
    assert payload["figure"]["min_text_px"] >= 12
    assert shown * payload["figure"]["min_text_px"] >= 10.0, (shown, payload["figure"]["min_text_px"], default_size)
    assert payload["summary"] in state(page)["readout"] or payload["figure"]["verdict"] in state(page)["readout"]
    page.screenshot(artifacts / "1_after_run.png")
    page.eval("""(() => { const hm = window.__casa.hmNode();
        hm.size = [Math.max(hm.size[0], 1100), Math.max(hm.size[1], 1000)];
        window.comfyAPI.app.app.canvas.setDirty(true, true); return true; })()""")

    # 2. pick another block: only the heatmap node runs again, the picture shows that layer
    other_block = next(b for b in s1["blocks"] if b != s1["block"])
    page.eval(f"""(() => {{ const s = window.__casa.widget().blockSel; s.value = {json.dumps(other_block)};
        s.dispatchEvent(new Event("change", {{bubbles: true}})); return true; }})()""")
    s2 = wait_new_picture(page, s1["url"])
    want2 = f"blocks.{other_block}.{s1['proj']}"
    assert s2["layer"] == want2 and s2["layerWidget"] == want2 and s2["block"] == other_block
    entry2, executing = last_run(page, comfy_server)
    assert executing == [ids["hm"]], f"picking a layer re-ran more than the heatmap: {executing}"
    cached = next(d["nodes"] for k, d in entry2["status"]["messages"] if k == "execution_cached")
    assert ids["transfer"] in cached and ids["basis"] in cached and ids["hm"] not in cached
    assert list(entry2["outputs"]) == [ids["hm"]]
    assert entry2["outputs"][ids["hm"]]["casa_heatmap"][0]["layer"] == want2
    pic2 = fetch_picture(comfy_server, s2["url"])
    assert pic2.shape != pic1.shape or not np.array_equal(pic1, pic2), "the picture did not change"
    assert s2["hash"] != s1["hash"], "the widget's canvas did not change"
    page.screenshot(artifacts / "2_other_block.png")

    # 3. pick another projection
    other_proj = next(p for p in s2["projs"] if p != s2["proj"] and p.startswith("ffn"))
    tracked = page.eval(f"""(() => {{ const s = window.__casa.widget().projSel; s.value = {json.dumps(other_proj)};
        s.dispatchEvent(new Event("change", {{bubbles: true}}));
        const t = window.comfyAPI.app.app.extensionManager.workflow.activeWorkflow.changeTracker;
        return t.activeState.nodes.find(n => n.type === {json.dumps(NODE)}).widgets_values; }})()""")
    want3 = f"blocks.{other_block}.{other_proj}"
    # the pick is in the workflow's tracked state at once (what a tab switch, undo or a save restores),
    # not only once the queued run is acknowledged
    assert tracked[0] == want3, tracked
    s3 = wait_new_picture(page, s2["url"])
    assert s3["layer"] == want3 and s3["layerWidget"] == want3
    _, executing = last_run(page, comfy_server)
    assert executing == [ids["hm"]]
    assert not np.array_equal(fetch_picture(comfy_server, s3["url"]), pic2)

    # 4. hover: the read-out shows the values of the cell under the cursor
    fig = page.eval("window.__casa.widget().payload.figure")
    r, c = len(fig["rows"]) // 2, 1
    pt = cell_client_point(page, "regions", r, c)
    page.mouse("mouseMoved", pt["x"], pt["y"])
    page.wait_for("window.__casa.widget().hover !== null", 10, "the hover state")
    text = state(page)["readout"]
    v = fig["values"]
    assert f"output {fig['rows'][r]['label']} (" in text and f"input {fig['cols'][c]['label']} (" in text, text
    for key in ("restored", "preserved", "arbitrated"):
        assert f"{key} {fmt_share(v[key][r][c])}" in text, (key, text)
    assert f"{v['entries'][r][c]:,} entries" in text or f"{v['entries'][r][c]} entries" in text, text
    # in plain words: how much each changed, and whether they push the same way
    assert "distillation change" in text and "LoRA change" in text and "direction " in text, text
    # the beyond-k corner of the alignment panel
    pt = cell_client_point(page, "alignment", len(fig["rows"]) - 1, len(fig["cols"]) - 1)
    page.mouse("mouseMoved", pt["x"], pt["y"])
    time.sleep(0.3)
    assert "beyond the leading subspace" in state(page)["readout"]
    page.screenshot(artifacts / "3_hover.png")

    # 5. the overview, and a click on one of its cells opens that layer
    btn = page.eval("""(() => { const r = window.__casa.widget().overviewBtn.getBoundingClientRect();
        return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()""")
    page.click(btn["x"], btn["y"])
    s5 = wait_new_picture(page, s3["url"])
    assert s5["view"] == "overview" and s5["viewWidget"] == "overview"
    ov = page.eval("window.__casa.widget().payload.figure")
    target = ov["names"][0][0]
    assert target and target != s3["layer"]
    pt = cell_client_point(page, "kept", 0, 0)
    page.mouse("mouseMoved", pt["x"], pt["y"])
    time.sleep(0.3)
    assert state(page)["readout"].startswith(f"{target}: ")
    page.screenshot(artifacts / "4_overview.png")
    page.click(pt["x"], pt["y"])
    s6 = wait_new_picture(page, s5["url"])
    assert s6["view"] == "layer" and s6["layer"] == target and s6["layerWidget"] == target
    page.screenshot(artifacts / "5_layer_from_overview.png")

    # the widget is not saved with the workflow: widgets_values keep their contract (layer, view)
    saved = page.eval("window.comfyAPI.app.app.graph.serialize()")
    hm = next(n for n in saved["nodes"] if n["type"] == NODE)
    assert hm["widgets_values"] == [target, "layer"]
    (artifacts / "workflow_after.json").write_text(json.dumps(saved, indent=1))

    # 6. another workflow tab and back: the picture and the picks come back (the node is a new object)
    page.eval("window.__casa.hmNode().__casaMark = 1; true")
    page.eval("window.comfyAPI.app.app.extensionManager.command.execute('Comfy.NewBlankWorkflow').then(() => true)")
    page.wait_for("!window.comfyAPI.app.app.graph.nodes.some(n => n.type === 'CASARoutingHeatmap')", 30,
                  "the blank workflow")
    page.screenshot(artifacts / "6a_other_tab.png")
    click_tab(page, "casa_routing_heatmap")
    page.wait_for("(() => { const n = window.__casa.hmNode(); return !!n && !n.__casaMark; })()", 30,
                  "the heatmap workflow shown again")
    back = wait_restored(page, s6, artifacts)
    (artifacts / "frontend_trace.json").write_text(json.dumps(page.eval("window.__casa.trace"), indent=1))
    assert not back["stale"], back
    page.screenshot(artifacts / "6b_tab_switched_back.png")

    # 7. a reload of the page: the same picture and picks, from the stored output (/history)
    page.reload()
    page.wait_for(f"!!(window.comfyAPI?.app?.app?.graph?.nodes?.some(n => n.type === {json.dumps(NODE)}))", 120,
                  "the page after the reload")
    time.sleep(1.0)
    page.eval(JS_HELPERS)
    reloaded = wait_restored(page, s6, artifacts)
    assert not reloaded["stale"], reloaded
    page.screenshot(artifacts / "7_after_reload.png")

    # 8. an input upstream changes: the picture is marked out of date; changed back: it is current again
    set_widget(page, "CASATransferLoRA", "strength", 0.5)
    page.wait_for("window.__casa.widget().root.dataset.stale === '1'", 15, "the out-of-date mark")
    assert "inputs changed" in state(page)["banner"]
    page.screenshot(artifacts / "8_out_of_date.png")
    set_widget(page, "CASATransferLoRA", "strength", 1.0)
    page.wait_for("window.__casa.widget().root.dataset.stale === ''", 15, "the mark gone again")

    # 9. a run that fails before the heatmap produces its picture: the old picture is marked
    page.eval("""(() => { const w = window.__casa.widget().widget("layer"); w.value = "blocks.0.no_such_layer";
        return true; })()""")
    page.eval(f"window.comfyAPI.app.app.queuePrompt(0, 1, [{json.dumps(ids['hm'])}]).then(() => true)")
    # (the changed layer alone marks it "inputs changed" at once; the run's failure then says why)
    page.wait_for("window.__casa.widget().staleBanner.textContent.includes('failed')", 120,
                  "the mark after the failed run")
    # the failed node named as the page names it (its title)
    assert "failed" in state(page)["banner"] and "CASA Routing Heatmap" in state(page)["banner"], state(page)
    assert state(page)["url"] == s6["url"], "the picture of the earlier run stays, marked"
    page.screenshot(artifacts / "9_after_failed_run.png")
    problems = [line for line in page.console if line.startswith(("error", "exception")) and "casa" in line.lower()
                and "no_such_layer" not in line]
    assert not problems, problems
