// Gandalf admin UI: vanilla JS, no build step, no dependencies.
// Every number comes from the admin API (/admin/v1), called with the session
// cookie; writes carry the session's CSRF token in x-csrf-token.
"use strict";

const API = "/admin/v1";
let SESSION = null; // {key_id, name, role, can_write, csrf, expires}

// ------------------------------------------------------------------ DOM helpers
// Text is always set as text (never as HTML): nothing the API returns can inject markup.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the CSP (an attribute is not)
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
const main = () => document.getElementById("main");
function show(...nodes) { main().replaceChildren(...nodes); }

// ------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: { accept: "application/json" } };
  if (method !== "GET") opts.headers["x-csrf-token"] = SESSION ? SESSION.csrf : "";
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(API + path, opts);
  if (res.status === 401) { location.href = "/ui/login"; throw new ApiError(401, "Logged out"); }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new ApiError(res.status, (data.error && data.error.message) || res.statusText);
  return data;
}
const q = (params) => "?" + new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();
// "24h" / "7d": from the start of an hour / a UTC day (the last one partial, so
// "7d" is today and the 6 days before). Whole hours and days are read from the
// rollups alone; only the current hour comes from the raw rows. Other text as given.
function aligned(since) {
  const m = /^(\d+)([hd])$/.exec(since || "");
  if (!m) return since;
  const size = m[2] === "d" ? 86400 : 3600;
  return String(Math.floor(Date.now() / 1000 / size) * size - (Number(m[1]) - 1) * size);
}
async function usage(params) {
  return api("GET", "/usage" + q({ limit: 1000, ...params, since: aligned(params.since) }));
}
// Every row (page after page, at most 20,000): charts must not lose the last buckets.
async function usageAll(params) {
  const first = await usage(params);
  let page = first;
  for (let n = 1; page.has_more && n < 20; n++) {
    // The first page's range, absolute: "7d" would move with the clock between pages.
    page = await usage({ ...params, since: String(first.since), until: String(first.until), offset: page.offset + page.limit });
    first.data.push(...page.data);
  }
  return first;
}

// ------------------------------------------------------------------ formatting
const nf = new Intl.NumberFormat("en-US");
const fmtInt = (n) => nf.format(Math.round(n || 0));
const fmtUsd = (n) => "$" + (n || 0).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: (n && n < 1) ? 4 : 2 });
const fmtPct = (n) => (100 * (n || 0)).toFixed(1) + "%";
const fmtTime = (t, bucket) => {
  const d = new Date(t * 1000);
  const iso = d.toISOString();
  return bucket === "day" ? iso.slice(5, 10) : iso.slice(5, 10) + " " + iso.slice(11, 16);
};
function compact(n) {
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return (Math.round(n * 100) / 100).toString();
}
function errorBox(err) { return h("p", { class: "error", role: "alert" }, err.message || String(err)); }

// ------------------------------------------------------------------ charts (inline SVG)
const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#c92a2a", "#5c940d", "#f08c00", "#495057", "#d6336c"];

// Every bucket start from since to until (so gaps show as zeros, not as jumps).
function bucketsBetween(since, until, bucket) {
  const size = bucket === "day" ? 86400 : 3600;
  const out = [];
  for (let t = Math.floor(since / size) * size; t < until && out.length < 2000; t += size) out.push(t);
  return out;
}

// The axis top: the smallest of 1, 2, 2.5, 5 (x 10^k) at or above max, so the four
// gridlines fall on round numbers.
function niceTop(max) {
  if (!(max > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}

// series: [{name, values: Map(bucket -> number)}]; times: bucket starts.
function lineChart(title, times, series, { format = compact, bucket = "hour", id } = {}) {
  const W = 520, H = 200, L = 46, R = 12, T = 10, B = 24;
  let max = 0;
  for (const se of series) for (const t of times) max = Math.max(max, se.values.get(t) || 0);
  const top = niceTop(max);
  const x = (i) => L + (times.length <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (times.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, "data-series": series.length });
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4, yy = y(v);
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: yy, y2: yy }));
    svg.append(s("text", { x: L - 4, y: yy + 3, "text-anchor": "end" }, format(v)));
  }
  const ticks = Math.min(5, times.length);
  const short = (t) => (bucket === "day" ? fmtTime(t, "day") : new Date(t * 1000).toISOString().slice(11, 16));
  for (let k = 0; k < ticks; k++) {
    const i = ticks <= 1 ? 0 : Math.round((k * (times.length - 1)) / (ticks - 1));
    const anchor = ticks > 1 && k === 0 ? "start" : ticks > 1 && k === ticks - 1 ? "end" : "middle";
    svg.append(s("text", { x: x(i), y: H - 7, "text-anchor": anchor }, short(times[i])));
  }
  series.forEach((se, n) => {
    const color = COLORS[n % COLORS.length];
    const pts = times.map((t, i) => `${x(i).toFixed(1)},${y(se.values.get(t) || 0).toFixed(1)}`);
    if (pts.length > 1) svg.append(s("polyline", { class: "line", stroke: color, points: pts.join(" ") }));
    times.forEach((t, i) => {
      const v = se.values.get(t);
      if (!v) return; // a point for every bucket that has data: its value in data-value
      const c = s("circle", { class: "point", cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.6, fill: color,
        "data-series": se.name, "data-bucket": t, "data-value": v });
      c.append(s("title", {}, `${se.name} · ${fmtTime(t, bucket)}: ${format(v)}`));
      svg.append(c);
    });
  });
  const legend = series.length > 1 || (series[0] && series[0].name !== title)
    ? h("div", { class: "legend" }, series.map((se, n) => h("span", {}, h("i", { style: `background:${COLORS[n % COLORS.length]}` }), se.name)))
    : null;
  const empty = max === 0 ? h("div", { class: "muted small" }, "No data in this range.") : null;
  const wrap = h("div", { class: "card chart", id: id || null }, h("h2", {}, title), svg, legend, empty);
  return wrap;
}

function seriesOf(rows, measure) {
  const values = new Map();
  for (const r of rows) values.set(r.bucket, (values.get(r.bucket) || 0) + measure(r));
  return values;
}
// Rows grouped per group then bucket; the top n groups by requests, the rest folded into "other".
function groupedSeries(rows, measure, n = 6) {
  const totals = new Map();
  for (const r of rows) totals.set(r.group, (totals.get(r.group) || 0) + r.requests);
  const top = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([g]) => g);
  const series = top.map((g) => ({ name: g === null ? "(none)" : g, values: seriesOf(rows.filter((r) => r.group === g), measure) }));
  const rest = rows.filter((r) => !top.includes(r.group));
  if (rest.length) series.push({ name: "other", values: seriesOf(rest, measure) });
  return series;
}

// ------------------------------------------------------------------ pages
// range -> [since, bucket of the totals, bucket of the per-route/provider series]: a
// week's totals per hour, its per-group series per day (8 routes x 168 hours would be
// 1,344 rows to sum, send and draw for lines nobody can tell apart).
const RANGES = { "24h": ["24h", "hour", "hour"], "7d": ["7d", "hour", "day"], "30d": ["30d", "day", "day"] };
let overviewRange = "24h";

async function overview() {
  const [since, bucket, per] = RANGES[overviewRange];
  const picker = h("select", { id: "range", onchange: (e) => { overviewRange = e.target.value; overview(); } },
    Object.keys(RANGES).map((r) => h("option", { value: r, selected: r === overviewRange }, "Last " + r)));
  show(h("h1", {}, "Overview"), h("div", { class: "toolbar" }, picker, h("span", { class: "muted small" }, "UTC; per " + bucket)), h("p", { class: "muted" }, "Loading…"));
  // Per route (the model alias clients ask for) and per provider; per upstream
  // model is in the usage explorer.
  let total, byRoute, byProvider;
  try {
    [total, byRoute, byProvider] = await Promise.all([
      usageAll({ since, bucket }),
      usageAll({ since, bucket: per, group_by: "route" }),
      usageAll({ since, bucket: per, group_by: "provider" }),
    ]);
  } catch (err) { show(h("h1", {}, "Overview"), errorBox(err)); return; }
  const times = bucketsBetween(total.since, total.until, bucket);
  const perTimes = bucketsBetween(byRoute.since, byRoute.until, per);
  const rows = total.data;
  const sum = (f) => rows.reduce((a, r) => a + f(r), 0);
  const requests = sum((r) => r.requests), errors = sum((r) => r.errors);
  const tiles = h("div", { class: "tiles" },
    [["Requests", fmtInt(requests)], ["Tokens", fmtInt(sum((r) => r.total_tokens))],
     ["Spend", fmtUsd(sum((r) => r.cost_usd))], ["Error rate", fmtPct(requests ? errors / requests : 0)]]
      .map(([l, v]) => h("div", { class: "tile" }, h("div", { class: "v" }, v), h("div", { class: "l" }, l))));
  const errRate = new Map();
  for (const r of rows) errRate.set(r.bucket, r.requests ? r.errors / r.requests : 0);
  const charts = h("div", { class: "grid" },
    lineChart("Requests", times, [{ name: "Requests", values: seriesOf(rows, (r) => r.requests) }], { bucket, id: "chart-requests" }),
    lineChart("Tokens", times, [
      { name: "prompt", values: seriesOf(rows, (r) => r.prompt_tokens) },
      { name: "completion", values: seriesOf(rows, (r) => r.completion_tokens) }], { bucket, id: "chart-tokens" }),
    lineChart("Spend (USD)", times, [{ name: "Spend (USD)", values: seriesOf(rows, (r) => r.cost_usd) }], { bucket, format: (v) => "$" + compact(v), id: "chart-spend" }),
    lineChart("Error rate", times, [{ name: "Error rate", values: errRate }], { bucket, format: (v) => (100 * v).toFixed(0) + "%", id: "chart-errors" }),
    lineChart("Requests per route", perTimes, groupedSeries(byRoute.data, (r) => r.requests), { bucket: per, id: "chart-routes" }),
    lineChart("Spend per route", perTimes, groupedSeries(byRoute.data, (r) => r.cost_usd), { bucket: per, format: (v) => "$" + compact(v), id: "chart-route-spend" }),
    lineChart("Requests per provider", perTimes, groupedSeries(byProvider.data, (r) => r.requests), { bucket: per, id: "chart-providers" }),
    lineChart("Spend per provider", perTimes, groupedSeries(byProvider.data, (r) => r.cost_usd), { bucket: per, format: (v) => "$" + compact(v), id: "chart-provider-spend" }),
    lineChart("Errors per provider", perTimes, groupedSeries(byProvider.data, (r) => r.errors), { bucket: per, id: "chart-provider-errors" }),
  );
  show(h("h1", {}, "Overview"), h("div", { class: "toolbar" }, picker, h("span", { class: "muted small" }, "UTC; per " + bucket)), tiles, charts);
}

// A budget period's start (UTC), as app/budget.py counts it.
function periodStart(period) {
  const now = new Date();
  const day = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()) / 1000;
  if (period === "daily") return day;
  if (period === "weekly") return day - ((now.getUTCDay() + 6) % 7) * 86400;
  if (period === "monthly") return Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1) / 1000;
  return 0;
}
// Spend per id of `group` ("key" | "team" | "org") in each budget's current period.
async function spendFor(group, items) {
  const periods = [...new Set(items.filter((i) => i.budget).map((i) => i.budget.period))];
  const spend = new Map();
  await Promise.all(periods.map(async (p) => {
    const page = await usageAll({ group_by: group, since: String(periodStart(p)) });
    for (const r of page.data) spend.set(p + "\u0000" + r.group, r.cost_usd);
  }));
  return (item) => (item.budget ? spend.get(item.budget.period + "\u0000" + item.id) || 0 : null);
}
function budgetCell(item, spent) {
  if (!item.budget) return h("td", { class: "muted" }, "none");
  const frac = item.budget.usd > 0 ? spent / item.budget.usd : 1;
  return h("td", { title: `${fmtUsd(spent)} of ${fmtUsd(item.budget.usd)} ${item.budget.period}` },
    h("span", { class: "bar" + (frac >= 1 ? " over" : "") }, h("span", { style: `width:${Math.min(100, frac * 100).toFixed(1)}%` })),
    `${fmtUsd(spent)} / ${fmtUsd(item.budget.usd)} ${item.budget.period}`);
}
const num = (v) => (v === "" ? undefined : Number(v));
function formValues(form) {
  const out = {};
  for (const el of form.elements) if (el.name) out[el.name] = el.type === "checkbox" ? el.checked : el.value.trim();
  return out;
}
function field(label, name, attrs = {}) {
  return h("label", {}, label, h("input", { name, ...attrs }));
}
function periodSelect(name = "budget_period", value = "monthly") {
  return h("label", {}, "Budget period", h("select", { name }, ["daily", "weekly", "monthly", "total"].map((p) => h("option", { value: p, selected: p === value }, p))));
}

async function keysPage(flash) {
  show(h("h1", {}, "Keys"), h("p", { class: "muted" }, "Loading…"));
  let keys, spentOf;
  try {
    keys = (await api("GET", "/keys" + q({ limit: 1000 }))).data;
    spentOf = await spendFor("key", keys);
  } catch (err) { show(h("h1", {}, "Keys"), errorBox(err)); return; }
  const w = SESSION.can_write;
  const rows = keys.map((k) => {
    const live = k.status !== "revoked";
    const actions = w && live ? h("td", {},
      h("button", { class: "edit", "data-key": k.id, onclick: () => editKey(k) }, "Edit"), " ",
      h("button", { class: "danger revoke", "data-key": k.id, onclick: (e) => {
        const b = e.currentTarget;
        if (b.dataset.armed) return revokeKey(k);
        b.dataset.armed = "1"; b.textContent = "Confirm revoke";
      } }, "Revoke")) : h("td", {});
    return h("tr", { "data-key": k.id, "data-status": k.status },
      h("td", {}, k.name), h("td", { class: "muted" }, k.prefix + "…"), h("td", {}, k.role),
      h("td", {}, k.org + (k.team ? " / " + k.team : "")),
      h("td", {}, h("span", { class: "badge " + k.status }, k.status)),
      h("td", { class: "num" }, k.rpm || "–"), h("td", { class: "num" }, k.tpm || "–"),
      budgetCell(k, spentOf(k)), actions);
  });
  const table = h("div", { class: "card table-wrap" }, h("table", { id: "keys" },
    h("thead", {}, h("tr", {}, ["Name", "Prefix", "Role", "Org / team", "Status"].map((t) => h("th", {}, t)),
      h("th", { class: "num" }, "RPM"), h("th", { class: "num" }, "TPM"), h("th", {}, "Spend vs budget"), h("th", {}, ""))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No keys.")))));
  const create = w ? h("div", { class: "card" }, h("h2", {}, "Create a key"),
    h("form", { class: "inline", id: "create-key", onsubmit: createKey },
      field("Name", "name", { required: true, maxlength: 200 }),
      h("label", {}, "Role", h("select", { name: "role" }, ["member", "viewer", "admin", "service_account"].map((r) => h("option", { value: r }, r)))),
      field("Org", "org", { placeholder: "default" }), field("Team", "team"),
      field("RPM", "rpm", { type: "number", min: 0 }), field("TPM", "tpm", { type: "number", min: 0 }),
      field("Budget USD", "budget_usd", { type: "number", min: 0, step: "any" }), periodSelect(),
      field("Allowed models", "allowed_models", { placeholder: "comma-separated; empty: all" }),
      h("button", { class: "primary", type: "submit" }, "Create"))) : null;
  show(h("h1", {}, "Keys"), flash || null, create, table);
}
async function createKey(e) {
  e.preventDefault();
  const v = formValues(e.target);
  const body = { name: v.name, role: v.role };
  if (v.org) body.org = v.org;
  if (v.team) body.team = v.team;
  if (v.rpm) body.rpm = num(v.rpm);
  if (v.tpm) body.tpm = num(v.tpm);
  if (v.budget_usd) { body.budget_usd = num(v.budget_usd); body.budget_period = v.budget_period; }
  if (v.allowed_models) body.allowed_models = v.allowed_models.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const k = await api("POST", "/keys", body);
    // The plaintext exists only in this answer: shown once, kept nowhere.
    keysPage(h("div", { class: "notice", id: "new-key" }, h("b", {}, `Key “${k.name}” created. `),
      "Copy it now: it will not be shown again.", h("code", { class: "secret", id: "new-key-secret" }, k.key)));
  } catch (err) { e.target.before(errorBox(err)); }
}
async function revokeKey(k) {
  try { await api("DELETE", "/keys/" + encodeURIComponent(k.id)); keysPage(h("div", { class: "notice" }, `Key “${k.name}” revoked.`)); }
  catch (err) { show(errorBox(err)); }
}
function editKey(k) {
  const form = h("form", { class: "inline", id: "edit-key", onsubmit: async (e) => {
    e.preventDefault();
    const v = formValues(form);
    const body = { rpm: num(v.rpm) || 0, tpm: num(v.tpm) || 0, blocked: v.blocked };
    if (v.budget_usd === "") body.budget_usd = null; else { body.budget_usd = num(v.budget_usd); body.budget_period = v.budget_period; }
    try { await api("PATCH", "/keys/" + encodeURIComponent(k.id), body); keysPage(h("div", { class: "notice" }, `Key “${k.name}” updated.`)); }
    catch (err) { form.before(errorBox(err)); }
  } },
    field("RPM", "rpm", { type: "number", min: 0, value: k.rpm }), field("TPM", "tpm", { type: "number", min: 0, value: k.tpm }),
    field("Budget USD", "budget_usd", { type: "number", min: 0, step: "any", value: k.budget ? k.budget.usd : "" }),
    periodSelect("budget_period", k.budget ? k.budget.period : "monthly"),
    h("label", {}, "Blocked", h("input", { type: "checkbox", name: "blocked", checked: k.blocked })),
    h("button", { class: "primary", type: "submit" }, "Save"), h("button", { type: "button", onclick: () => keysPage() }, "Cancel"));
  show(h("h1", {}, "Keys"), h("div", { class: "card" }, h("h2", {}, `Edit “${k.name}” (${k.prefix}…)`),
    k.source === "config" ? h("p", { class: "muted" }, "Declared in the config file: only 'blocked' can change here.") : null, form));
}

async function tenantsPage(flash) {
  show(h("h1", {}, "Orgs & teams"), h("p", { class: "muted" }, "Loading…"));
  let orgs, teams, orgSpend, teamSpend;
  try {
    [orgs, teams] = await Promise.all([api("GET", "/orgs?limit=1000"), api("GET", "/teams?limit=1000")]);
    orgs = orgs.data; teams = teams.data;
    [orgSpend, teamSpend] = await Promise.all([spendFor("org", orgs), spendFor("team", teams)]);
  } catch (err) { show(h("h1", {}, "Orgs & teams"), errorBox(err)); return; }
  const w = SESSION.can_write;
  const del = (kind, item) => (w && !item.read_only ? [
    h("button", { class: "edit", "data-id": item.id, onclick: () => editTenant(kind, item) }, "Edit"), " ",
    h("button", { class: "danger", "data-id": item.id, onclick: async () => {
      try { await api("DELETE", `/${kind}/${encodeURIComponent(item.id)}`); tenantsPage(); } catch (err) { main().prepend(errorBox(err)); }
    } }, "Delete")] : (item.read_only ? h("span", { class: "muted small", title: "declared in the config file" }, "config") : ""));
  const table = (kind, items, spentOf, withOrg) => h("div", { class: "card table-wrap" }, h("h2", {}, kind === "orgs" ? "Organizations" : "Teams"),
    h("table", { id: kind }, h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Name"), withOrg ? h("th", {}, "Org") : null,
      h("th", { class: "num" }, "RPM"), h("th", { class: "num" }, "TPM"), h("th", {}, "Models"), h("th", {}, "Spend vs budget"), h("th", {}, ""))),
    h("tbody", {}, items.length ? items.map((i) => h("tr", { "data-id": i.id }, h("td", {}, i.id), h("td", {}, i.name), withOrg ? h("td", {}, i.org) : null,
      h("td", { class: "num" }, i.rpm || "–"), h("td", { class: "num" }, i.tpm || "–"),
      h("td", { class: "small" }, i.allowed_models ? i.allowed_models.join(", ") : "all"), budgetCell(i, spentOf(i)), h("td", {}, del(kind, i))))
      : h("tr", {}, h("td", { colspan: 8, class: "empty" }, "None.")))));
  const create = (kind) => h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    const body = { id: v.id };
    if (v.name) body.name = v.name;
    if (kind === "teams") body.org = v.org;
    if (v.budget_usd) { body.budget_usd = num(v.budget_usd); body.budget_period = v.budget_period; }
    try { await api("POST", "/" + kind, body); tenantsPage(); } catch (err) { e.target.before(errorBox(err)); }
  } }, field("Id", "id", { required: true }), field("Name", "name"), kind === "teams" ? field("Org", "org", { required: true }) : null,
    field("Budget USD", "budget_usd", { type: "number", min: 0, step: "any" }), periodSelect(),
    h("button", { class: "primary", type: "submit" }, kind === "orgs" ? "Create org" : "Create team"));
  show(h("h1", {}, "Orgs & teams"), flash || null,
    table("orgs", orgs, orgSpend, false), w ? h("div", { class: "card" }, h("h2", {}, "New organization"), create("orgs")) : null,
    table("teams", teams, teamSpend, true), w ? h("div", { class: "card" }, h("h2", {}, "New team"), create("teams")) : null);
}

function editTenant(kind, item) {
  const what = kind === "orgs" ? "org" : "team";
  const form = h("form", { class: "inline", id: "edit-tenant", onsubmit: async (e) => {
    e.preventDefault();
    const v = formValues(form);
    const body = { name: v.name || item.name, rpm: num(v.rpm) || 0, tpm: num(v.tpm) || 0 };
    if (v.budget_usd === "") body.budget_usd = null; else { body.budget_usd = num(v.budget_usd); body.budget_period = v.budget_period; }
    try { await api("PATCH", `/${kind}/${encodeURIComponent(item.id)}`, body); tenantsPage(h("div", { class: "notice" }, `The ${what} “${item.id}” is updated.`)); }
    catch (err) { form.before(errorBox(err)); }
  } },
    field("Name", "name", { value: item.name }),
    field("RPM", "rpm", { type: "number", min: 0, value: item.rpm }), field("TPM", "tpm", { type: "number", min: 0, value: item.tpm }),
    field("Budget USD", "budget_usd", { type: "number", min: 0, step: "any", value: item.budget ? item.budget.usd : "" }),
    periodSelect("budget_period", item.budget ? item.budget.period : "monthly"),
    h("button", { class: "primary", type: "submit" }, "Save"), h("button", { type: "button", onclick: () => tenantsPage() }, "Cancel"));
  show(h("h1", {}, "Orgs & teams"), h("div", { class: "card" }, h("h2", {}, `Edit the ${what} “${item.id}”`), form));
}

const USAGE_COLUMNS = ["group", "name", "bucket", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
  "cached_prompt_tokens", "reasoning_tokens", "cost_usd", "unpriced"];
let usageState = { group_by: "model", since: "7d", until: "", bucket: "" };

async function usagePage() {
  const st = usageState;
  const form = h("form", { class: "inline", id: "usage-form", onsubmit: (e) => { e.preventDefault(); usageState = formValues(form); usagePage(); } },
    h("label", {}, "Group by", h("select", { name: "group_by" }, [["", "(total)"], ["key", "key"], ["team", "team"], ["org", "org"], ["route", "route"], ["model", "model"], ["provider", "provider"]]
      .map(([v, l]) => h("option", { value: v, selected: v === st.group_by }, l)))),
    field("Since", "since", { value: st.since, placeholder: "7d, ISO 8601 or epoch" }),
    field("Until", "until", { value: st.until, placeholder: "now" }),
    h("label", {}, "Per", h("select", { name: "bucket" }, [["", "whole range"], ["hour", "hour"], ["day", "day"]]
      .map(([v, l]) => h("option", { value: v, selected: v === st.bucket }, l)))),
    h("button", { class: "primary", type: "submit" }, "Show"),
    h("button", { type: "button", id: "csv", onclick: () => exportCsv(st) }, "Export CSV"));
  show(h("h1", {}, "Usage"), h("div", { class: "card" }, form), h("p", { class: "muted" }, "Loading…"));
  let page;
  try { page = await usage(st); } catch (err) { show(h("h1", {}, "Usage"), h("div", { class: "card" }, form), errorBox(err)); return; }
  const rows = page.data;
  const chart = st.bucket ? lineChart("Requests", bucketsBetween(page.since, page.until, st.bucket),
    st.group_by ? groupedSeries(rows, (r) => r.requests, 8) : [{ name: "Requests", values: seriesOf(rows, (r) => r.requests) }], { bucket: st.bucket, id: "chart-usage" }) : null;
  const table = h("div", { class: "card table-wrap" }, h("table", { id: "usage" },
    h("thead", {}, h("tr", {}, h("th", {}, st.group_by || "total"), st.bucket ? h("th", {}, st.bucket) : null,
      ["Requests", "Errors", "Prompt", "Completion", "Total tokens", "Cost"].map((t) => h("th", { class: "num" }, t)))),
    h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, h("td", {}, r.name ? `${r.name} (${r.group})` : (r.group ?? "all")),
      st.bucket ? h("td", {}, fmtTime(r.bucket, st.bucket)) : null,
      h("td", { class: "num" }, fmtInt(r.requests)), h("td", { class: "num" }, fmtInt(r.errors)),
      h("td", { class: "num" }, fmtInt(r.prompt_tokens)), h("td", { class: "num" }, fmtInt(r.completion_tokens)),
      h("td", { class: "num" }, fmtInt(r.total_tokens)), h("td", { class: "num" }, fmtUsd(r.cost_usd))))
      : h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No usage in this range.")))),
    page.has_more ? h("p", { class: "muted small" }, "First 1,000 rows shown; the CSV has them all.") : null);
  show(h("h1", {}, "Usage"), h("div", { class: "card" }, form), h("p", { class: "muted small" },
    `${new Date(page.since * 1000).toISOString()} → ${new Date(page.until * 1000).toISOString()}`), chart, table);
}
function csvCell(v) {
  if (v === null || v === undefined) return "";
  let text = String(v);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text; // no formulas when opened in a spreadsheet
  return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}
async function exportCsv(st) {
  const lines = [USAGE_COLUMNS.join(",")];
  let range = {};
  for (let offset = 0, n = 0; n < 100; n++) { // at most 100,000 rows
    const page = await usage({ ...st, ...range, offset });
    range = { since: String(page.since), until: String(page.until) }; // fixed after the first page
    for (const r of page.data) lines.push(USAGE_COLUMNS.map((c) => csvCell(c === "bucket" && r.bucket !== null ? new Date(r.bucket * 1000).toISOString() : r[c])).join(","));
    if (!page.has_more) break;
    offset += page.limit;
  }
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const a = h("a", { href: url, download: `gandalf-usage-${st.group_by || "total"}.csv` });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function providersPage() {
  show(h("h1", {}, "Providers"), h("p", { class: "muted" }, "Loading…"));
  let providers, health, recent;
  try {
    [providers, health, recent] = await Promise.all([api("GET", "/providers?limit=1000"), api("GET", "/providers/health"),
      usageAll({ group_by: "provider", since: "24h", bucket: "hour" })]);
  } catch (err) { show(h("h1", {}, "Providers"), errorBox(err)); return; }
  const hp = new Map(health.data.map((x) => [x.provider, x]));
  const lastHour = Date.now() / 1000 - 3600;
  const stat = new Map();
  for (const r of recent.data) {
    const e = stat.get(r.group) || { requests: 0, errors: 0, hourErrors: 0 };
    e.requests += r.requests; e.errors += r.errors;
    if (r.bucket >= lastHour - 3600) e.hourErrors += r.errors;
    stat.set(r.group, e);
  }
  const rows = providers.data.map((p) => {
    const b = hp.get(p.name), u = stat.get(p.name) || { requests: 0, errors: 0, hourErrors: 0 };
    return h("tr", { "data-provider": p.name }, h("td", {}, p.name), h("td", {}, p.type),
      h("td", {}, p.enabled ? h("span", { class: "badge " + (b ? b.state : "closed") }, b ? b.state.replace("_", "-") : "closed") : h("span", { class: "badge blocked", title: p.disabled_reason || "" }, "disabled")),
      h("td", { class: "num" }, b && b.latency_ms !== null ? b.latency_ms.toFixed(0) + " ms" : "–"),
      h("td", { class: "num" }, b ? fmtPct(b.error_rate) : "–"),
      h("td", { class: "num" }, fmtInt(u.requests)), h("td", { class: "num" }, fmtInt(u.errors)),
      h("td", { class: "num" }, u.requests ? fmtPct(u.errors / u.requests) : "–"),
      h("td", { class: "small muted" }, p.models.join(", ") || "(listed at run time)"));
  });
  const times = bucketsBetween(recent.since, recent.until, "hour");
  show(h("h1", {}, "Providers"), h("div", { class: "card table-wrap" }, h("table", { id: "providers" },
    h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Type"), h("th", {}, "Breaker"), h("th", { class: "num" }, "Latency"),
      h("th", { class: "num" }, "Breaker error rate"), h("th", { class: "num" }, "Requests 24h"), h("th", { class: "num" }, "Errors 24h"),
      h("th", { class: "num" }, "Error rate 24h"), h("th", {}, "Models"))),
    h("tbody", {}, rows)), h("p", { class: "muted small" }, "Breaker state and latency as the worker that answered sees them.")),
    h("div", { class: "grid" }, lineChart("Errors per provider (24h)", times, groupedSeries(recent.data, (r) => r.errors), { id: "chart-provider-errors" }),
      lineChart("Requests per provider (24h)", times, groupedSeries(recent.data, (r) => r.requests), { id: "chart-provider-requests" })));
}

// ------------------------------------------------------------------ shell
const PAGES = { overview, keys: () => keysPage(), tenants: () => tenantsPage(), usage: usagePage, providers: providersPage };
function route() {
  const name = (location.hash || "#overview").slice(1);
  const page = PAGES[name] ? name : "overview";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  document.body.dataset.page = page;
  PAGES[page]();
}
async function start() {
  const res = await fetch("/ui/session", { credentials: "same-origin" });
  if (!res.ok) { location.href = "/ui/login"; return; }
  SESSION = await res.json();
  document.body.classList.toggle("read-only", !SESSION.can_write);
  document.getElementById("who").textContent = `${SESSION.name} (${SESSION.role})`;
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": SESSION.csrf } });
    location.href = "/ui/login";
  });
  window.addEventListener("hashchange", route);
  route();
}
start();
