// Shared helpers of the dashboard pages (no framework, no build step).
"use strict";
const ui = {
  renders: 0,
  async get(url) {
    const r = await fetch(url, {headers: {Accept: "application/json"}});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  async post(url) {
    const r = await fetch(url, {method: "POST", headers: {"X-Ptutils-Action": "1"}});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
      '"': "&quot;", "'": "&#39;"}[c]));
  },
  num(v) {
    if (v === null || v === undefined) return "";
    return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : (+v).toPrecision(4);
  },
  time(t) { return t ? new Date(t * 1000).toLocaleString() : ""; },
  // Mark a finished render for tests and benchmarks: count, and ms since `started`.
  rendered(started) {
    ui.renders += 1;
    document.body.dataset.renders = ui.renders;
    document.body.dataset.lastMs = (performance.now() - started).toFixed(1);
    document.body.dataset.renderedAt = performance.now().toFixed(1);
    if (ui.renders === 1) document.body.dataset.firstPaint = performance.now().toFixed(1);
  },
  showError(err) {
    const el = document.getElementById("error");
    if (el) el.textContent = err ? String(err.message || err) : "";
  },
};
