// The Kaya web console: plain JavaScript, no framework, no build step. It reads the node's
// /v1/admin/* endpoints and the contract's /v1/<entity>/<id>[/events], sending the bearer
// token kept in sessionStorage (`kaya.token`) on every request.
"use strict";

const TOKEN_KEY = "kaya.token";
const REFRESH_MS = 2000;
const PAGE = 50;

const $ = (id) => document.getElementById(id);
let previous = null; // the last status, to turn counters into rates
let timer = null;
let eventsAfter = 0;

// ---- helpers --------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(target, headings, rows) {
  const t = $(target);
  t.replaceChildren(
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length
      ? rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))
      : [el("tr", {}, el("td", { colspan: String(headings.length), class: "muted" }, "none"))]),
  );
}

function say(text, info) {
  const m = $("message");
  m.textContent = text || "";
  m.className = info ? "info" : "";
}

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

function traceId(traceparent) {
  return traceparent ? traceparent.split("-")[1] || "" : "";
}

function num(value, digits) {
  return Number(value || 0).toFixed(digits === undefined ? 0 : digits);
}

async function api(path, options) {
  const opts = options || {};
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  let body;
  try {
    body = await response.json();
  } catch (_) {
    body = { ok: false, error: { code: "internal", message: "HTTP " + response.status } };
  }
  if (!response.ok || body.ok === false) {
    const error = body.error || { code: "internal", message: "HTTP " + response.status };
    const hint = response.status === 401 ? " (give a token above)" : "";
    throw new Error(`${response.status} ${error.code}: ${error.message}${hint}`);
  }
  return body;
}

// ---- tabs -----------------------------------------------------------------------------

const loaders = {
  node: loadNode,
  entities: () => Promise.resolve(),
  sagas: loadSagas,
  dlq: loadDlq,
  schemas: loadSchemas,
};

function show(tab) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === tab);
  }
  for (const s of document.querySelectorAll("main .tab")) {
    s.classList.toggle("active", s.id === tab);
  }
  clearInterval(timer);
  timer = null;
  say("");
  run(loaders[tab]);
  if (tab === "node") timer = setInterval(() => run(loadNode), REFRESH_MS);
  history.replaceState(null, "", "#" + tab);
}

async function run(fn) {
  try {
    await fn();
  } catch (error) {
    say(error.message);
  }
}

// ---- node -----------------------------------------------------------------------------

function card(label, value, cls) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label),
    el("div", { class: "value " + (cls || "") }, value));
}

async function loadNode() {
  const s = await api("/v1/admin/status");
  $("node-name").textContent = s.node;
  const names = $("entity-names");
  if (!names.childElementCount) {
    names.replaceChildren(...s.entities.map((name) => el("option", { value: name })));
  }
  const rates = {};
  let total = 0;
  const span = previous ? s.time - previous.time : 0;
  for (const [outcome, count] of Object.entries(s.commands.by_outcome)) {
    const before = previous ? previous.commands.by_outcome[outcome] || 0 : count;
    rates[outcome] = span > 0 ? (count - before) / span : 0;
    total += rates[outcome];
  }
  previous = s;
  const consumers = Object.entries(s.consumers);
  const lag = consumers.reduce((most, [, c]) => Math.max(most, c.lag), 0);
  $("node-cards").replaceChildren(
    card("status", s.ready ? "ready" : "not ready", s.ready ? "ok" : "bad"),
    card("commands / s", num(total, 1)),
    card("commands (total)", s.commands.total),
    card("in flight", s.ingress.inflight),
    card("loop lag", num(s.ingress.loop_lag_ms, 1) + " ms"),
    card("actors active / busy", `${s.actors.active} / ${s.actors.busy}`),
    card("relay backlog", s.relay.backlog, s.relay.backlog > 1000 ? "warn" : ""),
    card("max consumer lag", lag, lag > 1000 ? "warn" : ""),
    card("last position", s.store.last_position),
    card("uptime", num(s.uptime / 60, 1) + " min"),
  );
  table("node-outcomes", ["outcome", "per second", "total"],
    Object.entries(s.commands.by_outcome).sort()
      .map(([o, n]) => [o, num(rates[o], 1), n]));
  table("node-latency", ["entity", "p50", "p99", "count"],
    Object.entries(s.latency_seconds).sort()
      .map(([e, l]) => [e, num(l.p50 * 1000, 2), num(l.p99 * 1000, 2), l.count]));
  table("node-consumers", ["consumer", "lag", "handled", "retries", "dead letters", "health"],
    consumers.map(([name, c]) => [name, c.lag, c.handled, c.retries, c.dead_letters,
      el("span", { class: c.healthy ? "ok" : "bad" },
        c.stopped ? "stopped: " + c.stopped : c.healthy ? "healthy" : c.last_error)]));
  renderShards(s);
  const problems = [...s.problems, ...s.degraded, ...s.liveness];
  $("node-problems").textContent = problems.length ? "Problems: " + problems.join("; ") : "";
  $("node-problems").className = problems.length ? "bad" : "";
}

function renderShards(s) {
  const mine = new Set(s.cluster.serving);
  const byNode = {};
  for (const [shard, owner] of Object.entries(s.shard_owners)) {
    (byNode[owner.node] = byNode[owner.node] || []).push(Number(shard));
  }
  const rows = Object.entries(byNode).sort().map(([node, shards]) => [
    node + (node === s.node ? " (this node)" : ""),
    shards.length,
    el("div", {}, shards.sort((a, b) => a - b)
      .map((n) => el("span", { class: "shard" + (mine.has(n) ? " mine" : "") }, n))),
  ]);
  const summary = `${s.shards} shards, ${s.cluster.durability} durability;`
    + ` this node serves ${s.cluster.serving.length}, handovers ${s.cluster.handovers}`;
  const t = el("table", { id: "node-shard-table" });
  $("node-shards").replaceChildren(el("p", { class: "muted" }, summary), t);
  table("node-shard-table", ["owner", "shards", ""], rows);
}

// ---- entities -------------------------------------------------------------------------

function entityPath() {
  const entity = encodeURIComponent($("entity-name").value.trim());
  const id = encodeURIComponent($("entity-id").value.trim());
  return `/v1/${entity}/${id}`;
}

async function lookUp(after) {
  const path = entityPath();
  const state = await api(path);
  $("entity-state").textContent = pretty(state);
  const page = await api(`${path}/events?after=${after}&limit=${PAGE}`);
  eventsAfter = page.next === null ? null : page.next;
  $("entity-page").textContent = `(after version ${page.after}; entity at version ${page.version})`;
  table("entity-events", ["version", "type", "recorded at", "trace id", "command id", "data"],
    page.events.map((e) => [
      e.version,
      e.type + (e.schema_version > 1 ? ` v${e.schema_version}` : ""),
      e.recorded_at,
      el("code", {}, traceId(e.traceparent)),
      el("code", {}, e.command_id || ""),
      el("pre", {}, pretty(e.data) + (e.masked ? "\n(sealed values masked)" : "")),
    ]));
  $("events-next").disabled = eventsAfter === null;
}

function openEntity(entity, id) {
  $("entity-name").value = entity;
  $("entity-id").value = id;
  show("entities");
  run(() => lookUp(0));
}

// ---- sagas ----------------------------------------------------------------------------

async function loadSagas() {
  const status = $("saga-status").value;
  const body = await api(`/v1/admin/sagas?status=${status}&limit=200`);
  const c = body.counts;
  $("saga-counts").textContent =
    `in flight ${c.in_flight} · failed ${c.failed} · completed ${c.completed}`;
  table("saga-list", ["saga", "id", "status", "last event", "why", "updated at", "trace id"],
    body.sagas.map((s) => [
      s.entity,
      el("a", { href: "#entities", onclick: (ev) => { ev.preventDefault(); openEntity(s.entity, s.id); } }, s.id),
      el("span", { class: s.status === "failed" ? "bad" : s.status === "completed" ? "ok" : "warn" },
        s.status.replace("_", " ")),
      `${s.last_event} (v${s.version})`,
      s.reason,
      s.updated_at,
      el("code", {}, traceId(s.traceparent)),
    ]));
}

// ---- dead letters -----------------------------------------------------------------------

async function loadDlq() {
  const select = $("dlq-consumer");
  const consumer = select.value;
  const query = consumer ? "?consumer=" + encodeURIComponent(consumer) : "";
  const body = await api("/v1/admin/dlq" + query);
  if (select.options.length === 1) {
    select.append(...body.consumers.map((name) => el("option", { value: name }, name)));
  }
  $("dlq-total").textContent = `${body.letters.length} shown, ${body.total} in KAYA_DLQ`;
  table("dlq-list", ["seq", "time", "consumer", "event", "attempts", "error", ""],
    body.letters.map((l) => [
      l.seq, l.time, l.consumer, l.type, l.attempts, el("code", {}, l.error),
      el("span", {},
        el("button", { type: "button", class: "show", onclick: () => run(() => showLetter(l.seq)) }, "Show"),
        " ",
        el("button", { type: "button", class: "replay", onclick: () => run(() => replay({ seq: l.seq })) }, "Replay")),
    ]));
}

async function showLetter(seq) {
  const letter = await api(`/v1/admin/dlq/${seq}`);
  $("dlq-letter").textContent = pretty(letter);
}

async function replay(which) {
  const out = await api("/v1/admin/dlq/replay", { method: "POST", body: which });
  const failed = Object.entries(out.failed);
  const text = `replayed ${out.replayed.length}, already applied ${out.skipped.length},`
    + ` failed ${failed.length}` + failed.map(([seq, why]) => `; seq ${seq}: ${why}`).join("");
  await loadDlq();
  say(text, failed.length === 0);
}

async function purge() {
  const consumer = $("dlq-consumer").value;
  const what = consumer ? `the dead letters of ${consumer}` : "every dead letter";
  if (!confirm(`Purge ${what}? They are deleted for good.`)) return;
  const body = { confirm: true };
  if (consumer) body.consumer = consumer;
  const out = await api("/v1/admin/dlq/purge", { method: "POST", body });
  await loadDlq();
  say(`purged ${out.purged} dead letters`, true);
}

// ---- schemas --------------------------------------------------------------------------

async function loadSchemas() {
  const body = await api("/v1/admin/schemas");
  const keys = Object.keys(body.schemas);
  $("schema-source").textContent = body.source === "kaya_schemas"
    ? `${keys.length} schemas registered in the kaya_schemas bucket`
    : `${keys.length} schemas of the app (the kaya_schemas bucket is empty)`;
  table("schema-list", ["entity", "kind", "type", "version", "schema"],
    keys.map((key) => {
      const schema = body.schemas[key];
      const meta = schema["x-kaya"] || {};
      return [meta.entity, meta.kind, meta.type, meta.version,
        el("details", {}, el("summary", {}, key), el("pre", {}, pretty(schema)))];
    }));
}

// ---- wiring ---------------------------------------------------------------------------

function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    previous = null;
    show(document.querySelector("#tabs button.active").dataset.tab);
  });
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => show(b.dataset.tab));
  }
  $("entity-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    run(() => lookUp(0));
  });
  $("events-first").addEventListener("click", () => run(() => lookUp(0)));
  $("events-next").addEventListener("click", () => {
    if (eventsAfter !== null) run(() => lookUp(eventsAfter));
  });
  $("saga-status").addEventListener("change", () => run(loadSagas));
  $("sagas-refresh").addEventListener("click", () => run(loadSagas));
  $("dlq-consumer").addEventListener("change", () => run(loadDlq));
  $("dlq-refresh").addEventListener("click", () => run(loadDlq));
  $("dlq-replay-all").addEventListener("click", () => {
    const consumer = $("dlq-consumer").value;
    run(() => replay(consumer ? { consumer } : {}));
  });
  $("dlq-purge").addEventListener("click", () => run(purge));
  const tab = location.hash.slice(1);
  show(tab in loaders ? tab : "node");
}

document.addEventListener("DOMContentLoaded", start);
