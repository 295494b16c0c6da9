// The dashboard's script: polls /dashboard/api/state every second and draws it; fetches each
// stream's latest frame as it changes; calls /v1/streams for the actions. The token (with
// --token) lives in this tab's sessionStorage and goes in the Authorization header only.
// Everything the server sends is put in the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "rle-serving-token";
const $ = (id) => document.getElementById(id);
let previous = null;  // {at, totals: {api: [ok, failed]}}: for requests per second
const cards = new Map();  // stream id -> {root, fields, img, frameIndex, url}

function headers(extra) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return Object.assign(token ? {Authorization: "Bearer " + token} : {}, extra || {});
}

async function call(method, path, body) {
  const options = {method, headers: headers(body ? {"Content-Type": "application/json"} : {})};
  if (body) options.body = JSON.stringify(body);
  const reply = await fetch(path, options);
  if (reply.status === 401) {
    locked(sessionStorage.getItem(TOKEN_KEY) ? "the token was not accepted" : "");
    throw new Error("401");
  }
  return reply;
}

function locked(why) {
  // Nothing of the server's stays on the page without the token.
  $("content").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("server").textContent = "";
  for (const id of [...cards.keys()]) dropCard(id);
  for (const id of ["models", "requests"]) $(id).replaceChildren();
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) tr.append(el("td", cell === null || cell === undefined ? "–" : cell));
  return tr;
}

const pair = (a, b) => `${a ?? "–"} / ${b ?? "–"}`;

function dropCard(id) {
  const card = cards.get(id);
  if (card.url) URL.revokeObjectURL(card.url);
  card.root.remove();
  cards.delete(id);
}

function newCard(id) {
  const root = el("div", null, "stream");
  root.dataset.streamId = id;
  const title = el("h3", id);
  const img = el("img");
  img.alt = "latest frame of " + id;
  const fields = el("table");
  const actions = el("div");
  for (const action of ["pause", "resume", "remove"]) {
    const button = el("button", action);
    button.dataset.action = action;
    button.dataset.stream = id;
    button.addEventListener("click", () => act(action, id));
    actions.append(button);
  }
  root.append(title, img, fields, actions);
  $("streams").append(root);
  const card = {root, fields, img, frameIndex: null, url: null};
  cards.set(id, card);
  return card;
}

async function act(action, id) {
  const path = "/v1/streams/" + encodeURIComponent(id);
  const reply = action === "remove" ? await call("DELETE", path) : await call("POST", path + "/" + action);
  if (!reply.ok) $("status").textContent = `${action} ${id}: ${(await reply.json()).error}`;
  poll();
}

async function showFrame(card, stream) {
  if (stream.frame_index === null || stream.frame_index === card.frameIndex) return;
  card.frameIndex = stream.frame_index;
  const reply = await call("GET", "/dashboard/api/frames/" + encodeURIComponent(stream.stream_id));
  if (!reply.ok) return;
  const url = URL.createObjectURL(await reply.blob());
  if (card.url) URL.revokeObjectURL(card.url);
  card.url = url;
  card.img.src = url;
}

function drawStream(stream) {
  const card = cards.get(stream.stream_id) || newCard(stream.stream_id);
  const state = el("span", stream.state, "state-" + stream.state);
  const sinks = stream.sinks.map((s) => `${s.kind} ${s.url}: ${s.delivered} delivered, ${s.buffered} buffered, ${s.dropped} dropped`);
  const lines = [
    ["source", stream.source], ["model", stream.model], ["state", state],
    ["fps in / out", pair(stream.fps_in, stream.fps_out)], ["frames out", stream.frames_out],
    ["dropped", stream.frames_dropped], ["lag p50 / p99 ms", pair(stream.lag_p50_ms, stream.lag_p99_ms)],
    ["sinks", sinks.length ? sinks.join("; ") : "none"],
  ];
  if (stream.error_code) lines.push(["error code", el("span", stream.error_code, "error")]);
  if (stream.last_error) lines.push(["last error", el("span", stream.last_error, "error")]);
  card.fields.replaceChildren(...lines.map(([name, value]) => {
    const tr = el("tr");
    const td = el("td");
    td.append(value instanceof Node ? value : el("span", value ?? "–"));
    tr.append(el("th", name), td);
    return tr;
  }));
  showFrame(card, stream).catch(() => {});
}

function draw(doc) {
  const s = doc.server;
  $("server").textContent = `version ${s.version} · up ${Math.round(s.uptime_s)} s · ${s.threads} threads ` +
    `(network ${s.network_threads ?? "–"}, workers ${s.worker_threads ?? "–"}) · ` +
    `${s.memory_mb ?? "–"} MB resident${s.draining ? " · draining" : ""}`;
  const seen = new Set(doc.streams.map((x) => x.stream_id));
  for (const id of [...cards.keys()]) if (!seen.has(id)) dropCard(id);
  doc.streams.forEach(drawStream);
  if (!doc.streams.length) $("streams").replaceChildren(el("p", "no camera streams", "muted"));
  else $("streams").querySelectorAll("p.muted").forEach((p) => p.remove());
  if (doc.frames_note) $("status").textContent = doc.frames_note;
  $("models").replaceChildren(...doc.models.map((m) => row([
    m.name, m.reason ? `${m.state}: ${m.reason}` : m.state, m.runtime, m.batch_limit,
    `${m.queued} (${m.executing} running)`, pair(m.queue_p50_ms, m.queue_p99_ms), pair(m.compute_p50_ms, m.compute_p99_ms)])));
  // Rates between two polls; the first poll's are averages since the server started.
  const now = s.uptime_s;
  const totals = Object.fromEntries(doc.requests.map((r) => [r.api, [r.ok, r.failed]]));
  const since = previous || {at: 0, totals: {}};
  const span = Math.max(now - since.at, 1e-3);
  $("requests").replaceChildren(...doc.requests.map((r) => {
    const [ok0, failed0] = since.totals[r.api] || [0, 0];
    const reasons = Object.entries(r.errors).map(([k, v]) => `${k} ${v}`).join(", ");
    return row([r.api, ((r.ok + r.failed - ok0 - failed0) / span).toFixed(1), ((r.failed - failed0) / span).toFixed(1),
                r.ok, r.failed ? `${r.failed} (${reasons})` : 0]);
  }));
  previous = {at: now, totals};
}

async function poll() {
  let reply;
  try {
    reply = await call("GET", "/dashboard/api/state");
  } catch (error) {
    if (error.message !== "401") $("status").textContent = "server unreachable";
    return;
  }
  if (!reply.ok) { $("status").textContent = `state: HTTP ${reply.status}`; return; }
  const doc = await reply.json();
  $("login").hidden = true;
  $("content").hidden = false;
  draw(doc);
  $("status").textContent = doc.frames_note || "updated " + new Date().toLocaleTimeString();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  poll();
});

$("add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const spec = {source: form.get("source"), track: form.get("track") === "on"};
  for (const key of ["model", "stream_id"]) if (form.get(key)) spec[key] = form.get(key);
  if (form.get("max_fps")) spec.max_fps = Number(form.get("max_fps"));
  const reply = await call("POST", "/v1/streams", spec);
  $("add-error").textContent = reply.ok ? "" : (await reply.json()).error;
  if (reply.ok) event.target.reset();
  poll();
});

poll();
setInterval(poll, POLL_MS);
