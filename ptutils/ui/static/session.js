// One session: status, events, checkpoints, config, and its curves (downsampled on the
// server, min/max per pixel column; smoothing and log axis here). Polled while it runs.
"use strict";
const ref = decodeURIComponent(location.pathname.split("/").pop());
const api = "/api/sessions/" + encodeURIComponent(ref);
const el = id => document.getElementById(id);
const FINISHED = ["completed", "failed", "cancelled"];
let detail = null, curveBody = null, plot = null, plotLog = null, actions = [];

function smooth(values, weight) {
  if (!weight) return values;
  const out = new Array(values.length);
  let last = 0, n = 0;
  for (let i = 0; i < values.length; i++) {  // debiased EMA, as TensorBoard draws it
    last = last * weight + (1 - weight) * values[i]; n += 1;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

function draw() {
  if (!curveBody) return;
  const log = el("log").checked;
  const keep = v => (log && !(v > 0) ? null : v);
  const xs = curveBody.steps, raw = curveBody.values.map(keep);
  const sm = smooth(curveBody.values, +el("smooth").value).map(keep);
  const data = [xs, raw, sm];
  const box = el("chart");
  if (!plot || plotLog !== log) {
    if (plot) plot.destroy();
    plot = new uPlot({
      width: Math.max(300, box.clientWidth), height: 320,
      scales: {x: {time: false}, y: {distr: log ? 3 : 1}},
      series: [{label: "step"},
               {label: curveBody.series, stroke: "#9ab", width: 1},
               {label: "smoothed", stroke: "#c33", width: 1.5}],
    }, data, box);
    plotLog = log;
  } else {
    plot.setData(data);
  }
  box.dataset.points = xs.length;
  box.dataset.lastStep = curveBody.last_step ?? "";
  el("points").textContent = curveBody.points;
  el("shown").textContent = xs.length;
}

async function loadCurve() {
  const series = el("series").value || "train/loss";
  const buckets = Math.max(100, Math.min(4000, el("chart").clientWidth || 1000));
  curveBody = await ui.get(`${api}/curve?series=${encodeURIComponent(series)}&buckets=${buckets}`);
  draw();
}

function showDetail(d) {
  const r = d.row;
  document.title = "ptutils: " + r.name;
  el("title").textContent = r.name + " (" + r.id.slice(0, 8) + ")";
  el("state").textContent = r.state; el("state").className = "state-" + r.state;
  el("step").textContent = `${r.step}/${r.total_steps}`;
  el("worker").textContent = r.worker || "-";
  el("attempts").textContent = d.attempts ?? 0;
  for (const [name, shown] of Object.entries(offered(r)))
    el(name).hidden = !actions.includes(name) || !shown;
  el("commands").textContent = Object.values(d.commands).join("\n");
  el("config").textContent = d.config_yaml;
  const err = d.error;
  el("errtrace").innerHTML = err ? `<pre class="error">${ui.esc(err.message || "")}\n${ui.esc(err.traceback || "")}</pre>` : "";
  el("events").querySelector("tbody").innerHTML = d.events.slice().reverse().map(e =>
    `<tr><td>${ui.time(e.time)}</td><td>${ui.esc(e.kind)}</td><td>${ui.esc(e.message)}</td></tr>`).join("");
  el("checkpoints").querySelector("tbody").innerHTML = d.checkpoints.map(c =>
    `<tr><td>${c.step}</td><td>${ui.esc(c.kind)}</td><td>${c.size ?? ""}</td>
     <td>${Object.entries(c.metrics || {}).map(([k, v]) => ui.esc(k) + "=" + ui.num(v)).join(" ")}</td>
     <td class="error">${c.corrupt ? "corrupt: " + ui.esc(c.corrupt.reason) : ""}</td></tr>`).join("");
  const sel = el("series"), chosen = sel.value;
  const names = d.series.length ? d.series : ["train/loss"];
  if (sel.options.length !== names.length || [...sel.options].some((o, i) => o.value !== names[i])) {
    sel.innerHTML = names.map(n => `<option>${ui.esc(n)}</option>`).join("");
    if (names.includes(chosen)) sel.value = chosen;
  }
}

async function refresh() {
  const started = performance.now();
  try {
    detail = await ui.get(api);
    showDetail(detail);
    await loadCurve();
    ui.showError(null);
    ui.rendered(started);
  } catch (err) { ui.showError(err); }
}

el("series").onchange = () => { plotLog = null; loadCurve().catch(ui.showError); };
el("smooth").oninput = draw;
el("log").onchange = draw;
// Which action buttons a session shows, by its stored status (and `lost`: a dead lease).
function offered(r) {
  const active = r.status === "queued" || r.status === "running";
  return {cancel: !FINISHED.includes(r.status), pause: active, resume: r.status === "paused",
          requeue: r.status === "failed" || r.status === "cancelled" || r.state === "lost"};
}
for (const name of ["cancel", "pause", "resume", "requeue"]) {
  el(name).onclick = async () => {
    el("action-result").textContent = name + "...";
    try {
      const body = await ui.post(api + "/" + name);
      el("action-result").textContent = "now " + body.row.status;
      await refresh();
    } catch (err) { el("action-result").textContent = String(err.message || err); }
  };
}

async function poll() {
  await refresh();
  const running = detail && !FINISHED.includes(detail.row.status);
  setTimeout(poll, running ? 1000 : 10000);
}
ui.get("/api/info").then(i => { actions = i.actions; }).finally(poll);
