// casa-lora: what the pack's widgets share (imported by casa_summary.js and casa_heatmap.js).
//
// The nodes' widgets (the summary on every CASA node, the heatmap picture) show the output a node
// produced in its last run, and say when that output is out of date. The frontend keeps node outputs
// only while the page lives (a tab switch restores them, a reload does not), and tells a widget about
// an output only through onExecuted. This module keeps, per workflow and node:
//
//   { promptId, output, sig, struct, failed }
//
// * promptId / output: the last run that produced an output for the node (the "executed" message, kept for
//   the workflow the prompt was queued from even when another one is shown by then), or, after a reload,
//   the newest entry of GET /history for this workflow (its id, saved in the prompt's extra_pnginfo) that
//   holds an output for the node. Never the frontend's own kept outputs: it keeps them by node id alone;
// * sig: the node's inputs in that run: the API graph's node and every node upstream of it, as queued
//   (api.queuePrompt is wrapped to keep the graph; /history keeps it too);
// * struct: the same without node ids (what ComfyUI's cache keys on): a node served from ComfyUI's cache
//   gets no output message, so the output of the run that made the cached result is looked up by it;
// * failed: set when a later run that included the node ended in an error (or was cancelled) before
//   the node produced an output: the output shown is from before that run.
//
// staleness(node): "failed" (the last run failed), "inputs" (the graph upstream of the node differs
// from the run's: a widget changed or a link moved) or "" (up to date). The current graph comes from
// app.graphToPrompt(), recomputed at most once a second while a CASA widget is on screen.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const CASA_NODE_TYPES = ["CASALoadSourceBasis", "CASAComputeDrift", "CASATransferLoRA", "CASASaveLoRA",
  "CASARoutingHeatmap"];
const TYPES = new Set(CASA_NODE_TYPES);

const state = (window.__casaState = window.__casaState || {
  queued: new Map(),   // prompt id -> { graph (API), workflow key }
  results: new Map(),  // "<workflow key>|<node id>" -> { promptId, output, sig, failed }
  executedIn: new Map(), // prompt id -> Set of node ids that produced an output in it
  waiting: new Map(),  // prompt id -> handlers of messages that came before /prompt answered
  listeners: new Set(),  // (node, record) callbacks, one per widget kind
  current: null,       // { at, graph, key } the last graphToPrompt() of the shown workflow
  history: null,       // Promise of GET /history for the restore after a reload
  hooked: false,
});

export function workflowKey(graph = app.graph) {
  return String(graph?.id ?? graph?.extra?.casa_id ?? "");
}

function recordKey(node) {
  return `${workflowKey(node.graph ?? app.graph)}|${node.id}`;
}

// the node of that id in the workflow shown now, when the record of workflow `key` is one of its nodes'
function shownNode(key, id) {
  return key === workflowKey() ? nodeById(id) : null;
}

export function record(node) {
  return state.results.get(recordKey(node)) || null;
}

// the ids of a node and of every node upstream of it in an API graph
export function upstream(apiGraph, nodeId) {
  const seen = new Set();
  const visit = (id) => {
    id = String(id);
    if (seen.has(id) || !apiGraph?.[id]) return;
    seen.add(id);
    for (const v of Object.values(apiGraph[id].inputs || {})) {
      if (Array.isArray(v) && v.length === 2 && (typeof v[0] === "string" || typeof v[0] === "number")) visit(v[0]);
    }
  };
  visit(nodeId);
  return seen;
}

// the node and everything upstream of it in an API graph, in a canonical form
export function signature(apiGraph, nodeId) {
  if (!apiGraph) return null;
  const order = [...upstream(apiGraph, nodeId)];
  if (!order.length) return null;
  const canon = (x) => (Array.isArray(x) ? x.map(canon) : x && typeof x === "object"
    ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, canon(x[k])])) : x);
  return JSON.stringify(order.sort().map((id) => [id, apiGraph[id].class_type, canon(apiGraph[id].inputs || {})]));
}

const isLink = (v) => Array.isArray(v) && v.length === 2 && (typeof v[0] === "string" || typeof v[0] === "number");

// what a node computes, independent of node ids: its class and inputs, links replaced by what they come
// from (the same thing ComfyUI's cache keys on); equal for the "same" node in two workflows
export function structure(apiGraph, nodeId, memo = new Map()) {
  const id = String(nodeId);
  if (memo.has(id)) return memo.get(id);
  const n = apiGraph?.[id];
  if (!n) return null;
  memo.set(id, "cycle");
  const inputs = Object.keys(n.inputs || {}).sort().map((k) => {
    const v = n.inputs[k];
    return [k, isLink(v) ? ["<-", structure(apiGraph, v[0], memo), v[1]] : v];
  });
  const out = JSON.stringify([n.class_type, inputs]);
  memo.set(id, out);
  return out;
}

function notify(node) {
  const rec = record(node);
  for (const fn of state.listeners) {
    try { fn(node, rec); } catch (e) { console.error("casa-lora: widget update failed", e); }
  }
}

export function onRecord(fn) {
  state.listeners.add(fn);
}

function nodeById(id) {
  const g = app.graph;
  if (!g || id == null) return null;
  return g.getNodeById?.(id) ?? g.getNodeById?.(Number(id)) ?? null;
}

// --- live runs ----------------------------------------------------------------------------------
function hook() {
  if (state.hooked) return;
  state.hooked = true;
  const queue = api.queuePrompt.bind(api);
  api.queuePrompt = async function (number, data, ...rest) {
    const res = await queue(number, data, ...rest);
    if (res?.prompt_id && data?.output) {
      state.queued.set(res.prompt_id, { graph: data.output, key: workflowKey() });
      state.current = { at: Date.now(), graph: data.output, key: workflowKey() };
      const early = state.waiting.get(res.prompt_id) || [];
      state.waiting.delete(res.prompt_id);
      for (const fn of early) fn();
    }
    return res;
  };
  // the server may send a prompt's first messages before /prompt has answered with its id: those wait
  const withQueued = (promptId, fn) => {
    if (state.queued.has(promptId)) return fn(state.queued.get(promptId));
    if (!state.waiting.has(promptId)) state.waiting.set(promptId, []);
    state.waiting.get(promptId).push(() => fn(state.queued.get(promptId)));
    setTimeout(() => state.waiting.delete(promptId), 60000);
  };
  // an output belongs to the workflow its prompt was queued from, which may no longer be the one shown (another
  // workflow opened while the run went on): it is kept for that workflow and drawn only while it is shown
  api.addEventListener("executed", (e) => {
    const d = e.detail || {};
    const id = String(d.display_node ?? d.node ?? "");
    if (!d.output) return;
    const queued = state.queued.get(d.prompt_id);
    const key = queued ? queued.key : workflowKey();  // (not known yet: queued from the workflow shown)
    const type = queued ? queued.graph?.[id]?.class_type : (nodeById(id)?.comfyClass ?? nodeById(id)?.type);
    if (!TYPES.has(type)) return;
    if (!state.executedIn.has(d.prompt_id)) state.executedIn.set(d.prompt_id, new Set());
    state.executedIn.get(d.prompt_id).add(id);
    const rec = { promptId: d.prompt_id, output: d.output, sig: null, struct: null, failed: null };
    state.results.set(`${key}|${id}`, rec);
    const draw = () => { const node = shownNode(key, id); if (node) notify(node); };
    draw();
    withQueued(d.prompt_id, (q) => {
      Object.assign(rec, { sig: signature(q.graph, id), struct: structure(q.graph, id) });
      draw();
    });
  });
  // nodes ComfyUI serves from its cache get no new output message: show the output of the run that made
  // the cached result (this page's, else the newest such entry of /history), which has the same inputs
  api.addEventListener("execution_cached", (e) => withQueued(e.detail?.prompt_id, (q) => {
    const d = e.detail || {};
    if (!q) return;
    for (const id of (d.nodes || []).map(String)) {
      const type = q.graph?.[id]?.class_type;
      if (!TYPES.has(type)) continue;
      const k = `${q.key}|${id}`;
      const draw = () => { const node = shownNode(q.key, id); if (node) notify(node); };
      const struct = structure(q.graph, id);
      const sig = signature(q.graph, id);
      const rec = state.results.get(k);
      if (rec?.output && (rec.struct === struct || rec.sig === sig)) {
        Object.assign(rec, { promptId: d.prompt_id, sig, struct, failed: null });
        draw();
        continue;
      }
      const same = [...state.results.values()].reverse().find((r) => r.output && r.struct === struct);
      if (same) {
        state.results.set(k, { promptId: d.prompt_id, output: same.output, sig, struct, failed: null });
        draw();
        continue;
      }
      findInHistory(type, struct).then((output) => {
        if (!output || state.results.get(k)?.output) return;
        state.results.set(k, { promptId: d.prompt_id, output, sig, struct, failed: null });
        draw();
      });
    }
  }));
  const ended = (why) => (e) => withQueued(e.detail?.prompt_id, (q) => {
    const d = e.detail || {};
    if (!q) return;
    const done = state.executedIn.get(d.prompt_id) || new Set();
    const message = why === "error" ? failureText(d, q.graph) : "the last run was cancelled";
    const at = d.node_id != null ? String(d.node_id) : null;
    for (const id of Object.keys(q.graph)) {
      if (!TYPES.has(q.graph[id]?.class_type) || done.has(String(id))) continue;
      // the run stopped at `at`: the nodes there and downstream of it kept their earlier output
      if (at && !upstream(q.graph, id).has(at)) continue;
      const k = `${q.key}|${id}`;
      const rec = state.results.get(k);
      if (rec) rec.failed = { promptId: d.prompt_id, message };
      else state.results.set(k, { promptId: null, output: null, sig: null, failed: { promptId: d.prompt_id, message } });
      const node = shownNode(q.key, id);
      if (node) notify(node);
    }
  });
  api.addEventListener("execution_error", ended("error"));
  api.addEventListener("execution_interrupted", ended("interrupted"));
  setInterval(refreshCurrent, 1000);
}

// --- the graph as it is now ---------------------------------------------------------------------
let refreshing = false;
async function refreshCurrent() {
  if (refreshing || document.hidden || !app.graph) return;
  const nodes = (app.graph.nodes || []).filter((n) => TYPES.has(n.comfyClass ?? n.type) && record(n));
  if (!nodes.length) return;
  refreshing = true;
  try {
    const p = await app.graphToPrompt();
    state.current = { at: Date.now(), graph: p.output, key: workflowKey() };
    for (const n of nodes) notify(n);
  } catch (e) {
    // graphToPrompt fails while a graph is half loaded: try again on the next tick
  } finally {
    refreshing = false;
  }
}

export function staleness(node) {
  const rec = record(node);
  if (!rec) return "";
  if (rec.failed) return "failed";
  const cur = state.current;
  if (!rec.sig || !cur || cur.key !== workflowKey()) return "";
  const now = signature(cur.graph, node.id);
  return now && now !== rec.sig ? "inputs" : "";
}

export function staleText(node) {
  const why = staleness(node);
  const rec = record(node);
  if (why === "failed") {
    return rec.output ? `Out of date: ${rec.failed.message}. This is from an earlier run.` : `${rec.failed.message}.`;
  }
  if (why === "inputs") return "Out of date: inputs changed since this run. Run the workflow again to update.";
  return "";
}

// "the last run failed in <the node's title>: <the message>" (ComfyUI ends the message with a newline)
function failureText(err, apiGraph) {
  if (err?.exception_message == null) return "the last run was cancelled";  // execution_interrupted
  const id = err.node_id != null ? String(err.node_id) : null;
  // the title the node had when the prompt was queued (the workflow shown now may be another one)
  const shown = (id && apiGraph?.[id]?._meta?.title) || (id && nodeById(id)?.title) || err.node_type;
  const msg = String(err.exception_message ?? "").trim().replace(/\.$/, "");
  return `the last run failed${shown ? ` in ${shown}` : ""}${msg ? `: ${msg}` : ""}`;
}

// the newest output in /history of a node of this class that computed the same thing
async function findInHistory(classType, struct) {
  let hist = {};
  try {
    hist = await (await api.fetchApi("/history?max_items=200")).json();
  } catch (e) {
    return null;
  }
  let found = null;
  for (const entry of Object.values(hist || {})) {
    const apiGraph = entry?.prompt?.[2] || {};
    const memo = new Map();
    for (const [id, n] of Object.entries(apiGraph)) {
      if (n?.class_type === classType && entry.outputs?.[id] && structure(apiGraph, id, memo) === struct) {
        found = entry.outputs[id];
      }
    }
  }
  return found;
}

// --- after a reload: the stored output ------------------------------------------------------------
function fetchHistory() {
  if (!state.history) {
    state.history = api.fetchApi("/history?max_items=200").then((r) => r.json()).catch(() => ({}));
  }
  return state.history;
}

async function restoreFromHistory(node) {
  // the workflow and node asked about, fixed now: another workflow may be open by the time /history answers
  const key = workflowKey(node.graph ?? app.graph);
  if (!key) return;
  const nodeKey = `${key}|${node.id}`;
  const hist = await fetchHistory();
  let found = null;
  let failedAfter = null;
  let cachedRun = null;  // the newest run that served this node from ComfyUI's cache (no output of its own)
  for (const [promptId, entry] of Object.entries(hist || {})) {
    const prompt = entry?.prompt || [];
    const wf = prompt[3]?.extra_pnginfo?.workflow;
    if (!wf || String(wf.id ?? "") !== key) continue;
    const apiGraph = prompt[2] || {};
    if (!apiGraph[String(node.id)] || apiGraph[String(node.id)].class_type !== (node.comfyClass ?? node.type)) continue;
    const out = entry.outputs?.[String(node.id)];
    if (out) {
      found = { promptId, output: out, sig: signature(apiGraph, node.id), struct: structure(apiGraph, node.id),
                failed: null };
      failedAfter = null;
      cachedRun = null;
    } else {
      const msgs = entry.status?.messages || [];
      const err = msgs.find(([k]) => k === "execution_error" || k === "execution_interrupted")?.[1];
      if (err && (err.node_id == null || upstream(apiGraph, node.id).has(String(err.node_id)))) {
        failedAfter = { promptId, message: failureText(err, apiGraph) };
      } else if (entry.status?.status_str === "success") {
        cachedRun = { promptId, sig: signature(apiGraph, node.id), struct: structure(apiGraph, node.id) };
        failedAfter = null;
      }
    }
  }
  if (cachedRun) {  // its output is that of the run that computed the same thing, in any workflow
    const output = found && found.struct === cachedRun.struct ? found.output
      : await findInHistory(node.comfyClass ?? node.type, cachedRun.struct);
    if (output) found = { ...cachedRun, output, failed: null };
  }
  if (!found || state.results.has(nodeKey)) return;
  found.failed = failedAfter;
  state.results.set(nodeKey, found);
  const shown = shownNode(key, node.id);
  if (shown) notify(shown);
}

// the record of a node just created or loaded: what this page saw (a tab switch, a workflow opened again), else
// /history (a reload). Not the frontend's own kept outputs (app.nodeOutputs): they are kept by node id alone,
// so a workflow opened after another can be handed the other's outputs
export function restore(node) {
  hook();
  if (record(node)) { notify(node); return; }
  restoreFromHistory(node);
}

export function restoreAll() {
  for (const n of app.graph?.nodes || []) {
    if (TYPES.has(n.comfyClass ?? n.type)) restore(n);
  }
}

// Widget values set from code (not by the user's own input in a frontend widget) reach the workflow's
// saved state, its undo history and a tab switch only when the change tracker is told, as the frontend's
// own widgets do after a programmatic change.
export function noteGraphChange() {
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  try {
    if (tracker?.captureCanvasState) tracker.captureCanvasState();
    else tracker?.checkState?.();  // frontends before captureCanvasState
  } catch (e) {
    console.warn("casa-lora: the workflow's change tracker refused the change", e);
  }
}

// a minimum width that shows the node's whole title
export function fitTitle(node, extra = 64) {
  try {
    const LG = window.LiteGraph;
    const ctx = fitTitle.ctx || (fitTitle.ctx = document.createElement("canvas").getContext("2d"));
    ctx.font = `${LG?.NODE_TEXT_SIZE ?? 14}px ${LG?.NODE_FONT ?? "Arial"}`;
    const want = Math.ceil(ctx.measureText(node.title || "").width) + extra;
    if (node.size[0] < want) node.setSize([want, node.size[1]]);
  } catch (e) {
    // no canvas: keep the size
  }
}

export { app, api };

hook();
