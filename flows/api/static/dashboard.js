// The dashboard's script (flows/api/templates/dashboard.html): a file, not inline, so the
// Content-Security-Policy allows scripts from this origin only.
"use strict";
let token = sessionStorage.getItem("refreshToken") || "";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function badge(text) { return el("span", text || "-", "badge " + (text || "")); }
function ts(v) { return v ? v.replace("T", " ").slice(0, 19) : "-"; }

async function api(path, options = {}, useToken = token) {
  const headers = Object.assign({}, options.headers || {});
  if (useToken) headers["Authorization"] = "Bearer " + useToken;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  const body = await resp.json().catch(() => ({}));
  return { resp, body };
}

function showProblem(body) {
  document.getElementById("problem").textContent = body.detail || body.title || "error";
}

function renderTables(status) {
  const h = document.getElementById("health");
  h.textContent = status.status; h.className = "badge " + status.status;
  document.getElementById("reasons").textContent = status.reasons.join("; ");
  const tbody = document.querySelector("#tables tbody");
  tbody.replaceChildren();
  for (const t of status.tables) {
    const tr = el("tr");
    const cells = [el("td", t.table), el("td"), el("td"), el("td"), el("td", ts(t.last_success_at)),
                   el("td", ts(t.next_due_at)), el("td", t.refresh_frequency_hours + "h")];
    cells[1].append(badge(t.mode)); cells[2].append(badge(t.last_status)); cells[3].append(badge(t.freshness));
    tr.append(...cells); tbody.append(tr);
  }
}

const COLORS = { success: "#2e7d32", warning: "#ef6c00", running: "#1565c0", failed: "#c62828", abandoned: "#6a1b9a" };
const LAYOUT = { margin: { t: 10, r: 10, b: 40, l: 50 }, height: 320, legend: { orientation: "h" } };

function byName(rows) {
  const groups = {};
  for (const r of rows) (groups[r.name] = groups[r.name] || []).push(r);
  return Object.entries(groups).map(([name, rs]) => ({
    type: "scatter", mode: "lines+markers", name,
    x: rs.map(r => r.started_at), y: rs.map(r => r.duration_s),
  }));
}

function renderCharts(data) {
  const statuses = [...new Set(data.timeline.map(r => r.status))];
  const timeline = statuses.map(s => {
    const rs = data.timeline.filter(r => r.status === s);
    return { type: "scatter", mode: "markers", name: s, marker: { color: COLORS[s] || "#757575", size: 11 },
             x: rs.map(r => r.started_at), y: rs.map(r => r.duration_s === null ? 0 : r.duration_s),
             text: rs.map(r => r.trigger + ": " + (r.message || "")), hoverinfo: "x+y+text" };
  });
  const now = new Date(data.generated_at);
  const weekAgo = new Date(now.getTime() - 7 * 24 * 3600 * 1000);
  const timelineLayout = Object.assign({}, LAYOUT, {
    yaxis: { title: { text: "seconds" }, rangemode: "tozero" },
    // a few hours past now, so the latest run's marker is not cut at the edge
    xaxis: { type: "date", range: [weekAgo.toISOString(), new Date(now.getTime() + 3 * 3600 * 1000).toISOString()] },
  });
  Plotly.newPlot("timeline", timeline, timelineLayout, { displaylogo: false, responsive: true });
  Plotly.newPlot("trend-tables", byName(data.trends.tables), LAYOUT, { displaylogo: false, responsive: true });
  Plotly.newPlot("trend-models", byName(data.trends.dbt_models), LAYOUT, { displaylogo: false, responsive: true });
  const tbody = document.querySelector("#failures tbody");
  tbody.replaceChildren();
  if (!data.failures.length) {
    const tr = el("tr"); const td = el("td", "no failures in the last 7 days"); td.colSpan = 5;
    tr.append(td); tbody.append(tr);
  }
  for (const f of data.failures) {
    const tr = el("tr"); const s = el("td"); s.append(badge(f.status));
    tr.append(el("td", ts(f.started_at)), el("td", f.kind), el("td", f.name || f.run_id), s,
              el("td", f.error, "error-text"));
    tbody.append(tr);
  }
}

async function load() {
  document.getElementById("problem").textContent = "";
  const status = await api("/api/refresh/status?hours=168");
  if (status.resp.status === 401) {
    document.getElementById("token-form").hidden = false;
    showProblem(status.body);
    return;
  }
  if (!status.resp.ok) { showProblem(status.body); return; }
  renderTables(status.body);
  const data = await api("/api/refresh/dashboard");
  if (!data.resp.ok) { showProblem(data.body); return; }
  renderCharts(data.body);
}

document.getElementById("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("refreshToken", token);
  document.getElementById("token-form").hidden = true;
  load();
});

function newKey() {
  return (crypto.randomUUID ? crypto.randomUUID() : Date.now() + "-" + Math.random().toString(16).slice(2));
}

document.getElementById("trigger-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const result = document.getElementById("trigger-result");
  const names = document.getElementById("trigger-tables").value.split(",").map(s => s.trim()).filter(Boolean);
  const body = { tables: names.length ? names : null,
                 force: document.getElementById("trigger-force").checked,
                 dry_run: document.getElementById("trigger-dry-run").checked };
  const field = document.getElementById("trigger-token");
  const useToken = field ? field.value.trim() : token;
  if (!useToken) { result.textContent = "a token with scope trigger is needed"; return; }
  result.textContent = "starting...";
  const r = await api("/api/refresh/trigger", {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "Idempotency-Key": newKey() },
  }, useToken);
  result.textContent = r.resp.status === 202
    ? "started (trigger " + r.body.trigger_id + ")"
    : r.resp.status + ": " + (r.body.detail || r.body.title);
  if (r.resp.status === 202) setTimeout(load, 3000);
});

load();
