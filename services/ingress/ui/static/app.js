// The Switchyard dashboard: one page, hash navigation, data from /v1/dashboard/* and the admin and
// Batches APIs. Authentication is the HttpOnly session cookie set by POST /ui/login: this script never
// sees, stores or puts in a URL the master key after the sign-in form sends it. Every value from the
// server is written with textContent (never as HTML).
import { barChart, lineChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const PAGES = ["overview", "spend", "providers", "keys", "batches", "requests"];

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) { init.body = JSON.stringify(body); init.headers["content-type"] = "application/json"; }
  let res;
  try { res = await fetch(path, init); } catch (e) { throw new ApiError(0, "The gateway cannot be reached."); }
  const data = (res.headers.get("content-type") || "").includes("json") ? await res.json() : null;
  if (res.status === 401) { showLogin(); throw new ApiError(401, "Please sign in."); }
  if (!res.ok) throw new ApiError(res.status, data?.error?.message || `HTTP ${res.status}`);
  return data;
}

function flash(message) { const f = $("flash"); f.textContent = message || ""; f.hidden = !message; }

function table(node, headers, rows, onClick) {
  const head = document.createElement("tr");
  for (const h of headers) { const th = document.createElement("th"); th.textContent = h; head.append(th); }
  const trs = rows.map((cells, i) => {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? "—";
      tr.append(td);
    }
    if (onClick) { tr.className = "clickable"; tr.addEventListener("click", () => onClick(i)); }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr"); const td = document.createElement("td");
    td.colSpan = headers.length; td.textContent = "Nothing yet."; tr.append(td); trs.push(tr);
  }
  node.replaceChildren(head, ...trs);
}

function badge(state) {
  const s = document.createElement("span"); s.className = `state state-${state}`; s.textContent = state; return s;
}

function button(label, onClick, cls = "") {
  const b = document.createElement("button"); b.type = "button"; b.textContent = label; b.className = cls;
  b.addEventListener("click", (e) => { e.stopPropagation(); onClick(); }); return b;
}

const usd = (v) => (v === null || v === undefined ? "—" : `$${Number(v).toFixed(v !== 0 && Math.abs(v) < 0.01 ? 6 : 2)}`);
const ms = (v) => (v === null || v === undefined ? "—" : `${Math.round(v)} ms`);
const pct = (v) => `${(100 * v).toFixed(1)}%`;

// ---- overview
function card(label, value, testid) {
  const c = document.createElement("div"); c.className = "card"; c.dataset.testid = testid;
  const l = document.createElement("div"); l.className = "label"; l.textContent = label;
  const v = document.createElement("div"); v.className = "value"; v.textContent = value;
  c.append(l, v); return c;
}

async function loadOverview() {
  const o = await api("/v1/dashboard/overview");
  const cards = [];
  for (const [w, name] of [["1h", "last hour"], ["24h", "last day"]]) {
    const f = o.windows[w];
    cards.push(card(`Requests, ${name}`, String(f.requests), `requests-${w}`),
               card(`Error rate, ${name}`, pct(f.error_rate), `error-rate-${w}`),
               card(`P50, ${name}`, ms(f.p50_ms), `p50-${w}`), card(`P95, ${name}`, ms(f.p95_ms), `p95-${w}`),
               card(`P99, ${name}`, ms(f.p99_ms), `p99-${w}`));
  }
  cards.push(card("Spend today", usd(o.spend.today), "spend-today"), card("Spend this week", usd(o.spend.week), "spend-week"),
             card("Spend this month", usd(o.spend.month), "spend-month"),
             card("Cache hit rate", o.cache ? pct(o.cache.hit_rate) : "no cache", "cache-hit-rate"));
  $("overview-cards").replaceChildren(...cards);
  const h = o.windows["1h"].series, d = o.windows["24h"].series;
  const now = Date.parse(o.generated_at) / 1000, hour = [now - 3600, now], day = [now - 86400, now];
  lineChart($("chart-requests-1h"), [{ name: "requests", points: h.map((p) => [p.t, p.requests]) },
                                     { name: "errors", points: h.map((p) => [p.t, p.errors]) }], "Requests per minute", hour);
  lineChart($("chart-latency-24h"), ["p50_ms", "p95_ms", "p99_ms"].map((k) => ({ name: k.slice(0, 3), points: d.map((p) => [p.t, p[k]]) })),
            "Latency percentiles per hour", day);
  lineChart($("chart-errors-24h"), [{ name: "error %", points: d.map((p) => [p.t, 100 * p.error_rate]) }], "Error rate per hour", day);
  barChart($("chart-spend-month"), o.spend.series.map((p) => ({ label: new Date(p.t * 1000).toISOString().slice(5, 10), value: p.cost_usd })),
           "Spend per day", "USD per day", "day");
}

// ---- spend
function spendQuery() {
  const q = new URLSearchParams({ by: $("spend-by").value, since: $("spend-since").value.trim() || "7d" });
  if ($("spend-until").value.trim()) q.set("until", $("spend-until").value.trim());
  return q;
}

async function loadSpend() {
  const q = spendQuery();
  const csv = new URLSearchParams(q); csv.set("format", "csv");
  $("spend-csv").href = `/v1/dashboard/spend?${csv}`;
  const s = await api(`/v1/dashboard/spend?${q}`);
  const by = s.by;
  barChart($("chart-spend"), s.data.slice(0, 30).map((r) => ({ label: r[by] ?? "(none)", value: r.cost_usd })), `Spend by ${by}`, "USD", by);
  table($("spend-table"), [by, "requests", "prompt tokens", "completion tokens", "cost", "errors"],
        s.data.map((r) => [r[by] ?? "(none)", r.requests, r.prompt_tokens, r.completion_tokens, usd(r.cost_usd), r.errors]));
}

// ---- providers
async function loadProviders() {
  const p = await api("/v1/dashboard/providers");
  const problems = [p.errors?.state, p.errors?.backlog].filter(Boolean);
  $("providers-error").textContent = problems.join(" ");
  table($("providers-table"), ["deployment", "model group", "provider", "breaker", "requests (1h)", "error rate", "P50", "P95", "P99", "pool backlog"],
        p.deployments.map((d) => [d.deployment, d.model_group, d.provider, badge(d.state ?? "unknown"), d.requests, pct(d.error_rate),
                                  ms(d.p50_ms), ms(d.p95_ms), ms(d.p99_ms), d.backlog ?? "—"]));
  table($("failovers-table"), ["time", "request", "model group", "from", "to", "attempt", "succeeded"],
        p.failovers.map((f) => [f.ts.slice(0, 19).replace("T", " "), f.request_id, f.model_group, f.from_deployment,
                                f.to_deployment, f.attempt, f.ok ? "yes" : "no"]));
}

// ---- keys
let editing = null;

function numberOrNull(value, name) {
  const v = String(value ?? "").trim();
  if (!v) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new ApiError(400, `${name} must be a non-negative number.`);
  return name === "budget_usd" ? v : n;
}

function keyBody(form) {
  const f = new FormData(form), body = {};
  for (const name of ["name", "team", "project", "expires_in"]) { const v = String(f.get(name) ?? "").trim(); if (v) body[name] = v; }
  const models = String(f.get("models") ?? "").trim();
  if (models) body.models = models.split(",").map((m) => m.trim()).filter(Boolean);
  for (const name of ["rpm", "tpm", "budget_usd"]) { const v = numberOrNull(f.get(name), name); if (v !== undefined) body[name] = v; }
  if (body.budget_usd !== undefined) body.budget_period = String(f.get("budget_period"));
  return body;
}

async function loadKeys() {
  const k = await api("/v1/dashboard/keys");
  table($("keys-table"), ["name", "key id", "prefix", "team", "project", "status", "budget use", "rpm", "tpm", "expires", ""],
        k.data.map((r) => {
          let use = "—";
          if (r.budget_usd !== null) {
            const bar = document.createElement("progress"); bar.max = r.budget_usd || 1; bar.value = Math.min(r.spent_usd || 0, bar.max);
            use = document.createElement("span"); use.append(bar, ` ${usd(r.spent_usd || 0)} / ${usd(r.budget_usd)} per ${r.budget_period}`);
          }
          const actions = document.createElement("span");
          if (r.status === "active") {
            actions.append(button("Edit limits", () => startEdit(r)), " ",
                           button("Revoke", () => revoke(r), "danger"));
          }
          return [r.name, r.key_id, r.key_prefix, r.team, r.project, badge(r.status), use, r.rpm, r.tpm,
                  r.expires_at ? r.expires_at.slice(0, 16).replace("T", " ") : "never", actions];
        }));
}

function startEdit(r) {
  editing = r.key_id;
  const form = $("edit-key");
  $("edit-key-title").textContent = `Limits of ${r.name || r.key_id}`;
  form.elements.rpm.value = r.rpm ?? ""; form.elements.tpm.value = r.tpm ?? "";
  form.elements.budget_usd.value = r.budget_usd ?? ""; form.elements.budget_period.value = r.budget_period || "month";
  form.hidden = false;
}

async function revoke(r) {
  if (!confirm(`Revoke ${r.name || r.key_id}? Requests with it are refused at once.`)) return;
  await guarded("keys-error", async () => { await api(`/v1/keys/${encodeURIComponent(r.key_id)}/revoke`, { method: "POST" }); await loadKeys(); });
}

async function guarded(errorId, fn) {
  $(errorId).textContent = "";
  try { await fn(); } catch (e) { if (e.status !== 401) $(errorId).textContent = e.message; }
}

// ---- batches
async function loadBatches() {
  const b = await api("/v1/batches?limit=100");
  table($("batches-table"), ["batch", "status", "progress", "endpoint", "created", ""],
        b.data.map((x) => {
          const c = x.request_counts || { total: 0, completed: 0, failed: 0 };
          const prog = document.createElement("span");
          const bar = document.createElement("progress"); bar.max = c.total || 1; bar.value = c.completed + c.failed;
          prog.append(bar, ` ${c.completed} done, ${c.failed} failed of ${c.total}`);
          const actions = document.createElement("span");
          if (["validating", "in_progress"].includes(x.status)) actions.append(button("Cancel", () => cancelBatch(x.id), "danger"));
          if (x.output_file_id) {
            const a = document.createElement("a"); a.href = `/v1/files/${encodeURIComponent(x.output_file_id)}/content`;
            a.download = `${x.id}-output.jsonl`; a.textContent = "Download results"; a.className = "button"; actions.append(" ", a);
          }
          return [x.id, badge(x.status), prog, x.endpoint, new Date(x.created_at * 1000).toISOString().slice(0, 16).replace("T", " "), actions];
        }));
}

async function cancelBatch(id) {
  await guarded("batches-error", async () => { await api(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" }); await loadBatches(); });
}

// ---- requests
async function loadRequests() {
  const f = new FormData($("requests-form")), q = new URLSearchParams();
  for (const [k, v] of f.entries()) if (String(v).trim()) q.set(k, String(v).trim());
  const r = await api(`/v1/dashboard/requests?${q}`);
  table($("requests-table"), ["time", "request id", "key", "model", "status", "attempts", "latency", "cost"],
        r.data.map((x) => [x.ts.slice(0, 19).replace("T", " "), x.request_id, x.key_id, x.model, x.ok ? `ok (${x.status})` : `error (${x.status})`,
                           x.attempts, ms(x.latency_ms), usd(x.cost_usd)]),
        (i) => showRequest(r.data[i].request_id));
}

async function showRequest(id) {
  const d = await api(`/v1/dashboard/requests/${encodeURIComponent(id)}`);
  $("request-detail-id").textContent = id;
  table($("attempts-table"), ["attempt", "deployment", "provider", "provider model", "status", "latency", "tokens in/out", "cost"],
        d.attempts.map((a) => [a.attempt, a.deployment, a.provider, a.provider_model, a.status, ms(a.latency_ms),
                               `${a.prompt_tokens} / ${a.completion_tokens}`, usd(a.cost_usd)]));
  $("request-detail").hidden = false;
}

// ---- navigation and sign-in
const LOADERS = { overview: loadOverview, spend: loadSpend, providers: loadProviders, keys: loadKeys, batches: loadBatches, requests: loadRequests };

function showLogin() {
  for (const p of PAGES) $(p).hidden = true;
  $("nav").hidden = true; $("login").hidden = false; $("master-key").focus();
}

async function show() {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  flash("");
  try {
    await LOADERS[page]();
  } catch (e) {
    if (e.status === 401) return;
    flash(e.message);
  }
  $("login").hidden = true; $("nav").hidden = false;
  for (const p of PAGES) $(p).hidden = p !== page;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === `#${page}`);
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("master-key");
  const res = await fetch("/ui/login", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
                                        body: JSON.stringify({ master_key: input.value }) }).catch(() => null);
  input.value = "";
  if (!res || !res.ok) {
    const data = res ? await res.json().catch(() => null) : null;
    $("login-error").textContent = data?.error?.message || "The gateway cannot be reached.";
    return;
  }
  $("login-error").textContent = "";
  await show();
});

$("sign-out").addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin" }).catch(() => null);
  showLogin();
});

$("spend-form").addEventListener("submit", (e) => { e.preventDefault(); loadSpend().catch((err) => flash(err.message)); });
$("requests-form").addEventListener("submit", (e) => { e.preventDefault(); loadRequests().catch((err) => flash(err.message)); });

$("create-key").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded("keys-error", async () => {
    const created = await api("/v1/keys", { method: "POST", body: keyBody(e.target) });
    e.target.reset();
    $("new-key-value").textContent = created.key; $("new-key").hidden = false;
    await loadKeys();
  });
});

$("copy-key").addEventListener("click", async () => {
  const text = $("new-key-value").textContent;
  try { await navigator.clipboard.writeText(text); $("copy-key").textContent = "Copied"; }
  catch { const r = document.createRange(); r.selectNodeContents($("new-key-value")); getSelection().removeAllRanges(); getSelection().addRange(r); $("copy-key").textContent = "Selected: press Ctrl+C"; }
});

$("dismiss-key").addEventListener("click", () => { $("new-key-value").textContent = ""; $("new-key").hidden = true; $("copy-key").textContent = "Copy"; });

$("edit-key").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded("keys-error", async () => {
    const f = new FormData(e.target), body = {};
    for (const name of ["rpm", "tpm", "budget_usd"]) { const v = numberOrNull(f.get(name), name); if (v !== undefined) body[name] = v; }
    if (body.budget_usd !== undefined) body.budget_period = String(f.get("budget_period"));
    await api(`/v1/keys/${encodeURIComponent(editing)}`, { method: "PATCH", body });
    e.target.hidden = true;
    await loadKeys();
  });
});
$("edit-cancel").addEventListener("click", () => { $("edit-key").hidden = true; });

window.addEventListener("hashchange", show);
show();
