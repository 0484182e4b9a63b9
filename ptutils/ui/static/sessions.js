// The sessions table: filters, sorting and paging happen on the server; polled live.
"use strict";
const state = {sort: "created", order: "desc", page: 1, total: 0, seq: 0};
const chosen = new Set();  // sessions ticked for the compare page, kept across redraws
const form = document.getElementById("filters");

function query() {
  const p = new URLSearchParams();
  for (const el of form.elements) if (el.name && el.value) p.set(el.name, el.value);
  p.set("sort", state.sort); p.set("order", state.order); p.set("page", state.page);
  return p.toString();
}

function evalText(ev) {
  return Object.entries(ev || {}).map(([k, v]) => `${ui.esc(k)}=${ui.num(v)}`).join(" ");
}

function row(r) {
  return `<tr data-id="${ui.esc(r.id)}" data-state="${ui.esc(r.state)}">
    <td><input type="checkbox" class="pick" value="${ui.esc(r.id)}"${chosen.has(r.id) ? " checked" : ""}></td>
    <td><a href="/session/${encodeURIComponent(r.id)}">${ui.esc(r.name)}</a></td>
    <td class="state-${ui.esc(r.state)}">${ui.esc(r.state)}</td>
    <td>${r.step}/${r.total_steps}</td><td>${ui.num(r.loss)}</td><td>${evalText(r.eval)}</td>
    <td>${ui.esc(r.worker)}</td>
    <td>${r.sweep ? `<a href="/sweep?sweep=${encodeURIComponent(r.sweep)}">${ui.esc(r.sweep)}</a>` : ""}</td>
    <td>${r.created ? ui.time(r.created) : ""}</td>
    <td>${r.updated_ago !== undefined ? Math.round(r.updated_ago) + " s ago" : ""}</td></tr>`;
}

async function load() {
  const started = performance.now();
  const seq = ++state.seq;
  try {
    const body = await ui.get("/api/sessions?" + query());
    if (seq !== state.seq) return;  // a newer request (a filter typed meanwhile) wins
    state.total = body.total;
    const pages = Math.max(1, Math.ceil(body.total / body.per_page));
    document.querySelector("#sessions tbody").innerHTML = body.rows.map(row).join("");
    document.getElementById("total").textContent = body.total;
    document.getElementById("page").textContent = `page ${body.page} of ${pages}`;
    document.getElementById("prev").disabled = body.page <= 1;
    document.getElementById("next").disabled = body.page >= pages;
    for (const th of document.querySelectorAll("th.sort")) {
      th.classList.toggle("on", th.dataset.key === state.sort);
      th.dataset.dir = state.order === "desc" ? " \u25BE" : " \u25B4";
    }
    ui.showError(null);
    ui.rendered(started);
  } catch (err) { ui.showError(err); }
}

document.querySelector("#sessions tbody").addEventListener("change", ev => {
  if (!ev.target.classList.contains("pick")) return;
  if (ev.target.checked) chosen.add(ev.target.value); else chosen.delete(ev.target.value);
  document.getElementById("compare").disabled = chosen.size < 1;
  for (const b of bulkButtons) b.disabled = chosen.size < 1;
});

// Actions on the ticked sessions, one request each; the server says why it refuses one.
const bulkButtons = document.querySelectorAll("#bulk button");
for (const b of bulkButtons) {
  b.onclick = async () => {
    const out = document.getElementById("bulk-result");
    const ids = [...chosen], done = [], refused = [];
    out.textContent = b.dataset.action + "...";
    for (const id of ids) {
      try {
        const body = await ui.post(`/api/sessions/${encodeURIComponent(id)}/${b.dataset.action}`);
        done.push(`${body.row.name}: ${body.row.status}`);
      } catch (err) { refused.push(String(err.message || err)); }
    }
    out.textContent = [...done, ...refused].join("; ");
    out.className = refused.length ? "error" : "";
    load();
  };
}
document.getElementById("compare").onclick = () => {
  location.href = "/compare?ids=" + [...chosen].map(encodeURIComponent).join(",");
};

let typing;
form.addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { state.page = 1; load(); }, 150);
});
document.getElementById("prev").onclick = () => { state.page -= 1; load(); };
document.getElementById("next").onclick = () => { state.page += 1; load(); };
for (const th of document.querySelectorAll("th.sort")) {
  th.onclick = () => {
    if (state.sort === th.dataset.key) state.order = state.order === "desc" ? "asc" : "desc";
    else { state.sort = th.dataset.key; state.order = th.dataset.key === "name" ? "asc" : "desc"; }
    state.page = 1; load();
  };
}
ui.get("/api/info").then(i => {
  document.getElementById("store").textContent = i.store;
  for (const b of bulkButtons) b.hidden = !i.actions.includes(b.dataset.action);
});
load();
setInterval(() => { if (!document.hidden) load(); }, 3000);
