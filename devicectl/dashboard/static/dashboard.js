// Clinic dashboard: applies the server's snapshot and deltas (Server-Sent Events) and draws them.
// No framework, no build step, no CDN. Everything from the broker is text: it goes into the page
// with textContent only, never as HTML.
"use strict";

const MAX_ALERTS = 100;
const MAX_DEVICE_ALERTS = 20;
const MAX_EVENTS = 12;
const MAX_POINTS = 300;
const INTERLOCK_NAMES = ["estop", "door", "key", "contact", "cooling"];
const SVG_NS = "http://www.w3.org/2000/svg";

const view = {
  devices: new Map(),   // key → device view (see devicectl/dashboard/fleet.py)
  alerts: [],           // newest first
  broker: { connected: false },
  stopEnabled: false,
  seenAlertIds: new Set(),  // acknowledged on this screen
  invalid: { count: 0, last: null },  // messages whose topic ids are not ids: never a device
  pages: { saturated: false, detail: "" },  // the dashboard's open pages, when worth telling
};
const cards = new Map();    // key → { root, body, stopResult, stopButton }
const dirty = new Set();
let renderQueued = false;
let chromeDirty = true;

// ------------------------------------------------------------------------------ DOM helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  const text = Number(value).toFixed(digits);
  return unit ? `${text} ${unit}` : text;
}

// An alert's code, then its message; a breach's message already starts with its code.
function alertText(a) {
  const code = a.code || "";
  const message = a.message || "";
  if (!code) return message;
  if (!message || message.startsWith(code)) return message || code;
  return `${code} — ${message}`;
}

function clock(iso) {
  if (!iso) return "—";
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return iso;
  return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function testId(key) {
  return "device-" + key.replace(/[^A-Za-z0-9_-]/g, "-");
}

// ------------------------------------------------------------------------------ the model

function reset(snapshot) {
  if (view.stopEnabled !== Boolean(snapshot.stop_enabled)) {
    for (const card of cards.values()) card.root.remove();
    cards.clear();
  }
  view.devices.clear();
  for (const device of snapshot.devices) view.devices.set(device.key, device);
  view.alerts = snapshot.alerts.slice(0, MAX_ALERTS);
  view.broker = snapshot.broker;
  view.invalid = snapshot.invalid || { count: 0, last: null };
  view.pages = snapshot.pages || { saturated: false, detail: "" };
  view.stopEnabled = Boolean(snapshot.stop_enabled);
  document.getElementById("title").textContent = snapshot.title || "Clinic lasers";
  document.title = snapshot.title || "Clinic lasers";
  for (const [key, card] of cards) {
    if (!view.devices.has(key)) { card.root.remove(); cards.delete(key); }
  }
  for (const key of view.devices.keys()) dirty.add(key);
  chromeDirty = true;
}

function blankDevice(key) {
  const [site, device] = key.split("/");
  return { key, site, device, availability: "unknown", state: null, session: null, metrics: null,
    skin_temp: [], skin_temp_limit_c: 41, history_ms: 120000, alerts: [], events: [], missed: {},
    pulse_gaps: 0, malformed: 0 };
}

function apply(op) {
  switch (op.op) {
    case "device": {
      const device = view.devices.get(op.key) || blankDevice(op.key);
      Object.assign(device, op.fields);
      view.devices.set(op.key, device);
      dirty.add(op.key);
      break;
    }
    case "skin_temp": {
      const device = view.devices.get(op.key);
      if (!device) break;
      const points = device.skin_temp;
      if (points.length && points[points.length - 1][0] >= op.point[0]) break;
      points.push(op.point);
      const oldest = op.point[0] - (device.history_ms || 120000);
      while (points.length > MAX_POINTS || (points.length && points[0][0] < oldest)) points.shift();
      dirty.add(op.key);
      break;
    }
    case "alert": {
      const alert = op.alert;
      if (!view.alerts.some((a) => a.id === alert.id)) {
        view.alerts.unshift(alert);
        view.alerts.length = Math.min(view.alerts.length, MAX_ALERTS);
      }
      const device = view.devices.get(alert.key);
      if (device && !device.alerts.some((a) => a.id === alert.id)) {
        device.alerts.unshift(alert);
        device.alerts.length = Math.min(device.alerts.length, MAX_DEVICE_ALERTS);
        dirty.add(alert.key);
      }
      chromeDirty = true;
      break;
    }
    case "event": {
      const device = view.devices.get(op.key);
      if (!device) break;
      device.events.unshift(op.event);
      device.events.length = Math.min(device.events.length, MAX_EVENTS);
      dirty.add(op.key);
      break;
    }
    case "broker":
      view.broker = op.broker;
      chromeDirty = true;
      break;
    case "remove": {
      // Evicted for a newer device: the dashboard tracks a bounded number.
      view.devices.delete(op.key);
      const card = cards.get(op.key);
      if (card) { card.root.remove(); cards.delete(op.key); }
      break;
    }
    case "pages":
      view.pages = op.pages;
      chromeDirty = true;
      break;
    case "invalid":
      view.invalid = op.invalid;
      chromeDirty = true;
      break;
    default:
      break;
  }
}

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  const run = () => {
    if (!renderQueued) return;
    renderQueued = false;
    render();
  };
  // Animation frames pause in a hidden tab; the timer keeps the view (and the title) current.
  requestAnimationFrame(run);
  setTimeout(run, 250);
}

// ------------------------------------------------------------------------------ rendering

function render() {
  const container = document.getElementById("devices");
  for (const key of [...view.devices.keys()].sort()) {
    if (!cards.has(key)) {
      const card = makeCard(key);
      cards.set(key, card);
      const next = [...cards.keys()].sort().find((k) => k > key && cards.get(k).root.isConnected);
      container.insertBefore(card.root, next ? cards.get(next).root : null);
    }
  }
  for (const key of dirty) {
    const device = view.devices.get(key);
    if (device && cards.has(key)) renderDevice(cards.get(key), device);
  }
  dirty.clear();
  document.getElementById("empty").hidden = view.devices.size > 0;
  if (chromeDirty) {
    renderChrome();
    chromeDirty = false;
  }
}

function makeCard(key) {
  const root = el("article", { class: "device", "data-testid": testId(key), "data-key": key });
  const head = el("header");
  const body = el("div", { class: "body" });
  root.append(head, body);
  const card = { root, head, body, stopButton: null, stopResult: null };
  if (view.stopEnabled) {
    card.stopButton = el("button", { type: "button", class: "stop-btn", "data-testid": "stop-button" },
      "Stop emission");
    card.stopResult = el("span", { class: "stop-result", "data-testid": "stop-result", role: "status" });
    card.stopButton.addEventListener("click", () => askStop(key, card));
    root.append(el("section", { class: "stop", "data-testid": "stop-section" },
      card.stopButton, card.stopResult));
  }
  return card;
}

function renderDevice(card, d) {
  const state = d.state;
  const offline = d.availability !== "online";
  card.root.classList.toggle("offline", offline);
  card.root.dataset.availability = d.availability;
  card.root.dataset.state = state && state.state ? state.state : "";
  const recentAlert = d.alerts.find((a) => a.rank >= 2 && !view.seenAlertIds.has(a.id));
  card.root.classList.toggle("alerting", Boolean(recentAlert));

  const availClass = d.availability === "online" ? "good" : d.availability === "offline" ? "bad" : "unknown";
  card.head.replaceChildren(...[
    el("h2", {}, d.device),
    el("span", { class: "site" }, d.site),
    el("span", { class: `pill ${availClass}`, "data-testid": "availability" }, d.availability.toUpperCase()),
    state && state.state
      ? el("span", { class: `pill state-${state.state}`, "data-testid": "state" }, state.state)
      : null,
    state && state.armed ? el("span", { class: "pill armed", "data-testid": "armed" }, "ARMED") : null,
  ].filter(Boolean));

  const parts = [];
  if (offline) {
    parts.push(el("p", { class: "stale-note", "data-testid": "stale-note" },
      d.availability === "offline"
        ? `Offline since ${clock(d.availability_at)} — last known state below.`
        : "Availability not known yet."));
  }
  if (state) {
    const open = new Set(state.interlocks_open || []);
    const names = [...new Set([...(state.interlocks || INTERLOCK_NAMES), ...open])];
    parts.push(el("div", { class: "row", "data-testid": "interlocks" },
      el("span", { class: "label" }, "Interlocks"),
      state.interlocks_open === null
        ? el("span", { class: "muted" }, "not reported")
        : names.map((n) => el("span", { class: `chip ${open.has(n) ? "open" : "closed"}` },
            open.has(n) ? `${n} OPEN` : n))));
    if (state.faults && state.faults.length) {
      parts.push(el("div", { class: "row", "data-testid": "faults" },
        el("span", { class: "label" }, "Faults"),
        state.faults.map((f) => el("span", { class: "chip fault" }, f))));
    }
    const p = state.params;
    parts.push(el("div", { class: "row params" },
      el("span", { class: "label" }, "Parameters"),
      p ? `${fmt(p.energy_mj, 1, "mJ")} · ${fmt(p.width_ms, 2, "ms")} · ${fmt(p.rate_hz, 1, "Hz")} · spot ${fmt(p.spot_um, 0, "µm")}`
        : "not set"));
  }
  parts.push(renderSession(d));
  parts.push(renderTemperatures(d));
  const health = [];
  const missed = Object.entries(d.missed || {}).filter(([, n]) => n > 0);
  if (missed.length) {
    const total = missed.reduce((sum, [, n]) => sum + n, 0);
    health.push(`${total} telemetry message(s) missed (${missed.map(([k, n]) => `${k} ${n}`).join(", ")})`);
  }
  if (d.pulse_gaps) health.push(`${d.pulse_gaps} pulse number(s) missing between batches`);
  if (d.malformed) {
    health.push(`${d.malformed} unreadable message(s) from ${d.key}: ${d.last_malformed || ""}`);
  }
  if (d.restarts) health.push(`${d.restarts} restart(s) of its counters (${d.last_restart || ""})`);
  if (health.length) parts.push(el("p", { class: "health", "data-testid": "health" }, health.join(" · ")));
  if (d.alerts.length) {
    parts.push(el("ul", { class: "mini-list", "data-testid": "device-alerts" },
      d.alerts.slice(0, 3).map((a) => el("li", { class: `alert ${a.severity}` },
        `${clock(a.ts)} ${a.severity.toUpperCase()} ${alertText(a)}`))));
  }
  if (d.events.length) {
    parts.push(el("ul", { class: "mini-list muted", "data-testid": "events" },
      d.events.slice(0, 4).map((e) => el("li", {},
        `${clock(e.ts)} ${e.event}${e.zone ? " · " + e.zone : ""}${e.detail ? " · " + e.detail : ""}`))));
  }
  card.body.replaceChildren(...parts.filter(Boolean));
  if (card.stopButton) {
    // cmd/stop is not retained: a device that is not online would never receive it.
    card.stopButton.disabled = !view.stopEnabled || card.stopPending === true || offline;
    card.stopButton.title = offline ? "The device is not online: stop it at the device." : "";
  }
}

function bar(fraction) {
  const wrap = el("div", { class: "bar" });
  const fill = el("span");
  if (fraction === null) {
    fill.style.width = "0%";
  } else {
    fill.style.width = `${Math.min(100, Math.max(0, fraction * 100)).toFixed(1)}%`;
    if (fraction >= 1) wrap.classList.add("over");
    else if (fraction >= 0.8) wrap.classList.add("near");
  }
  wrap.append(fill);
  return wrap;
}

function renderSession(d) {
  const s = d.session;
  if (!s) return el("div", { class: "session muted", "data-testid": "session" }, "No session open.");
  const zones = (s.zones || []).map((z) => {
    const fraction = z.limit_j ? z.energy_j / z.limit_j : null;
    return el("div", { class: `bar-row${z.current ? " current" : ""}`, "data-testid": "zone-bar", "data-zone": z.zone },
      el("span", { class: "zone-name" }, z.zone),
      bar(fraction),
      el("span", { class: "bar-text" },
        z.limit_j ? `${fmt(z.energy_j, 1)} / ${fmt(z.limit_j, 0)} J` : `${fmt(z.energy_j, 2)} J`));
  });
  const total = s.energy_limit_j
    ? el("div", { class: "bar-row", "data-testid": "session-bar" },
        el("span", { class: "zone-name" }, "session"), bar(s.energy_j / s.energy_limit_j),
        el("span", { class: "bar-text" }, `${fmt(s.energy_j, 1)} / ${fmt(s.energy_limit_j, 0)} J`))
    : null;
  return el("div", { class: "session", "data-testid": "session" },
    el("div", { class: "who" },
      el("span", {}, el("span", { class: "label" }, "Session "), s.id || "—"),
      el("span", {}, el("span", { class: "label" }, "Operator "), el("b", { "data-testid": "operator" }, s.operator || "—")),
      s.patient ? el("span", {}, el("span", { class: "label" }, "Patient "), s.patient) : null,
      s.skin_type ? el("span", {}, el("span", { class: "label" }, "Skin type "), s.skin_type) : null),
    el("div", { class: "kpis" },
      el("div", { class: "kpi" }, el("small", {}, "Pulses"), el("span", { class: "big", "data-testid": "pulses" }, String(s.pulses))),
      el("div", { class: "kpi" }, el("small", {}, "Energy"), el("span", { class: "big" }, fmt(s.energy_j, 1, "J"))),
      el("div", { class: "kpi" }, el("small", {}, "Zone"), el("span", { class: "big", "data-testid": "zone" }, s.zone || "—"))),
    total,
    el("div", { class: "zones", "data-testid": "zone-bars" }, zones));
}

function renderTemperatures(d) {
  const m = d.metrics;
  const limit = d.skin_temp_limit_c;
  const skin = m ? m.skin_temp_c : null;
  return el("div", { class: "temperatures" },
    el("div", { class: "temps" },
      el("div", { class: "kpi" }, el("small", {}, "Skin"),
        el("span", { class: `big${skin !== null && skin >= limit ? " temp-hot" : ""}`, "data-testid": "skin-temp" }, fmt(skin, 1, "°C"))),
      el("div", { class: "kpi" }, el("small", {}, "Head"), fmt(m && m.head_temp_c, 1, "°C")),
      el("div", { class: "kpi" }, el("small", {}, "Rate"), fmt(m && m.rate_hz, 1, "Hz")),
      el("div", { class: "kpi" }, el("small", {}, "Avg power"), fmt(m && m.avg_power_w, 2, "W"))),
    skinChart(d.skin_temp, limit, d.history_ms || 120000));
}

function skinChart(points, limit, windowMs) {
  const W = 600, H = 120, left = 34, right = 6, top = 8, bottom = 16;
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`,
    role: "img", "aria-label": "skin temperature, last two minutes", "data-testid": "skin-chart" });
  const values = points.map((p) => p[1]);
  const lo = Math.floor(Math.min(30, ...values) - 0.5);
  const hi = Math.ceil(Math.max(limit + 1, ...values) + 0.5);
  const y = (c) => top + (H - top - bottom) * (1 - (c - lo) / (hi - lo));
  const end = points.length ? points[points.length - 1][0] : 0;
  const x = (t) => left + (W - left - right) * (1 - (end - t) / windowMs);
  chart.append(
    svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom }),
    svg("line", { class: "limit", x1: left, y1: y(limit), x2: W - right, y2: y(limit) }),
    svg("text", { class: "limit-text", x: left + 2, y: y(limit) - 2 }, `limit ${limit.toFixed(1)} °C`),
    svg("text", { x: 0, y: y(hi) + 10 }, `${hi}°`),
    svg("text", { x: 0, y: y(lo) }, `${lo}°`),
    svg("text", { x: W - right - 70, y: H - 2 }, `last ${Math.round(windowMs / 1000)} s`),
  );
  if (points.length) {
    chart.append(svg("polyline", { class: "trace",
      points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
  }
  return chart;
}

function renderChrome() {
  const broker = document.getElementById("broker");
  broker.textContent = view.broker.connected ? "broker: connected" : "broker: unreachable";
  broker.className = `pill ${view.broker.connected ? "good" : "bad"}`;
  broker.title = view.broker.detail || "";

  const pages = document.getElementById("pages");
  pages.hidden = !view.pages.detail;
  pages.textContent = view.pages.detail || "";
  pages.className = `pill ${view.pages.saturated ? "bad" : "warn"}`;

  const list = document.getElementById("alert-list");
  list.replaceChildren(...view.alerts.map((a) => el("li", { class: a.severity, "data-id": a.id },
    el("span", { class: "when" }, clock(a.ts)),
    el("span", { class: "sev" }, a.severity),
    el("b", {}, `${a.device} `),
    el("span", { class: "muted" }, `(${a.site}) `),
    alertText(a),
    a.value !== null && a.value !== undefined ? ` · value ${a.value}${a.limit !== null && a.limit !== undefined ? ` / limit ${a.limit}` : ""}` : "",
    a.historical ? " · delivered late" : "",
    a.order === "duplicate" ? " · repeated" : a.order === "restart" ? " · after a restart" : "")));
  document.getElementById("no-alerts").hidden = view.alerts.length > 0;

  const invalid = document.getElementById("invalid-ids");
  invalid.hidden = !view.invalid.count;
  invalid.textContent = view.invalid.count
    ? `${view.invalid.count} message(s) with invalid site/device ids, not shown as devices ` +
      `(last: ${view.invalid.last || ""})`
    : "";

  const unseen = view.alerts.filter((a) => a.rank >= 1 && !view.seenAlertIds.has(a.id));
  const banner = document.getElementById("alert-banner");
  if (!unseen.length) {
    banner.hidden = true;
    document.title = document.getElementById("title").textContent;
    return;
  }
  const newest = unseen[0];
  banner.hidden = false;
  banner.className = `banner ${newest.rank >= 2 ? "critical" : "warning"}`;
  banner.dataset.severity = newest.severity;
  document.getElementById("banner-title").textContent =
    `${newest.severity.toUpperCase()} — ${newest.device} (${newest.site}): `;
  document.getElementById("banner-message").textContent =
    alertText(newest);
  document.getElementById("banner-more").textContent =
    unseen.length > 1 ? `+${unseen.length - 1} more` : "";
  document.title = `⚠ ALERT — ${document.getElementById("title").textContent}`;
}

// ------------------------------------------------------------------------------ stop

let stopTarget = null;

function askStop(key, card) {
  const device = view.devices.get(key);
  if (!device) return;
  // The device and the site exactly as the card shows them, one per line.
  stopTarget = { key, card, site: device.site, device: device.device };
  document.getElementById("stop-device").textContent = device.device;
  document.getElementById("stop-site").textContent = device.site;
  document.getElementById("stop-dialog").showModal();
}

async function sendStop(key, card, site, device) {
  card.stopPending = true;
  card.stopButton.disabled = true;
  card.stopResult.textContent = "Sending stop…";
  try {
    const response = await fetch(
      `/api/devices/${encodeURIComponent(site)}/${encodeURIComponent(device)}/stop`,
      { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ confirm: true, site, device }) });
    const body = await response.json().catch(() => ({}));
    card.stopResult.textContent = response.ok
      ? `Stop sent at ${new Date().toLocaleTimeString()} — watch the state above.`
      : `Stop NOT sent: ${body.error || response.statusText}`;
  } catch (error) {
    card.stopResult.textContent = `Stop NOT sent: ${error}`;
  } finally {
    card.stopPending = false;
    const device = view.devices.get(key);
    card.stopButton.disabled = !view.stopEnabled || !device || device.availability !== "online";
  }
}

// ------------------------------------------------------------------------------ wiring

// While the page has no live stream (refused because every slot holds a page that reads,
// evicted, or reconnecting), it fetches the whole view every second instead: an alarm reaches
// the screen within a second however the stream slots are held.
const POLL_MS = 1000;
let live = false;
let polling = null;

async function pollSnapshot() {
  polling = null;
  if (live) return;
  try {
    const response = await fetch("/api/snapshot", { cache: "no-store" });
    if (response.ok) {
      const snapshot = await response.json();
      if (!live) {  // a stream's snapshot arrived meanwhile: it is newer
        reset(snapshot);
        scheduleRender();
      }
    }
  } catch (error) {
    // The dashboard is unreachable: the pill says reconnecting; try again.
  }
  if (!live && polling === null) polling = setTimeout(pollSnapshot, POLL_MS);
}

function notLive() {
  live = false;
  if (polling === null) polling = setTimeout(pollSnapshot, 0);
}

function connect() {
  const stream = document.getElementById("stream");
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (event) => {
    live = true;
    if (polling !== null) { clearTimeout(polling); polling = null; }
    reset(JSON.parse(event.data));
    stream.textContent = "page: live";
    stream.className = "pill good";
    stream.title = "";
    scheduleRender();
  });
  source.addEventListener("delta", (event) => {
    for (const op of JSON.parse(event.data)) apply(op);
    scheduleRender();
  });
  // The dashboard drops a stream that does not show it reads: answer every ping with its token.
  source.addEventListener("ping", (event) => {
    fetch("/events/ack", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: JSON.parse(event.data) }) }).catch(() => {});
  });
  source.addEventListener("bye", (event) => {
    // The dashboard ended this stream (evicted, or not reading): EventSource reconnects.
    notLive();
    stream.textContent = "page: reconnecting…";
    stream.className = "pill bad";
    stream.title = JSON.parse(event.data).reason || "";
  });
  source.addEventListener("error", () => {
    notLive();
    stream.textContent = "page: reconnecting…";
    stream.className = "pill bad";
    if (source.readyState === EventSource.CLOSED) {
      // Refused (every page slot held by pages that read): EventSource gives up; try again.
      stream.title = "the dashboard has no room for another page right now: the view is " +
        "fetched every second meanwhile";
      setTimeout(connect, 5000);
    }
    // Otherwise EventSource reconnects by itself; the next snapshot replaces everything.
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("banner-ack").addEventListener("click", () => {
    for (const a of view.alerts) view.seenAlertIds.add(a.id);
    for (const key of view.devices.keys()) dirty.add(key);
    chromeDirty = true;
    scheduleRender();
  });
  const dialog = document.getElementById("stop-dialog");
  dialog.addEventListener("close", () => {
    const target = stopTarget;
    stopTarget = null;
    if (dialog.returnValue === "confirm" && target) {
      sendStop(target.key, target.card, target.site, target.device);
    }
  });
  connect();
});
