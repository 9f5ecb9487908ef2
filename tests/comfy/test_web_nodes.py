"""What a person sees of the pack in ComfyUI's REAL frontend (headless Chromium over the DevTools protocol,
chromium_cdp.py), on a real server with tiny models:

* after a run, every CASA node shows its summary ON the node (web/casa_summary.js; the heatmap in its
  widget): the text of the node's ui output in /history, whole (no scrolling), warnings marked and also
  in the server log, the Save node's text naming the file it wrote;
* the help page (web/docs/<NodeId>.md) opens for every node from the node's info button;
* the template browser shows each example with its whole title and its thumbnail, and opens it;
* no CASA node's title is cut at 100 % in the examples.

Screenshots and the console go to ``test-artifacts/web_nodes/<ComfyUI version>/`` (gitignored).
``CASA_FRONTEND_ROOT=<static folder of another comfyui-frontend-package>`` runs them on that frontend
(e.g. 1.35.9, the one ComfyUI 0.8.0 pins) through a second server started with ``--front-end-root``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
from chromium_cdp import Chromium, quiet_frontend_settings, require_chromium
from graphs import WF_NAMES, WORKFLOWS, ui_text, wf_title
from test_heatmap_payload import write_tiny_models

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ARTIFACTS = REPO / "test-artifacts" / "web_nodes"
CASA = ("CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA", "CASARoutingHeatmap")
DISPLAY = {"CASALoadSourceBasis": "CASA Load Source Basis", "CASAComputeDrift": "CASA Compute Drift",
           "CASATransferLoRA": "CASA Transfer LoRA", "CASASaveLoRA": "CASA Save LoRA",
           "CASARoutingHeatmap": "CASA Routing Heatmap"}
VIEWPORT = (1920, 1080)


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server, comfy_root, tmp_path_factory):
    """The test server, or with CASA_FRONTEND_ROOT a second one on that frontend."""
    fe_root = os.environ.get("CASA_FRONTEND_ROOT")
    if not fe_root:
        yield comfy_server
        return
    from comfy_client import ComfyServer, prepare_base_dir

    base = prepare_base_dir(tmp_path_factory.mktemp("comfyui-fe"), pack_root=REPO, test_nodes=HERE / "testnodes")
    srv = ComfyServer(comfy_root, base, extra_args=["--front-end-root", fe_root])
    client = srv.start()
    client.version = comfy_server.version
    try:
        yield client
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def page(server):
    exe = require_chromium("the frontend tests")
    quiet_frontend_settings(server.base_dir)
    browser = Chromium(exe, window=VIEWPORT)
    try:
        browser.open_comfy(server.url, CASA)
        browser.press("Escape", 27)
        browser.frontend_version = browser.eval("window.__COMFYUI_FRONTEND_VERSION__ || ''")
        d = ARTIFACTS / f"ComfyUI-{server.version or 'unknown'}-frontend-{browser.frontend_version or 'unknown'}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        browser.artifacts = d
        yield browser
    finally:
        if getattr(browser, "artifacts", None):
            (browser.artifacts / "console.log").write_text("\n".join(browser.console))
        browser.close()


@pytest.fixture(scope="module")
def models(server):
    """The tiny trio, and the style LoRA with one more key that matches no layer (a warning)."""
    from safetensors.torch import load_file, save_file

    base, distilled, style = write_tiny_models(server.base_dir)
    loras = server.base_dir / "models" / "loras"
    sd = load_file(str(loras / style))
    up = next(k for k in sd if k.endswith(".lora_up.weight"))
    module = up[: -len(".lora_up.weight")]
    sd["lora_unet_no_such_module.lora_up.weight"] = sd[up].clone()
    sd["lora_unet_no_such_module.lora_down.weight"] = sd[module + ".lora_down.weight"].clone()
    extra = "casa_web_style_extra_key.safetensors"
    save_file(sd, str(loras / extra))
    return {"base": base, "distilled": distilled, "style": style, "style_extra": extra}


def load_example(page, name: str, scale: float = 1.0, as_name: str | None = None) -> None:
    """The example as a new workflow (a fresh id: no earlier run of it on this server to restore); ``as_name``:
    the name the frontend keeps it under (the example's by default, whose outputs it may keep from before)."""
    wf = json.loads((REPO / "workflows" / f"{wf_title(name)}.json").read_text())
    wf["id"] = str(uuid.uuid4())
    for attempt in range(5):
        n = page.eval(f"""(async () => {{ const app = window.comfyAPI.app.app;
            await app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(as_name or name)});
            await new Promise(r => setTimeout(r, 300));
            const ds = app.canvas.ds; ds.scale = {scale}; ds.offset = [80, 90]; app.canvas.setDirty(true, true);
            return app.graph.nodes.length; }})()""")
        if n == len(wf["nodes"]):
            return
        time.sleep(1.0)
    raise AssertionError(f"the frontend kept {n} of {len(wf['nodes'])} nodes of {name}")


def set_widget(page, node_type: str, name: str, value) -> None:
    page.eval(f"""(() => {{ for (const n of window.comfyAPI.app.app.graph.nodes.filter(n => n.type === {json.dumps(node_type)})) {{
        const w = n.widgets.find(w => w.name === {json.dumps(name)}); if (w) {{ w.value = {json.dumps(value)}; w.callback?.(w.value); }} }}
        return true; }})()""")


def node_ids(page) -> dict:
    return page.eval("""(() => Object.fromEntries(window.comfyAPI.app.app.graph.nodes
        .filter(n => n.type.startsWith("CASA")).map(n => [n.type, String(n.id)])))()""")


# ---------------------------------------------------------------------------------------------------
# 1. summaries on the nodes
# ---------------------------------------------------------------------------------------------------

SHOWN = r"""(() => { const app = window.comfyAPI.app.app; const out = {};
  for (const n of app.graph.nodes) {
    if (n.casaSummary) {
      const el = n.casaSummary.root;
      out[n.type] = { text: el.innerText, stale: el.dataset.stale === "1", prompt: el.dataset.promptId,
        rects: el.getClientRects().length, scroll: el.scrollHeight, client: el.clientHeight,
        warn: [...el.querySelectorAll(".casa-warn")].map(e => e.textContent) };
    } else if (n.casaHeatmap) {
      const el = n.casaHeatmap.readout;
      out[n.type] = { text: el.innerText, rects: el.getClientRects().length, scroll: 0, client: 0, warn: [] };
    }
  }
  return out; })()"""


def test_every_casa_node_shows_its_summary_after_a_run(server, page, models):
    load_example(page, "casa_save_lora", scale=0.8)
    set_widget(page, "CASALoadSourceBasis", "base_model", models["base"])
    set_widget(page, "CASALoadSourceBasis", "storage", "float32")
    set_widget(page, "UNETLoader", "unet_name", models["distilled"])
    set_widget(page, "CASATransferLoRA", "lora_name", models["style_extra"])
    set_widget(page, "CASATransferLoRA", "rank", 8)
    prefix = f"casa_web/summary_{uuid.uuid4().hex[:6]}"
    set_widget(page, "CASASaveLoRA", "filename_prefix", prefix)
    # the heatmap node added as a user would, on the transfer's report
    page.eval("""(() => { const app = window.comfyAPI.app.app, LG = window.LiteGraph;
        const t = app.graph.nodes.find(n => n.type === "CASATransferLoRA");
        const hm = LG.createNode("CASARoutingHeatmap"); hm.pos = [t.pos[0] + 380, t.pos[1] + 360]; app.graph.add(hm);
        t.connect(1, hm, 0); app.canvas.setDirty(true, true); return true; })()""")
    # every node runs (another module's run of the same models would leave them in ComfyUI's cache)
    server.reset_cache()
    before = page.eval(SHOWN)
    assert set(before) == set(CASA), before
    for t in CASA[:-1]:
        assert "appears here after a run" in before[t]["text"], before[t]
    log_at = server.log_size()
    pid = page.eval("""(async () => { const app = window.comfyAPI.app.app; const api = window.comfyAPI.api.api;
        let id = null; const f = (e) => { id = id || e.detail?.prompt_id; }; api.addEventListener("execution_start", f);
        await app.queuePrompt(0, 1);
        for (let i = 0; i < 100 && !id; i++) await new Promise(r => setTimeout(r, 100));
        return id; })()""")
    assert pid, "no execution_start seen"
    entry = server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    ids = node_ids(page)
    page.wait_for(f"""(() => {{ const s = {SHOWN}; return Object.entries(s).every(([t, v]) =>
        t === "CASARoutingHeatmap" ? v.text.length > 20 : v.prompt === {json.dumps(pid)}); }})()""", 60,
                  "the summaries of this run on the nodes")
    time.sleep(0.8)  # the text areas settle to their size
    shown = page.eval(SHOWN)
    page.screenshot(page.artifacts / "1_summaries_after_run.png")
    for t in CASA:
        s = shown[t]
        want = entry["outputs"][ids[t]]["casa_summary"][0]
        flat = " ".join(s["text"].split())
        for line in want["summary"].splitlines():
            assert " ".join(line.split()) in flat, (t, line, s["text"])
        assert s["rects"] > 0, f"{t}: its summary is not on the page"
        assert s["scroll"] <= s["client"] + 2, f"{t}: the summary is cut ({s['scroll']} > {s['client']} px)"
        assert not s.get("stale"), (t, s)
        assert [w.lstrip("\u26a0 ") for w in s["warn"]] == want["warnings"], (t, s["warn"], want["warnings"])
    # the warning is on the node and in the server log
    warn = next(w for w in entry["outputs"][ids["CASATransferLoRA"]]["casa_summary"][0]["warnings"]
                if "match no layer" in w)
    assert "lora_unet_no_such_module" in warn or "no_such_module" in warn, warn
    log = server.log_since(log_at)
    assert f"casa-lora CASA Transfer LoRA: {warn}" in log, log[-3000:]
    # the Save node says which file it wrote, and that file exists
    text = ui_text(entry, ids["CASASaveLoRA"])
    name = next(w for w in text.split() if w.startswith(prefix) and w.endswith(".safetensors"))
    path = server.base_dir / "models" / "loras" / name
    assert path.is_file(), path
    assert name in shown["CASASaveLoRA"]["text"] and str(path) in " ".join(shown["CASASaveLoRA"]["text"].split())


def queue_and_wait(page, server) -> tuple[str, dict]:
    pid = page.eval("""(async () => { const app = window.comfyAPI.app.app; const api = window.comfyAPI.api.api;
        let id = null; const f = (e) => { id = id || e.detail?.prompt_id; }; api.addEventListener("execution_start", f);
        await app.queuePrompt(0, 1);
        for (let i = 0; i < 100 && !id; i++) await new Promise(r => setTimeout(r, 100));
        api.removeEventListener("execution_start", f); return id; })()""")
    assert pid, "no execution_start seen"
    entry = server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return pid, entry


def test_nodes_served_from_comfys_cache_show_the_summary_of_the_run_that_made_it(server, page, models):
    """ComfyUI sends no output for a node it serves from its cache; in another workflow whose CASA nodes
    compute the same things, the nodes show the summary of the run that made the cached results."""
    settings = [("CASALoadSourceBasis", "base_model", models["base"]), ("CASALoadSourceBasis", "storage", "float32"),
                ("UNETLoader", "unet_name", models["distilled"]), ("CASATransferLoRA", "lora_name", models["style"]),
                ("CASATransferLoRA", "rank", 8)]
    load_example(page, "casa_save_lora", scale=0.8)
    for t, w, v in settings:
        set_widget(page, t, w, v)
    set_widget(page, "CASASaveLoRA", "filename_prefix", f"casa_web/cached_{uuid.uuid4().hex[:6]}")
    _, first = queue_and_wait(page, server)
    first_ids = node_ids(page)
    made = {t: first["outputs"][first_ids[t]]["casa_summary"][0]["summary"] for t in CASA[:3]
            if first_ids[t] in first["outputs"]}
    load_example(page, "casa_routing_heatmap", scale=0.8)
    for t, w, v in settings:
        set_widget(page, t, w, v)
    pid, second = queue_and_wait(page, server)
    ids = node_ids(page)
    cached = next(d["nodes"] for k, d in second["status"]["messages"] if k == "execution_cached")
    assert {ids[t] for t in CASA[:3]} <= set(cached), (cached, ids)  # the case under test: all three cached
    if len(made) < 3:  # the first run was itself served from the cache: the texts are in an earlier entry
        made = {}
        for e in server.get("/history").values():
            for nid, n in e["prompt"][2].items():
                out = e.get("outputs", {}).get(nid, {}).get("casa_summary")
                if out and n["class_type"] in CASA[:3] and n["inputs"].get("lora_name", models["style"]) == models["style"]:
                    made[n["class_type"]] = out[0]["summary"]
    page.wait_for(f"""(() => {{ const s = {SHOWN};
        return ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA"].every(t => s[t].prompt === {json.dumps(pid)}); }})()""",
                  30, "the cached nodes' summaries")
    shown = page.eval(SHOWN)
    page.screenshot(page.artifacts / "1b_cached_nodes_summaries.png")
    for t in CASA[:3]:
        assert " ".join(made[t].split()) in " ".join(shown[t]["text"].split()), (t, made[t], shown[t]["text"])
        assert not shown[t]["stale"]
    # a reload: /history holds no output of these nodes for this run (they were cached), only the run that
    # made them, in the other workflow; the summaries come back all the same
    page.reload()
    page.wait_for("!!(window.comfyAPI?.app?.app?.graph?.nodes?.some(n => n.type === 'CASAComputeDrift'))", 120,
                  "the page after the reload")
    page.wait_for(f"""(() => {{ const s = {SHOWN};
        return ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA"].every(t => s[t] &&
          !s[t].text.includes("appears here after a run")); }})()""", 30, "the cached nodes' summaries after a reload")
    shown = page.eval(SHOWN)
    page.screenshot(page.artifacts / "1c_cached_nodes_after_reload.png")
    for t in CASA[:3]:
        assert " ".join(made[t].split()) in " ".join(shown[t]["text"].split()), (t, made[t], shown[t]["text"])


def test_a_new_workflow_shows_no_summary_of_another_workflows_run(server, page, models):
    """The frontend keeps node outputs by node id: a workflow opened after a run, whose CASA nodes have the same
    ids as the nodes that ran (here: the same example again), shows the placeholder on them, not the other
    workflow's summaries; going back to the workflow that ran shows its summaries again."""
    load_example(page, "casa_save_lora", scale=0.8)
    for t, w, v in [("CASALoadSourceBasis", "base_model", models["base"]), ("CASALoadSourceBasis", "storage", "float32"),
                    ("UNETLoader", "unet_name", models["distilled"]), ("CASATransferLoRA", "lora_name", models["style"]),
                    ("CASATransferLoRA", "rank", 8)]:
        set_widget(page, t, w, v)
    set_widget(page, "CASASaveLoRA", "filename_prefix", f"casa_web/other_{uuid.uuid4().hex[:6]}")
    ran = page.eval("(() => window.comfyAPI.app.app.graph.serialize())()")
    pid, _ = queue_and_wait(page, server)
    page.wait_for(f"""(() => {{ const s = {SHOWN}; return ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA",
        "CASASaveLoRA"].every(t => s[t] && s[t].prompt === {json.dumps(pid)}); }})()""", 60, "the run's summaries")
    ids = node_ids(page)
    load_example(page, "casa_save_lora", scale=0.8, as_name=f"casa_other_{uuid.uuid4().hex[:6]}")
    assert node_ids(page) == ids  # the case under test: the same node ids in another workflow
    time.sleep(2.5)  # the restore (the frontend's kept outputs, /history) and the once-a-second refresh
    shown = page.eval(SHOWN)
    page.screenshot(page.artifacts / "1e_new_workflow_no_other_summary.png")
    for t in ("CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA"):
        assert "appears here after a run" in shown[t]["text"], (t, shown[t])
        assert not shown[t].get("prompt"), (t, shown[t])
    # the workflow that ran, opened again: its summaries come back
    page.eval(f"""(async () => {{ await window.comfyAPI.app.app.loadGraphData({json.dumps(ran)}, true, true,
        "casa_ran_{uuid.uuid4().hex[:6]}"); return true; }})()""")
    page.wait_for(f"""(() => {{ const s = {SHOWN}; return ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA",
        "CASASaveLoRA"].every(t => s[t] && s[t].prompt === {json.dumps(pid)}); }})()""", 30,
                  "the summaries of the workflow that ran, opened again")
    # a reload (the frontend reopens the workflow that ran, whose summaries come from /history) and, before the
    # history has come back (held for 3 s here), another workflow opened: its nodes get nothing of the first's
    held = page.call("Page.addScriptToEvaluateOnNewDocument", {"source": """(() => { const f = window.fetch;
        window.fetch = async function (url, ...rest) { const r = await f.call(this, url, ...rest);
          if (String(url?.url ?? url).includes("/history")) await new Promise(ok => setTimeout(ok, 3000));
          return r; }; })()"""})["identifier"]
    try:
        page.reload()
        page.wait_for("!!(window.comfyAPI?.app?.app?.graph?.nodes?.some(n => n.type === 'CASAComputeDrift'))", 120,
                      "the page after the reload")
        load_example(page, "casa_save_lora", scale=0.8, as_name=f"casa_other_{uuid.uuid4().hex[:6]}")
        assert node_ids(page) == ids
        time.sleep(5.0)  # the held history has come back and been used
        shown = page.eval(SHOWN)
    finally:
        page.call("Page.removeScriptToEvaluateOnNewDocument", {"identifier": held})
    page.screenshot(page.artifacts / "1f_new_workflow_during_restore.png")
    for t in ("CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA"):
        assert "appears here after a run" in shown[t]["text"], (t, shown[t])


def test_a_runs_summaries_stay_with_the_workflow_it_was_queued_from(server, page, models):
    """A run queued from one workflow, and another workflow opened while it waits and runs (its CASA nodes have
    the same ids): the other workflow's nodes keep the placeholder; the workflow that ran, opened again, shows the
    run's summaries."""
    load_example(page, "casa_save_lora", scale=0.8)
    for t, w, v in [("CASALoadSourceBasis", "base_model", models["base"]), ("CASALoadSourceBasis", "storage", "float32"),
                    ("UNETLoader", "unet_name", models["distilled"]), ("CASATransferLoRA", "lora_name", models["style"]),
                    ("CASATransferLoRA", "rank", 4)]:
        set_widget(page, t, w, v)
    set_widget(page, "CASASaveLoRA", "filename_prefix", f"casa_web/queued_{uuid.uuid4().hex[:6]}")
    ran = page.eval("(() => window.comfyAPI.app.app.graph.serialize())()")
    ids = node_ids(page)
    server.reset_cache()  # every CASA node runs and sends its output
    before = set(server.get("/history"))
    # a prompt that sleeps first, so that this workflow's run waits in the queue while another is opened
    server.post_prompt({
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 32 + 16 * (uuid.uuid4().int % 50),
                                                                 "height": 32, "batch_size": 1}},
        "sleep": {"class_type": "CasaTestSleep", "inputs": {"samples": ["latent", 0], "seconds": 4.0}},
        "stats": {"class_type": "CasaTestLatentStats", "inputs": {"samples": ["sleep", 0]}}})
    page.eval("""(async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); return true; })()""")
    load_example(page, "casa_save_lora", scale=0.8, as_name=f"casa_while_{uuid.uuid4().hex[:6]}")
    assert node_ids(page) == ids  # the case under test: the same node ids in the workflow shown
    deadline = time.monotonic() + 300
    pid = None
    while pid is None and time.monotonic() < deadline:
        new = {k: e for k, e in server.get("/history").items() if k not in before}
        pid = next((k for k, e in new.items() if any(n["class_type"] == "CASATransferLoRA"
                                                     for n in e["prompt"][2].values())), None)
        time.sleep(0.2)
    assert pid, "the workflow's run did not end"
    assert server.wait(pid)["status"]["status_str"] == "success"
    time.sleep(2.0)  # the run's messages handled, the once-a-second refresh done
    shown = page.eval(SHOWN)
    page.screenshot(page.artifacts / "1g_other_workflow_while_running.png")
    for t in ("CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA"):
        assert "appears here after a run" in shown[t]["text"], (t, shown[t])
    page.eval(f"""(async () => {{ await window.comfyAPI.app.app.loadGraphData({json.dumps(ran)}, true, true,
        "casa_queued_{uuid.uuid4().hex[:6]}"); return true; }})()""")
    page.wait_for(f"""(() => {{ const s = {SHOWN}; return ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA",
        "CASASaveLoRA"].every(t => s[t] && s[t].prompt === {json.dumps(pid)} && !s[t].stale); }})()""", 30,
                  "the run's summaries on the workflow it was queued from")


def test_a_failure_before_any_summary_is_shown_whole_on_the_node(server, page, models):
    """A new workflow whose transfer fails (a LoRA with a NaN): the transfer and save nodes show the whole reason
    (named by the node's title, without ComfyUI's trailing newline; "from an earlier run" only with an earlier
    summary), not one cut line."""
    from safetensors.torch import load_file, save_file

    loras = server.base_dir / "models" / "loras"
    sd = load_file(str(loras / models["style"]))
    up = next(k for k in sd if k.endswith(".lora_up.weight"))
    sd[up] = sd[up].clone()
    sd[up][0, 0] = float("nan")
    bad = f"casa_web_nan_{uuid.uuid4().hex[:6]}.safetensors"
    save_file(sd, str(loras / bad))
    # a fresh page: the frontend keeps no node outputs of earlier graphs (1.35.9 keeps them by node id across
    # loadGraphData), so these nodes really have no earlier summary
    page.reload()
    page.wait_for("!!window.comfyAPI?.app?.app?.graph", 120, "the page after the reload")
    time.sleep(1.0)
    load_example(page, "casa_save_lora", scale=1.0, as_name=f"casa_failure_{uuid.uuid4().hex[:6]}")
    for t, w, v in [("CASALoadSourceBasis", "base_model", models["base"]), ("CASALoadSourceBasis", "storage", "float32"),
                    ("UNETLoader", "unet_name", models["distilled"]), ("CASATransferLoRA", "lora_name", bad)]:
        set_widget(page, t, w, v)
    page.eval("""(async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); return true; })()""")
    page.wait_for(f"""(() => {{ const s = {SHOWN}; return !!s.CASATransferLoRA && s.CASATransferLoRA.stale &&
        s.CASASaveLoRA && s.CASASaveLoRA.stale; }})()""", 120, "the failure on the transfer and save nodes")
    time.sleep(1.0)  # measure() settles the height over a few frames
    shown = page.eval(SHOWN)
    page.press("Escape", 27)  # the frontend's own error dialog
    page.screenshot(page.artifacts / "1d_failure_before_any_summary.png")
    for t in ("CASATransferLoRA", "CASASaveLoRA"):
        text = shown[t]["text"]
        assert "the last run failed in CASA Transfer LoRA:" in text and "NaN" in text, (t, text)
        assert "\n." not in text and not text.rstrip().endswith("\n"), (t, text)
        # "from an earlier run" only where the node shows one (frontend 1.35.9 may hand it an earlier output
        # of the same node id even on a fresh page, from the workflow it restores)
        assert ("earlier run" in text) == text.startswith("Out of date:"), (t, text)
        assert shown[t]["scroll"] <= shown[t]["client"] + 1, (t, shown[t])


# ---------------------------------------------------------------------------------------------------
# 2. help pages
# ---------------------------------------------------------------------------------------------------

def open_node_info(page, node_type: str) -> None:
    """Select the node and press its info button (the selection toolbox's "Node Info")."""
    page.eval(f"""(() => {{ const app = window.comfyAPI.app.app;
        const n = app.graph.nodes.find(n => n.type === {json.dumps(node_type)});
        const ds = app.canvas.ds; ds.scale = 1; ds.offset = [260 - n.pos[0], 260 - n.pos[1]];
        app.canvas.deselectAll?.(); app.canvas.selectNode(n); app.canvas.setDirty(true, true); return true; }})()""")
    # 1.49.6 labels it "Node Info"; 1.35.9 has the same button with only its (i) icon
    box = page.wait_for("""(() => { const b = [...document.querySelectorAll("button")].find(b => b.offsetParent &&
        (b.getAttribute("aria-label") === "Node Info" || b.querySelector("i[class*='lucide--info']")));
        if (!b) return null; const r = b.getBoundingClientRect(); return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()""",
                        15, "the node's info button")
    page.click(box["x"], box["y"])


def test_the_help_page_opens_for_every_node(server, page, models):
    if not page.eval(f"{json.dumps(list(CASA))}.every(t => window.comfyAPI.app.app.graph.nodes.some(n => n.type === t))"):
        load_example(page, "casa_save_lora")
        page.eval("""(() => { const app = window.comfyAPI.app.app, LG = window.LiteGraph;
            const hm = LG.createNode("CASARoutingHeatmap"); hm.pos = [1600, 0]; app.graph.add(hm); return true; })()""")
    for t in CASA:
        status, body = server.request("GET", f"/extensions/casa-lora/docs/{t}.md")
        assert status == 200 and (REPO / "web" / "docs" / f"{t}.md").read_bytes() == body, (t, status)
        open_node_info(page, t)
        title = DISPLAY[t]
        page.wait_for(f"""(() => {{ const hs = [...document.querySelectorAll("h1, h2")].filter(h => h.offsetParent)
            .map(h => h.textContent.trim()); return hs.includes({json.dumps(title)}) && hs.includes("What to connect")
            && hs.includes("Inputs"); }})()""", 20, f"the help page of {t}")
        page.screenshot(page.artifacts / f"2_help_{t}.png")


# ---------------------------------------------------------------------------------------------------
# 3. the template browser
# ---------------------------------------------------------------------------------------------------

CARDS = r"""(() => { const out = {};
  for (const h of document.querySelectorAll("h3")) {
    if (!h.offsetParent) continue;
    let card = h; for (let i = 0; i < 6 && card && !card.querySelector("img"); i++) card = card.parentElement;
    const img = card?.querySelector("img");
    let pooled = null;
    if (img && img.complete && img.naturalWidth) {  // what the card shows, 32 x 32 grey levels
      const c = document.createElement("canvas"); c.width = c.height = 32;
      const ctx = c.getContext("2d"); ctx.imageSmoothingQuality = "high"; ctx.drawImage(img, 0, 0, 32, 32);
      const d = ctx.getImageData(0, 0, 32, 32).data; pooled = [];
      for (let i = 0; i < d.length; i += 4) pooled.push((d[i] + d[i + 1] + d[i + 2]) / 3);
    }
    out[h.textContent.trim()] = { full: h.scrollWidth <= h.clientWidth + 1, tip: h.title || "",
      src: img?.src || "", loaded: !!(img && img.complete && img.naturalWidth), w: img?.naturalWidth || 0, pooled };
  }
  return out; })()"""


def click_text(page, text: str, tags: str = "button, span, a, li, div, p", within: str = "body") -> None:
    """A real click on the innermost visible element (of ``tags``, inside ``within``) whose text is ``text``."""
    box = f"""(() => {{ const norm = (s) => s.replace(/\\u00ad/g, "").trim();
        const root = [...document.querySelectorAll({json.dumps(within)})].filter(e => e.getClientRects().length).pop();
        if (!root) return null;
        const els = [...root.querySelectorAll({json.dumps(tags)})].filter(e => e.offsetParent && norm(e.textContent) === {json.dumps(text)});
        const e = els[els.length - 1]; if (!e) return null; const r = e.getBoundingClientRect();
        return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()"""
    where = None
    for _ in range(50):  # until it stops moving (dialogs open with an animation)
        now = page.wait_for(box, 20, f"{text!r} on the page")
        if now == where:
            break
        where = now
        time.sleep(0.15)
    page.click(where["x"], where["y"])


def test_the_template_browser_shows_titles_and_thumbnails_and_opens_an_example(server, page):
    page.press("Escape", 27)
    click_text(page, "Templates")
    click_text(page, "casa-lora", within="[role=dialog]")
    time.sleep(1.0)
    page.screenshot(page.artifacts / "3_template_browser_opened.png")
    titles = [wf_title(n) for n in WF_NAMES]
    cards = page.wait_for(f"""(() => {{ const c = {CARDS}; const want = {json.dumps(titles)};
        return want.every(t => c[t] && c[t].loaded) ? c : null; }})()""", 30, "the pack's cards with their thumbnails")
    page.screenshot(page.artifacts / "3_template_browser.png")
    import numpy as np
    import wf_thumbnails

    for name in WF_NAMES:
        title = wf_title(name)
        c = cards[title]
        assert c["full"], f"the title {title!r} is cut on its card"
        assert c["w"] == 512 and "default-template" not in c["src"], c["src"]
        # the card shows this workflow's thumbnail, the one with its title and description (and not another's)
        want = wf_thumbnails.render(name).astype(np.float64).mean(axis=2).reshape(32, 16, 32, 16).mean(axis=(1, 3))
        got = np.array(c["pooled"], dtype=np.float64).reshape(32, 32)
        diffs = {other: np.abs(got - wf_thumbnails.render(other).astype(np.float64).mean(axis=2)
                               .reshape(32, 16, 32, 16).mean(axis=(1, 3))).mean() for other in WF_NAMES}
        assert np.abs(got - want).mean() < 6.0 and min(diffs, key=diffs.get) == name, (title, diffs)
    # the picture on the card is the thumbnail that carries the description (tests/comfy/wf_thumbnails.py)
    status, jpg = server.request("GET", "/api/workflow_templates/casa-lora/"
                                 + urllib.parse.quote(wf_title("casa_wan22_two_experts")) + ".jpg")
    assert status == 200 and jpg == (REPO / "workflows" / f"{wf_title('casa_wan22_two_experts')}.jpg").read_bytes()
    assert WORKFLOWS["casa_wan22_two_experts"][1]
    # opening one loads it into the canvas
    click_text(page, wf_title("casa_wan22_two_experts"), "h3", within="[role=dialog]")
    wf = json.loads((REPO / "workflows" / f"{wf_title('casa_wan22_two_experts')}.json").read_text())
    page.wait_for(f"window.comfyAPI.app.app.graph.nodes.filter(n => n.type === 'CASATransferLoRA').length === 2 && "
                  f"window.comfyAPI.app.app.graph.nodes.length === {len(wf['nodes'])}", 30, "the Wan2.2 example")
    page.eval("""(() => { const ds = window.comfyAPI.app.app.canvas.ds; ds.scale = 0.6; ds.offset = [420, 60];
        window.comfyAPI.app.app.canvas.setDirty(true, true); return true; })()""")
    time.sleep(0.5)
    page.screenshot(page.artifacts / "3_wan22_example_opened.png")


# ---------------------------------------------------------------------------------------------------
# 4. titles not cut
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WF_NAMES)
def test_no_casa_node_title_is_cut_in_the_examples(page, name):
    load_example(page, name)
    cut = page.eval("""(() => { const LG = window.LiteGraph; const ctx = document.createElement("canvas").getContext("2d");
        ctx.font = `${LG.NODE_TEXT_SIZE}px ${LG.NODE_FONT}`; const out = [];
        for (const n of window.comfyAPI.app.app.graph.nodes) {
          if (!n.type.startsWith("CASA")) continue;
          // room for the title: the width less the collapse dot (a title height) and a margin
          const room = n.size[0] - LG.NODE_TITLE_HEIGHT - 10;
          const need = ctx.measureText(n.title).width;
          if (need > room) out.push([n.title, need, room]);
        }
        return out; })()""")
    assert not cut, f"{name}: titles cut at 100 %: {cut}"
