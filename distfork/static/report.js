"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const T = D.tasks;
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function svg(id, w, h) { const s = el("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`});
  document.getElementById(id).appendChild(s); return s; }
function fmtS(s) { if (s === null || s === undefined) return "-"; const a = Math.abs(s);
  return a >= 1 ? s.toFixed(3) + " s" : a >= 1e-3 ? (s * 1e3).toFixed(2) + " ms" : (s * 1e6).toFixed(0) + " us"; }
function fmtB(b) { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; } return (i ? b.toFixed(1) : b) + " " + u[i]; }
function hue(name) { let h = 0; for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360; return h; }
function color(t) { return t.status === "ok" ? `hsl(${hue(t.func)},55%,55%)` : "#d33"; }
const tip = document.getElementById("tip");
function hover(node, text) {
  node.addEventListener("mousemove", ev => { tip.style.display = "block"; tip.textContent = text;
    tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px"; });
  node.addEventListener("mouseleave", () => { tip.style.display = "none"; });
}
function describe(t) {
  return `%${t.id} ${t.func}  [${t.status}]\nworker ${t.worker || "?"} ${t.host ? "(" + t.host + ", pid " + t.pid + ")" : ""}` +
    `\nforked +${fmtS(t.submitted)}, started +${fmtS(t.started)}, ran ${fmtS(t.run_s)}` +
    (t.parent ? `\nforked by %${t.parent}` : "") + (t.deps.length ? `\ntook ${t.deps.map(d => "%" + d).join(", ")}` : "") +
    (t.bytes_in || t.bytes_out ? `\nin ${fmtB(t.bytes_in)} ${t.path_in}, out ${fmtB(t.bytes_out)} ${t.path_out}` : "") +
    (t.retries ? `\nretries ${t.retries}` : "") + (t.where ? `\n${t.where}` : "");
}
// nice ticks: about n labels over [0, max], never closer than the text needs
function ticks(max, n) { if (!(max > 0)) return [0]; const raw = max / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * p).find(s => s >= raw); const out = [];
  for (let v = 0; v <= max + 1e-12; v += step) out.push(v); return out; }

const ran = T.filter(t => t.started !== null && t.finished !== null);
const end = Math.max(1e-6, ...T.map(t => Math.max(t.done || 0, t.finished || 0, t.submitted)));
const workers = [...new Set(ran.map(t => t.worker || "?"))].sort();
const failed = T.filter(t => t.status !== "ok" && t.status !== "pending");
document.getElementById("title").textContent = D.title;
document.getElementById("summary").innerHTML =
  `<span><b>${T.length}</b> tasks</span><span><b>${workers.length}</b> worker slots</span>` +
  `<span><b>${fmtS(end)}</b> from first fork to last result</span>` +
  `<span><b>${failed.length}</b> failed</span>` + (D.dropped ? `<span>${D.dropped} early forks dropped (ring)</span>` : "");

// -- task stream -------------------------------------------------------------------------------------
(function () {
  const W = 1100, left = 170, rowH = 22, top = 24, rows = ["driver", ...workers];
  const s = svg("stream", W, top + rows.length * rowH + 24);
  const x = v => left + (W - left - 10) * v / end;
  for (const v of ticks(end, 8)) { el("line", {x1: x(v), x2: x(v), y1: top - 4, y2: top + rows.length * rowH, stroke: "#eee"}, s);
    el("text", {x: x(v), y: top - 8, "text-anchor": "middle"}, s, fmtS(v)); }
  rows.forEach((name, i) => {
    const g = el("g", {class: "track", "data-worker": name}, s);
    el("text", {x: 6, y: top + i * rowH + 15}, g, name.length > 26 ? "\u2026" + name.slice(-25) : name);
    el("line", {x1: left, x2: W - 10, y1: top + (i + 1) * rowH, y2: top + (i + 1) * rowH, stroke: "#f0f0f0"}, g);
  });
  const rowOf = new Map(rows.map((n, i) => [n, i]));
  for (const t of T.filter(t => t.parent === null)) {
    const m = el("rect", {x: x(t.submitted), y: top + 4, width: 1.5, height: rowH - 8, fill: "#555", class: "fork"}, s);
    hover(m, `fork %${t.id} ${t.func} at +${fmtS(t.submitted)}`);
  }
  const nested = new Set(ran.filter(t => t.where === "reclaimed").map(t => t.id));
  const LIMIT = 20000;  // more rectangles than pixels help nobody and stall the page
  if (ran.length > LIMIT) el("text", {x: W - 10, y: top + rows.length * rowH + 16, "text-anchor": "end"}, s,
                             `the ${LIMIT} longest of ${ran.length} tasks drawn`);
  const drawn = ran.length > LIMIT ? ran.slice().sort((a, b) => b.run_s - a.run_s).slice(0, LIMIT) : ran;
  for (const t of drawn) {
    const i = rowOf.get(t.worker || "?"); const inset = nested.has(t.id) ? 6 : 2;
    const r = el("rect", {x: x(t.started), y: top + i * rowH + inset, width: Math.max(1, x(t.finished) - x(t.started)),
      height: rowH - 2 * inset, fill: color(t), stroke: nested.has(t.id) ? "#fff" : "none", "stroke-width": 0.5,
      class: "task", "data-id": t.id}, s);
    hover(r, describe(t));
  }
})();

// -- fork graph: layers by depth (forks and values), at most 400 nodes -------------------------------
(function () {
  const LIMIT = 400, shown = T.slice(0, LIMIT), byId = new Map(shown.map(t => [t.id, t])), depth = new Map();
  for (const t of shown) { let d = 0;
    if (t.parent !== null && depth.has(t.parent)) d = depth.get(t.parent) + 1;
    for (const p of t.deps) if (depth.has(p)) d = Math.max(d, depth.get(p) + 1);
    depth.set(t.id, d); }
  const layers = []; for (const t of shown) { const d = depth.get(t.id); (layers[d] = layers[d] || []).push(t); }
  const nodeW = 96, nodeH = 30, gapX = 12, gapY = 40, rowGap = 8, widest = Math.max(1, ...layers.map(l => l.length));
  const W = Math.max(600, Math.min(1100, widest * (nodeW + gapX) + 20)), per = Math.floor((W - 20) / (nodeW + gapX));
  const pos = new Map(); let y = 10;
  const MAX_ROWS = 4, notes = [];
  layers.forEach(layer => {  // a wide layer wraps onto a few rows; the rest is counted, not drawn
    for (let row = 0; row * per < layer.length && row < MAX_ROWS; row++) {
      const part = layer.slice(row * per, (row + 1) * per), x0 = (W - part.length * (nodeW + gapX) + gapX) / 2;
      part.forEach((t, i) => pos.set(t.id, [x0 + i * (nodeW + gapX), y]));
      y += nodeH + rowGap;
    }
    if (layer.length > MAX_ROWS * per) { notes.push([y + 4, layer.length - MAX_ROWS * per]); y += 16; }
    y += gapY - rowGap;
  });
  const H = y - gapY + nodeH, s = svg("graph", W, H);
  for (const [ny, more] of notes) el("text", {x: W / 2, y: ny + 6, "text-anchor": "middle"}, s, `\u2026 and ${more} more at this depth`);
  const defs = el("defs", {}, s);
  const mk = el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto"}, defs);
  el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#888"}, mk);
  function edge(a, b, dashed) { const p = pos.get(a), q = pos.get(b); if (!p || !q) return;
    el("line", {x1: p[0] + nodeW / 2, y1: p[1] + nodeH, x2: q[0] + nodeW / 2, y2: q[1], stroke: dashed ? "#e08a00" : "#999",
      "stroke-dasharray": dashed ? "5,3" : "", "marker-end": "url(#arrow)", class: dashed ? "value-edge" : "fork-edge"}, s); }
  for (const t of shown) { if (t.parent !== null) edge(t.parent, t.id, false); for (const d of t.deps) edge(d, t.id, true); }
  for (const t of shown) { if (!pos.has(t.id)) continue; const [x, y] = pos.get(t.id);
    const g = el("g", {class: "node", "data-id": t.id}, s);
    el("rect", {x, y, width: nodeW, height: nodeH, rx: 5, fill: color(t), opacity: 0.9}, g);
    el("text", {x: x + 5, y: y + 12}, g, `%${t.id} ${t.func}`.slice(0, 16));
    el("text", {x: x + 5, y: y + 25}, g, fmtS(t.run_s));
    hover(g, describe(t)); }
  if (T.length > LIMIT) el("text", {x: 10, y: H - 4}, s, `first ${LIMIT} of ${T.length} tasks shown`);
})();

// -- bar charts ---------------------------------------------------------------------------------------
function bars(id, labels, values, fmt, xlabel) {
  const W = 360, H = 200, left = 62, bottom = 44, s = svg(id, W, H), max = Math.max(1e-9, ...values);
  const bw = (W - left - 10) / Math.max(1, values.length);
  for (const v of ticks(max, 4)) { const y = H - bottom - (H - bottom - 10) * v / max;
    el("line", {x1: left, x2: W - 8, y1: y, y2: y, stroke: "#eee"}, s);
    el("text", {x: left - 4, y: y + 4, "text-anchor": "end"}, s, fmt(v)); }
  values.forEach((v, i) => { const h = (H - bottom - 10) * v / max;
    const r = el("rect", {x: left + i * bw + 1, y: H - bottom - h, width: Math.max(1, bw - 2), height: h, fill: "#4a7fc1", class: "bar"}, s);
    hover(r, `${labels[i]}: ${fmt(v)}`); });
  const every = Math.ceil(labels.length / Math.floor((W - left) / 64));
  labels.forEach((l, i) => {  // centred under their bar, never past the edges
    if (i % every) return; const cx = left + i * bw + bw / 2;
    el("text", {x: Math.min(W - 4, Math.max(4, cx)), y: H - bottom + 14,
      "text-anchor": cx < 30 ? "start" : cx > W - 30 ? "end" : "middle"}, s, l); });
  el("text", {x: (W + left) / 2, y: H - 8, "text-anchor": "middle", class: "muted"}, s, xlabel);
  return s;
}
(function () {  // run-time histogram, log bins
  const rs = ran.map(t => t.run_s).filter(v => v > 0);
  if (!rs.length) { document.getElementById("hist").textContent = "no task ran"; return; }
  const lo = Math.floor(Math.log10(Math.min(...rs)) * 2) / 2, hi = Math.ceil(Math.log10(Math.max(...rs)) * 2 + 1e-9) / 2;
  const n = Math.max(1, Math.round((hi - lo) * 2)), counts = new Array(n).fill(0);
  for (const v of rs) counts[Math.min(n - 1, Math.floor((Math.log10(v) - lo) * 2))]++;
  bars("hist", counts.map((_, i) => fmtS(Math.pow(10, lo + i / 2))), counts, v => String(Math.round(v)), "run time (bin start, log scale)");
})();
(function () {  // throughput: tasks finished per second, in n equal bins that end at the last result (none partial)
  const fin = T.map(t => t.done !== null ? t.done : t.finished).filter(v => v !== null);
  if (!fin.length) { document.getElementById("throughput").textContent = "nothing finished"; return; }
  const span = Math.max(...fin), n = Math.max(1, Math.min(30, Math.ceil(fin.length / 5))), w = span / n || 1e-6;
  const counts = new Array(n).fill(0); for (const v of fin) counts[Math.min(n - 1, Math.floor(v / w))]++;
  const rates = counts.map(c => c / w);
  bars("throughput", counts.map((_, i) => fmtS(i * w)), rates, v => v >= 100 ? v.toFixed(0) : v.toFixed(1), "time since the first fork (tasks/s)");
})();
(function () {  // bytes by path
  const sums = {};
  for (const t of ran) { if (t.path_in) sums["args " + t.path_in] = (sums["args " + t.path_in] || 0) + t.bytes_in;
    if (t.path_out) sums["results " + t.path_out] = (sums["results " + t.path_out] || 0) + t.bytes_out; }
  const keys = Object.keys(sums).sort();
  if (!keys.length) { document.getElementById("bytes").textContent = "no transfers recorded"; return; }
  const s = bars("bytes", keys.map(k => k.replace("results", "res")), keys.map(k => sums[k]), fmtB, "payload bytes");
  s.setAttribute("data-paths", keys.join(","));
})();
(function () {  // failures
  const box = document.getElementById("failures");
  if (!failed.length) { box.textContent = "none"; return; }
  const tbl = document.createElement("table"); tbl.id = "failure-table";
  tbl.innerHTML = "<tr><th>task</th><th>function</th><th>status</th><th>worker</th><th>error (remote traceback)</th></tr>";
  for (const t of failed) { const tr = tbl.insertRow();
    for (const v of [`%${t.id}`, t.func, t.status, t.worker || "?"]) tr.insertCell().textContent = v;
    const pre = document.createElement("pre"); pre.textContent = t.error || "(no text)"; tr.insertCell().appendChild(pre); }
  box.appendChild(tbl);
})();
document.body.setAttribute("data-ready", "1");
