// Overlay one curve (downsampled on the server) of several sessions: ?ids=a,b,c.
"use strict";
const params = new URLSearchParams(location.search);
const ids = (params.get("ids") || "").split(",").filter(Boolean);
const COLORS = ["#c33", "#36c", "#393", "#c90", "#939", "#099", "#666", "#e6c"];
const box = document.getElementById("chart");
let bodies = [], plot = null;

function ema(values, w) {
  let last = 0, n = 0;
  return values.map(v => { last = last * w + (1 - w) * v; n += 1; return last / (1 - Math.pow(w, n)); });
}

function draw() {
  const log = document.getElementById("log").checked, w = +document.getElementById("smooth").value;
  const tables = bodies.map(b => [b.steps, w ? ema(b.values, w) : b.values]);
  const data = tables.length ? uPlot.join(tables) : [[]];
  if (log) for (let i = 1; i < data.length; i++) data[i] = data[i].map(v => (v > 0 ? v : null));
  if (plot) plot.destroy();
  plot = new uPlot({
    width: Math.max(300, box.clientWidth), height: 420,
    scales: {x: {time: false}, y: {distr: log ? 3 : 1}},
    series: [{label: "step"}, ...bodies.map((b, i) => ({label: b.name, stroke: COLORS[i % COLORS.length], spanGaps: true}))],
  }, data, box);
  box.dataset.series = bodies.length;
}

async function load() {
  const started = performance.now();
  const series = document.getElementById("series").value;
  const buckets = Math.max(100, Math.min(4000, box.clientWidth || 1000));
  try {
    bodies = await Promise.all(ids.map(id => ui.get(
      `/api/sessions/${encodeURIComponent(id)}/curve?series=${encodeURIComponent(series)}&buckets=${buckets}`)));
    draw(); ui.showError(null); ui.rendered(started);
  } catch (err) { ui.showError(err); }
}
document.getElementById("series").onchange = load;
document.getElementById("smooth").oninput = draw;
document.getElementById("log").onchange = draw;
load();
