// casa-lora: each CASA node shows its summary on itself (ComfyUI frontend extension).
//
// The nodes return their summary in the ui output (`text`, and `casa_summary`: {summary, warnings});
// the frontend draws text only for its own PreviewAny node, so this extension adds a read-only text
// area to CASA Load Source Basis, Compute Drift, Transfer LoRA and Save LoRA, filled after each run
// (onExecuted), after a tab switch and after a reload (from /history, casa_common.js), and marked
// "out of date" when the node's inputs changed since, or when a later run failed before reaching it.
// The heatmap node shows its summary in its own widget (casa_heatmap.js).
import { CASA_NODE_TYPES, fitTitle, onRecord, record, restore, restoreAll, staleText, app } from "./casa_common.js";

const TYPES = new Set(CASA_NODE_TYPES.filter((t) => t !== "CASARoutingHeatmap"));
const WIDGET = "casa_summary";
const LINE_PX = 16;
const MAX_PX = 640;
const MAX_LINES = 38;

const CSS = `
.casa-summary { box-sizing: border-box; width: 100%; height: 100%; overflow: auto; padding: 4px 6px;
  font: 12px/16px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border-radius: 4px; white-space: pre-wrap; word-break: break-word; user-select: text; }
.casa-summary.casa-empty { opacity: 0.55; font-style: italic; }
.casa-summary .casa-warn { color: #f0b45a; }
.casa-summary .casa-stale { color: #f0b45a; font-weight: 600; }
.casa-summary.casa-is-stale .casa-body { opacity: 0.55; }
`;

function injectCss() {
  if (document.getElementById("casa-summary-css")) return;
  const s = document.createElement("style");
  s.id = "casa-summary-css";
  s.textContent = CSS;
  document.head.appendChild(s);
}

function textOf(output) {
  const s = output?.casa_summary?.[0];
  if (s) return { summary: s.summary || "", warnings: s.warnings || [] };
  const t = output?.text;
  if (t == null) return null;
  return { summary: Array.isArray(t) ? t.join("\n") : String(t), warnings: [] };
}

class SummaryView {
  constructor(node) {
    injectCss();
    this.node = node;
    this.root = document.createElement("div");
    this.root.className = "casa-summary casa-empty";
    this.root.textContent = "The summary of this node appears here after a run.";
    this.lines = 1;
    for (const ev of ["pointerdown", "wheel"]) this.root.addEventListener(ev, (e) => e.stopPropagation());
  }

  show(output) {
    const t = textOf(output);
    const stale = staleText(this.node);
    const key = JSON.stringify([t, stale, Math.round(this.node.size[0] / 40)]);
    if (key === this.shown) return;
    this.shown = key;
    this.root.replaceChildren();
    // a first guess from the characters per line; measure() corrects it once the text is laid out
    const chars = Math.max(20, Math.floor((this.node.size[0] - 40) / 6.2));
    const wrap = (s) => s.split("\n").reduce((n, ln) => n + Math.max(1, Math.ceil(ln.length / chars)), 0);
    if (!t && !stale) {
      this.root.className = "casa-summary casa-empty";
      this.root.textContent = "The summary of this node appears here after a run.";
      this.lines = 1;
    } else if (!t) {  // a failure before any output: the whole reason, measured like a summary
      this.root.className = "casa-summary";
      const s = document.createElement("div");
      s.className = "casa-stale";
      s.textContent = stale;
      this.root.appendChild(s);
      this.lines = wrap(stale);
    } else {
      this.root.className = "casa-summary" + (stale ? " casa-is-stale" : "");
      if (stale) {
        const s = document.createElement("div");
        s.className = "casa-stale";
        s.textContent = stale;
        this.root.appendChild(s);
      }
      const body = document.createElement("div");
      body.className = "casa-body";
      body.textContent = t.summary;
      this.root.appendChild(body);
      for (const w of t.warnings) {
        const d = document.createElement("div");
        d.className = "casa-warn";
        d.textContent = `\u26a0 ${w}`;
        this.root.appendChild(d);
      }
      this.lines = wrap(t.summary) + t.warnings.reduce((n, w) => n + wrap(`! ${w}`), 0) + (stale ? wrap(stale) : 0);
    }
    this.root.dataset.stale = stale ? "1" : "";
    this.root.dataset.promptId = record(this.node)?.promptId || "";
    this.measured = null;
    this.tries = 0;
    this.fit();
    requestAnimationFrame(() => this.measure());
  }

  // the height the text really takes at the node's width
  measure() {
    const el = this.root;
    if (!el.isConnected || !el.clientWidth) return;
    // the text, the area's padding (8) and what the frontend keeps around a DOM widget
    const around = Math.min(30, Math.max(0, this.height() - el.clientHeight)); // layout px (not zoomed)
    let h = 10 + around;
    for (const c of el.childNodes) {
      h += c.nodeType === 1 ? c.getBoundingClientRect().height / (this.scale() || 1) : 0;
    }
    if (!el.children.length) h = LINE_PX + 10 + around;
    h = Math.ceil(Math.min(h, MAX_PX));
    if (Math.abs(h - this.height()) > 2) {
      this.measured = h;
      this.fit();
      if ((this.tries = (this.tries || 0) + 1) < 4) requestAnimationFrame(() => requestAnimationFrame(() => this.measure()));
    }
  }

  scale() {
    return app.canvas?.ds?.scale || 1;
  }

  height() {
    return this.measured ?? Math.min(Math.min(this.lines, MAX_LINES) * LINE_PX + 10, MAX_PX);
  }

  fit() {
    const node = this.node;
    const want = node.computeSize?.([node.size[0], node.size[1]]);
    if (want) node.setSize([Math.max(node.size[0], want[0]), want[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

app.registerExtension({
  name: "casa-lora.NodeSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TYPES.has(nodeData?.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const view = new SummaryView(this);
      this.casaSummary = view;
      const widget = this.addDOMWidget(WIDGET, "casa-summary", view.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => view.height(),
        getMaxHeight: () => view.height(),
      });
      widget.serialize = false;
      widget.computeLayoutSize = () => ({ minHeight: view.height(), maxHeight: view.height(), minWidth: 220 });
      fitTitle(this);
      if (this.size[0] < 300) this.setSize([300, this.size[1]]);
      view.fit();
      requestAnimationFrame(() => view.measure());
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      // what this workflow's record holds (casa_common.js), not the message: the frontend hands a message to
      // the node of that id in the workflow shown, which may not be the workflow the run was queued from
      this.casaSummary?.show(record(this)?.output);
      return r;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      fitTitle(this);
      return r;
    };
  },

  // a loaded graph (a tab switch, a reload, a workflow opened): fill the summaries once the frontend
  // has restored its node outputs
  async loadedGraphNode(node) {
    if (TYPES.has(node?.comfyClass ?? node?.type)) setTimeout(() => restore(node), 0);
  },

  onNodeOutputsUpdated() {
    setTimeout(restoreAll, 0);
  },

  async setup() {
    onRecord((node, rec) => {
      if (node.casaSummary) node.casaSummary.show(rec?.output);
    });
    setTimeout(restoreAll, 0);
  },
});
