// casa-lora: the CASA Routing Heatmap node's widget (ComfyUI frontend extension).
//
// Adds to CASARoutingHeatmap a layer picker (block, projection) fed by the report the node last
// ran on, a layer/overview switch, and the picture itself with a read-out of the cell under the
// cursor (all the values of that cluster block, or of that layer in the overview; clicking a layer
// in the overview opens it).
//
// Picking a layer writes its name into the node's `layer` widget (and `view`), then queues ONLY
// this node (ComfyUI's partial execution, `app.queuePrompt(0, 1, [nodeId])`, the same request as
// "Queue selected output nodes"): the transfer upstream is served from ComfyUI's cache, so only
// the picture is redrawn, and seeds set to "randomize" elsewhere in the graph are not advanced.
// The node's Python side (nodes/heatmap_node.py) sends what this needs in its ui output under
// `casa_heatmap`: the layer list, the layer shown, the picture's geometry and cell values and the
// node's summary (the layer's verdict), shown under the picture when the cursor is not on a cell.
//
// The picture and the picks come back after a tab switch and after a reload (the stored output, see
// casa_common.js), and a picture older than the node's current inputs, or from before a run that
// failed, is greyed with an "out of date" banner.
//
// Size: the pictures are drawn with no text under 12 px (casa_core/pictures/), about 920 x 980 px for
// a layer; at the node's default size (DEFAULT_SIZE) the widget shows them at >= 0.83x, so no text is
// under 10 px on screen (tests/comfy/test_web_heatmap.py measures it in the real frontend).
import { app, api, fitTitle, noteGraphChange, onRecord, record, restore, restoreAll, staleText } from "./casa_common.js";

const NODE_TYPE = "CASARoutingHeatmap";
const UI_KEY = "casa_heatmap";
const MIN_W = 520;
const MIN_H = 420;
const DEFAULT_SIZE = [860, 1080];

const CSS = `
.casa-hm { display: flex; flex-direction: column; width: 100%; height: 100%; gap: 4px;
  font: 12px/1.3 sans-serif; color: var(--input-text, #ddd); box-sizing: border-box; }
.casa-hm-bar { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; }
.casa-hm-bar select, .casa-hm-bar button { background: var(--comfy-input-bg, #222);
  color: var(--input-text, #ddd); border: 1px solid var(--border-color, #555); border-radius: 4px;
  padding: 1px 4px; font: inherit; max-width: 14em; }
.casa-hm-bar button { cursor: pointer; }
.casa-hm-bar button.casa-active { border-color: var(--p-primary-color, #8ab4f8); }
.casa-hm-status { opacity: 0.75; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; min-width: 6em; }
.casa-hm-view { position: relative; flex: 1; min-height: 120px; background: #fff; border-radius: 4px; overflow: hidden; }
.casa-hm-view canvas { position: absolute; inset: 0; width: 100%; height: 100%; cursor: crosshair; }
.casa-hm-empty { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
  color: #666; text-align: center; padding: 8px; }
.casa-hm-readout { min-height: 2.7em; white-space: normal; word-break: break-word; opacity: 0.95; }
.casa-hm-readout b { color: var(--p-primary-color, #8ab4f8); font-weight: 600; }
.casa-hm-stale { position: absolute; left: 0; right: 0; top: 0; padding: 4px 8px; background: rgba(60, 40, 0, 0.85);
  color: #ffd28a; font-weight: 600; display: none; z-index: 2; }
.casa-hm.casa-is-stale canvas { opacity: 0.45; filter: grayscale(0.7); }
.casa-hm.casa-is-stale .casa-hm-stale { display: block; }
`;

function injectCss() {
  if (document.getElementById("casa-hm-css")) return;
  const style = document.createElement("style");
  style.id = "casa-hm-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

// the same formatting as casa_core.pictures.fmt_share
const pct = (x) => {
  if (x == null || !isFinite(x)) return "n/a";
  const p = 100 * x;
  if (p === 0) return "0%";
  if (Math.abs(p) < 0.005) return "<0.01%";
  if (p >= 99.995 && p < 100) return ">99.99%";
  return (Math.abs(p) < 10 || (p > 99.9 && p < 100) ? p.toFixed(2) : p.toFixed(1)) + "%";
};
const sci = (x) => (x == null || !isFinite(x) ? "n/a" : x === 0 ? "0" : x.toExponential(2));
const signed = (x) => (x == null || !isFinite(x) ? "n/a (no energy)" : (x >= 0 ? "+" : "") + x.toFixed(3));

// index of the [start, end) interval containing v, or -1
function findCell(edges, v) {
  let lo = 0, hi = edges.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const [a, b] = edges[mid];
    if (v < a) hi = mid - 1;
    else if (v >= b) lo = mid + 1;
    else return mid;
  }
  return -1;
}

function groupText(g) {
  if (!g) return "?";
  if (g.label === ">k") return `>k (${g.n} directions beyond the leading subspace)`;
  const cl = g.clusters[0] === g.clusters[1] ? `cluster ${g.clusters[0]}` : `clusters ${g.clusters[0]}\u2013${g.clusters[1]}`;
  const dom = g.dominant >= 1 ? ", dominant" : g.dominant > 0 ? `, ${pct(g.dominant)} dominant` : "";
  return `${g.label} (${cl}, ${g.n} dir.${dom})`;
}

class HeatmapWidget {
  constructor(node) {
    this.node = node;
    this.payload = null;
    this.image = null;
    this.imageUrl = null;
    this.hover = null;
    this.pending = null;
    this.transform = null;
    injectCss();

    const root = (this.root = el("div", "casa-hm"));
    const bar = el("div", "casa-hm-bar");
    this.blockSel = el("select", "casa-hm-block");
    this.blockSel.title = "block";
    this.projSel = el("select", "casa-hm-proj");
    this.projSel.title = "projection";
    this.prevBtn = el("button", "casa-hm-prev", "\u25c0");
    this.prevBtn.title = "previous layer";
    this.nextBtn = el("button", "casa-hm-next", "\u25b6");
    this.nextBtn.title = "next layer";
    this.layerBtn = el("button", "casa-hm-layerview", "layer");
    this.overviewBtn = el("button", "casa-hm-overview", "overview");
    this.status = el("span", "casa-hm-status", "run the graph to see the routing maps");
    bar.append(this.blockSel, this.projSel, this.prevBtn, this.nextBtn, this.layerBtn, this.overviewBtn, this.status);
    const view = (this.view = el("div", "casa-hm-view"));
    this.canvas = el("canvas");
    this.empty = el("div", "casa-hm-empty", "No picture yet: queue the workflow (the CASA transfer must run once).");
    this.staleBanner = el("div", "casa-hm-stale", "");
    view.append(this.canvas, this.empty, this.staleBanner);
    this.readout = el("div", "casa-hm-readout", "");
    root.append(bar, view, this.readout);

    for (const e of ["pointerdown", "wheel", "contextmenu"]) {
      // keep clicks on the controls from dragging or zooming the graph
      bar.addEventListener(e, (ev) => ev.stopPropagation());
    }
    this.blockSel.addEventListener("change", () => this.onBlockChange());
    this.projSel.addEventListener("change", () => this.onProjChange());
    this.prevBtn.addEventListener("click", () => this.step(-1));
    this.nextBtn.addEventListener("click", () => this.step(+1));
    this.layerBtn.addEventListener("click", () => this.choose(this.currentName(), "layer"));
    this.overviewBtn.addEventListener("click", () => this.choose(this.currentName(), "overview"));
    this.canvas.addEventListener("mousemove", (ev) => this.onMove(ev));
    this.canvas.addEventListener("mouseleave", () => { this.hover = null; this.draw(); this.showReadout(null); });
    this.canvas.addEventListener("click", (ev) => this.onClick(ev));
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.draw());
      this.resizeObserver.observe(view);
    }
    this.setControlsEnabled(false);
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  setControlsEnabled(on) {
    for (const c of [this.blockSel, this.projSel, this.prevBtn, this.nextBtn, this.layerBtn, this.overviewBtn]) c.disabled = !on;
  }

  // --- layers ---------------------------------------------------------------------------------
  routingLayers() {
    return (this.payload?.layers || []).filter((l) => l.routing);
  }

  currentName() {
    const layers = this.routingLayers();
    const b = this.blockSel.value;
    const p = this.projSel.value;
    const hit = layers.find((l) => String(l.block ?? "other") === b && l.projection === p);
    return hit ? hit.name : this.payload?.layer;
  }

  fillSelect(sel, values, labels, value) {
    sel.replaceChildren(...values.map((v, i) => {
      const o = el("option", null, labels[i]);
      o.value = v;
      return o;
    }));
    if (values.includes(value)) sel.value = value;
  }

  fillPicker(name) {
    const layers = this.routingLayers();
    const blocks = [...new Set(layers.map((l) => String(l.block ?? "other")))];
    const cur = layers.find((l) => l.name === name) || layers[0];
    const block = cur ? String(cur.block ?? "other") : blocks[0];
    this.fillSelect(this.blockSel, blocks, blocks.map((b) => (b === "other" ? "other layers" : `block ${b}`)), block);
    this.fillProjections(cur?.projection);
  }

  fillProjections(want) {
    const b = this.blockSel.value;
    const projs = this.routingLayers().filter((l) => String(l.block ?? "other") === b).map((l) => l.projection);
    this.fillSelect(this.projSel, projs, projs, projs.includes(want) ? want : projs[0]);
  }

  onBlockChange() {
    this.fillProjections(this.projSel.value);
    this.choose(this.currentName(), "layer");
  }

  onProjChange() {
    this.choose(this.currentName(), "layer");
  }

  step(d) {
    const layers = this.routingLayers();
    if (!layers.length) return;
    const i = layers.findIndex((l) => l.name === this.currentName());
    const next = layers[(i + d + layers.length) % layers.length];
    this.fillPicker(next.name);
    this.choose(next.name, "layer");
  }

  // Set the node's widgets and re-run only this node (the transfer comes from the cache).
  async choose(name, view) {
    if (!name) return;
    const lw = this.widget("layer");
    const vw = this.widget("view");
    if (lw) { lw.value = name; lw.callback?.(name); }
    if (vw && view) { vw.value = view; vw.callback?.(view); }
    this.pending = { name, view };
    this.status.textContent = `rendering ${view === "overview" ? "the overview" : name}\u2026`;
    this.node.setDirtyCanvas?.(true, true);
    noteGraphChange();  // the picks are part of the workflow: a tab switch or a save keeps them
    try {
      await app.queuePrompt(0, 1, [String(this.node.id)]);
    } catch (e) {
      console.error("casa-lora: queueing the heatmap failed", e);
      this.status.textContent = `could not queue: ${e?.message || e}`;
    }
  }

  // --- results --------------------------------------------------------------------------------
  syncId() {
    this.root.dataset.nodeId = String(this.node.id);
  }

  // out of date: the inputs changed since the picture was made, or a later run failed
  setStale(text) {
    this.root.classList.toggle("casa-is-stale", !!text);
    this.staleBanner.textContent = text || "";
    this.root.dataset.stale = text ? "1" : "";
    if (text && !this.pending) this.status.textContent = text;
  }

  update(message) {
    this.syncId();
    const payload = message?.[UI_KEY]?.[0];
    const img = message?.images?.[0];
    if (!payload || !img) return;
    const same = this.payload && this.imageUrl && this.shownImage === `${img.filename}|${img.subfolder}|${img.type}`;
    if (same && !this.pending) return;
    this.shownImage = `${img.filename}|${img.subfolder}|${img.type}`;
    this.payload = payload;
    this.pending = null;
    this.hover = null;
    const params = new URLSearchParams({ filename: img.filename, type: img.type || "temp", subfolder: img.subfolder || "" });
    const url = api.apiURL(`/view?${params.toString()}`);
    this.imageUrl = url;
    const image = new Image();
    image.onload = () => {
      if (this.imageUrl !== url) return;
      this.image = image;
      this.empty.style.display = "none";
      this.draw();
      this.root.dataset.imageUrl = url;
      this.root.dataset.layer = payload.layer || "";
      this.root.dataset.view = payload.view || "";
      this.root.dispatchEvent(new CustomEvent("casa-heatmap-updated", { detail: { url, layer: payload.layer, view: payload.view } }));
    };
    image.src = url;
    this.fillPicker(payload.layer);
    this.setControlsEnabled(this.routingLayers().length > 0);
    this.layerBtn.classList.toggle("casa-active", payload.view !== "overview");
    this.overviewBtn.classList.toggle("casa-active", payload.view === "overview");
    const fig = payload.figure || {};
    this.status.textContent = payload.view === "overview"
      ? `overview of ${payload.layers?.length ?? 0} layers${payload.method ? ` \u00b7 ${payload.method}` : ""}`
      : `${payload.layer} \u00b7 k ${fig.k} \u00b7 ${fig.clusters} clusters`;
    this.showReadout(null);
  }

  // --- drawing --------------------------------------------------------------------------------
  draw() {
    const c = this.canvas;
    const rect = this.view.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(rect.width * dpr));
    const h = Math.max(1, Math.round(rect.height * dpr));
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    const img = this.image;
    if (!img) { this.transform = null; return; }
    const s = Math.min(w / img.naturalWidth, h / img.naturalHeight);
    const ox = (w - img.naturalWidth * s) / 2;
    const oy = (h - img.naturalHeight * s) / 2;
    this.transform = { s: s / dpr, ox: ox / dpr, oy: oy / dpr };
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, ox, oy, img.naturalWidth * s, img.naturalHeight * s);
    const hv = this.hover;
    if (hv) {
      // outline the hovered cell in every panel (they share rows and columns)
      ctx.lineWidth = Math.max(1.5, 2 * dpr);
      const fig = this.payload.figure;
      fig.panels.forEach((p, i) => {
        const [x0, x1] = p.x[hv.col];
        const [y0, y1] = p.y[hv.row];
        ctx.strokeStyle = i === hv.panel ? "#000" : "rgba(0,0,0,0.5)";
        ctx.strokeRect(ox + x0 * s - 1, oy + y0 * s - 1, (x1 - x0) * s + 2, (y1 - y0) * s + 2);
      });
    }
  }

  // client (CSS px relative to the canvas) -> picture pixel
  toImage(ev) {
    const t = this.transform;
    if (!t) return null;
    const r = this.canvas.getBoundingClientRect();
    return { x: (ev.clientX - r.left - t.ox) / t.s, y: (ev.clientY - r.top - t.oy) / t.s };
  }

  // picture pixel -> client coordinates (used by tests and for positioning)
  toClient(x, y) {
    const t = this.transform;
    const r = this.canvas.getBoundingClientRect();
    return { x: r.left + t.ox + x * t.s, y: r.top + t.oy + y * t.s };
  }

  hitTest(pt) {
    const fig = this.payload?.figure;
    if (!fig || !pt) return null;
    for (let i = 0; i < fig.panels.length; i++) {
      const p = fig.panels[i];
      if (pt.x < p.x0 || pt.y < p.y0 || pt.x >= p.x0 + p.w || pt.y >= p.y0 + p.h) continue;
      const col = findCell(p.x, pt.x);
      const row = findCell(p.y, pt.y);
      if (row >= 0 && col >= 0) return { panel: i, row, col };
    }
    return null;
  }

  onMove(ev) {
    const hit = this.hitTest(this.toImage(ev));
    const same = hit && this.hover && hit.panel === this.hover.panel && hit.row === this.hover.row && hit.col === this.hover.col;
    if (same) return;
    this.hover = hit;
    this.draw();
    this.showReadout(hit);
    this.canvas.style.cursor = hit && this.payload?.figure?.kind === "overview" && this.cellName(hit) ? "pointer" : "crosshair";
  }

  cellName(hit) {
    return this.payload?.figure?.names?.[hit.row]?.[hit.col] ?? null;
  }

  onClick(ev) {
    const fig = this.payload?.figure;
    if (!fig || fig.kind !== "overview") return;
    const hit = this.hitTest(this.toImage(ev));
    const name = hit && this.cellName(hit);
    if (name && this.routingLayers().some((l) => l.name === name)) {
      this.fillPicker(name);
      this.choose(name, "layer");
    }
  }

  readoutText(hit) {
    const fig = this.payload?.figure;
    if (!fig || !hit) return null;
    const v = fig.values;
    const r = hit.row, c = hit.col;
    const pid = fig.panels[hit.panel].id;
    const em = (id, text) => (id === pid ? `<b>${text}</b>` : text);
    if (fig.kind === "overview") {
      const name = this.cellName(hit);
      if (!name) return `block ${fig.rows[r].label} \u00b7 ${fig.cols[c].label}: not in this transfer`;
      const verdict = fig.verdicts?.[r]?.[c];
      return `${name}: ` + [
        em("dominant", `protected ${pct(v.dominant[r][c])}`),
        em("arbitrated", `arbitrated ${pct(v.arbitrated[r][c])}`),
        em("kept", `kept by the patch ${pct(v.kept[r][c])}`),
      ].join(" \u00b7 ") + (this.routingLayers().some((l) => l.name === name) ? " \u2014 click to open" : "")
        + (verdict ? `<br>${verdict}` : "");
    }
    const head = `output ${groupText(fig.rows[r])} \u2190 input ${groupText(fig.cols[c])}`;
    const cos = v.cos[r][c];
    const dir = cos == null ? "" : cos > 0.2 ? " (same way)" : cos < -0.2 ? " (opposite)" : " (unrelated)";
    const vals = [
      em("drift", `distillation change ${sci(v.drift_rms[r][c])}`),
      em("lora", `LoRA change ${sci(v.lora_rms[r][c])}`),
      em("alignment", `direction ${signed(cos)}${dir}`),
      em("regions", `restored ${pct(v.restored[r][c])} \u00b7 preserved ${pct(v.preserved[r][c])} \u00b7 arbitrated ${pct(v.arbitrated[r][c])}`),
      `${v.entries[r][c].toLocaleString()} entries`,
    ];
    return `${head}<br>${vals.join(" \u00b7 ")}`;
  }

  showReadout(hit) {
    const html = this.readoutText(hit);
    if (html) {
      this.readout.innerHTML = html;
      return;
    }
    const summary = this.payload?.summary || "";
    this.readout.textContent = !this.payload
      ? ""
      : this.payload.figure?.kind === "overview"
        ? `${summary} \u00b7 hover a layer for its verdict; click one to open it`
        : `${summary} (hover a cell for its values)`;
    this.readout.dataset.summary = summary;
  }
}

app.registerExtension({
  name: "casa-lora.RoutingHeatmap",

  // the stored output of a loaded graph (tab switch, reload, a workflow opened)
  async loadedGraphNode(node) {
    if ((node?.comfyClass ?? node?.type) === NODE_TYPE) setTimeout(() => restore(node), 0);
  },

  onNodeOutputsUpdated() {
    setTimeout(restoreAll, 0);
  },

  async setup() {
    onRecord((node, rec) => {
      const hm = node.casaHeatmap;
      if (!hm) return;
      if (rec?.output) hm.update(rec.output);
      hm.setStale(staleText(node));
      node.imgs = undefined;
    });
    setTimeout(restoreAll, 0);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const hm = new HeatmapWidget(this);
      this.casaHeatmap = hm;
      const widget = this.addDOMWidget("casa_heatmap", "casa-heatmap", hm.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => MIN_H - 80,
      });
      widget.serialize = false;
      widget.computeLayoutSize = () => ({ minHeight: MIN_H - 80, minWidth: MIN_W - 40 });
      // the widget shows the picture: skip the frontend's own image preview under it
      this.onDrawBackground = function () {};
      const [w, h] = this.size;
      this.setSize([Math.max(w, DEFAULT_SIZE[0]), Math.max(h, DEFAULT_SIZE[1])]);
      fitTitle(this);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      // this workflow's record, not the message (see casa_summary.js)
      const rec = record(this);
      if (rec?.output) this.casaHeatmap?.update(rec.output);
      this.casaHeatmap?.setStale(staleText(this));
      this.imgs = undefined; // keep the default preview away
      return r;
    };

    // the node's id is only known once it is in a graph
    for (const hook of ["onAdded", "onConfigure"]) {
      const orig = nodeType.prototype[hook];
      nodeType.prototype[hook] = function () {
        const r = orig?.apply(this, arguments);
        this.casaHeatmap?.syncId();
        return r;
      };
    }

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.casaHeatmap?.resizeObserver?.disconnect();
      return onRemoved?.apply(this, arguments);
    };
  },
});
