// iotpipe live fleet page. Plain JavaScript, no build step; uPlot is vendored beside it.
//
// Data flow: the relay's /v1/live WebSocket (subscribe-all) -> a queue of reading frames ->
// one flush per animation frame that updates the device map and touches only the table rows
// that are on screen. So 10,000 devices sending cost one DOM pass per frame, never one DOM
// write per reading. Class, location and labels come from the relay's registry
// (/api/devices, in batches), a device's history from storage (/api/history), pipeline
// health from the tiers' metrics (/api/health).
(() => {
  "use strict";

  const params = new URLSearchParams(location.search);
  const TOKEN = params.get("token") || "";
  const STALE_MS = 1000 * Number(params.get("stale") || 30); // silent this long: stale
  const MAX_ROWS = 200; // rows drawn at once; the filters narrow the rest
  const CHART_POINTS = 2000; // points kept per device chart
  const HISTORY_LIMIT = 600;
  const META_BATCH = 200; // ids per /api/devices request (the relay's limit)
  const collator = new Intl.Collator(undefined, { numeric: true });

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  function apiUrl(path, query) {
    const url = new URL(path, location.href);
    for (const [k, v] of Object.entries(query || {})) url.searchParams.set(k, v);
    if (TOKEN) url.searchParams.set("token", TOKEN);
    return url.toString();
  }

  async function getJson(path, query) {
    const response = await fetch(apiUrl(path, query), { cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const why = body && body.error ? `${body.error}: ${body.detail || ""}` : response.statusText;
      const error = new Error(`${path}: HTTP ${response.status} ${why}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // -- state ------------------------------------------------------------------------------

  const devices = new Map(); // id -> device record
  let pending = []; // reading frames received since the last flush
  let flushScheduled = false;
  let tableDirty = true; // membership, metadata or filters changed: re-filter and re-sort
  let filtersChanged = false; // the user's change: redraw at once
  let lastRebuild = 0;
  const REBUILD_MS = 300;
  const FLASH_MAX = 10; // rows flashed in one frame at most // new devices and metadata re-sort the table at most this often
  const dirty = new Set(); // devices whose visible row needs new values
  const needMeta = new Set();
  let metaBusy = false;
  let received = 0; // readings since the last rate tick
  let rate = 0;
  const latencies = new Float64Array(1024);
  let latencyCount = 0;
  let visible = []; // devices with a row on screen, in order
  const filter = { cls: "", loc: "", label: "", prefix: "", staleOnly: false };

  function device(id) {
    let d = devices.get(id);
    if (!d) {
      d = { id, cls: "…", loc: "…", labels: {}, meta: false, data: null, ts: 0, seen: 0,
            count: 0, row: null, cells: null, onScreen: false };
      devices.set(id, d);
      needMeta.add(id);
      tableDirty = true;
    }
    return d;
  }

  // -- the live connection ----------------------------------------------------------------

  let ws = null;
  let attempt = 0;
  let everOpened = false;

  function setConn(state, text) {
    const node = $("conn");
    node.className = `conn conn-${state}`;
    node.dataset.state = state;
    node.textContent = text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/v1/live` +
      (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
    setConn(attempt ? "reconnecting" : "connecting", attempt ? "reconnecting…" : "connecting…");
    const socket = new WebSocket(url);
    ws = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      if (everOpened) notice("reconnect", "reconnected to the relay: the live stream goes on " +
                             "(readings sent while disconnected are in storage, not here)");
      everOpened = true;
      attempt = 0;
      setConn("open", "live");
      socket.send(JSON.stringify({ op: "subscribe", all: true }));
    };
    socket.onmessage = (message) => {
      let frame;
      try { frame = JSON.parse(message.data); } catch (_) { return; }
      switch (frame.event) {
        case "reading": pending.push(frame); schedule(); break;
        case "gap": onGap(frame); break;
        case "reset":
          notice("reset", `reset: middle ${frame.source} started its log afresh ` +
                          `(its last sequence number was ${frame.last_seq})`);
          break;
        case "error": notice("gap", `relay error: ${frame.reason}: ${frame.detail || ""}`); break;
        default: break; // subscribed / unsubscribed
      }
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      attempt += 1;
      const delay = Math.min(10000, 250 * 2 ** Math.min(attempt, 6)) * (0.8 + 0.4 * Math.random());
      const why = event.code === 4008 ? " (this page was too slow to read)" :
        event.code === 1001 ? " (relay going away)" : "";
      setConn("reconnecting", `disconnected${why}: retrying in ${(delay / 1000).toFixed(1)} s`);
      if (!opened) explainRefusal();
      setTimeout(connect, delay);
    };
  }

  // A refused WebSocket handshake shows no reason in the browser: ask the API, which
  // checks the same token, and show its answer.
  async function explainRefusal() {
    try {
      await getJson("/api/devices", {});
    } catch (error) {
      if (error.status === 401) {
        setConn("error", `token refused (${error.message.split("HTTP 401 ")[1] || "401"}); ` +
                         "open the URL that `iotpipe up` printed");
      }
    }
  }

  function onGap(frame) {
    if (frame.reason === "slow_client") {
      notice("gap", `gap: the relay dropped ${frame.missed} readings for this page ` +
                    "(it read too slowly)");
    } else {
      notice("gap", `gap: ${frame.missed} readings lost between middle ${frame.source} and ` +
                    `the relay (seq ${frame.from_seq}–${frame.to_seq}); storage has them`);
    }
  }

  function notice(kind, text) {
    const box = $("notices");
    const item = el("div", `notice ${kind}`);
    item.dataset.kind = kind;
    item.append(el("time", "", new Date().toLocaleTimeString()), text);
    box.prepend(item);
    while (box.children.length > 6) box.lastElementChild.remove();
  }

  // -- batching: one flush per animation frame --------------------------------------------

  function schedule() {
    if (flushScheduled) return;
    flushScheduled = true;
    // A hidden tab gets no animation frames: flush on a timer then, so memory stays flat.
    if (document.hidden) setTimeout(flush, 250);
    else requestAnimationFrame(flush);
  }

  function flush() {
    flushScheduled = false;
    const batch = pending;
    pending = [];
    const now = Date.now();
    for (const frame of batch) {
      const d = device(frame.device);
      d.data = frame.data;
      d.ts = frame.ts;
      d.seen = now;
      d.count += 1;
      if (d.onScreen) dirty.add(d);
      if (frame.received) {
        latencies[latencyCount % latencies.length] = now - frame.received / 1e6;
        latencyCount += 1;
      }
      if (frame.device === chart.device) chartAdd(frame.ts, frame.data, "live");
    }
    received += batch.length;
    // Re-filtering and sorting 10,000 devices costs milliseconds: do it when the user asks,
    // and otherwise at most every REBUILD_MS while new devices keep arriving.
    if (tableDirty && (filtersChanged || now - lastRebuild >= REBUILD_MS)) {
      rebuildTable();
    } else {
      if (tableDirty) setTimeout(schedule, REBUILD_MS - (now - lastRebuild));
      // A flash marks a row that changed; when many change at once every frame would
      // repaint the whole table for nothing, so busy frames skip it.
      const flash = dirty.size <= FLASH_MAX;
      for (const d of dirty) fillRow(d, flash);
    }
    dirty.clear();
    if (chart.dirty) chartDraw();
    requestMeta();
  }

  // -- device table -----------------------------------------------------------------------

  function matches(d, now) {
    if (filter.cls && d.cls !== filter.cls) return false;
    if (filter.loc && d.loc !== filter.loc) return false;
    if (filter.prefix && !d.id.startsWith(filter.prefix)) return false;
    if (filter.staleOnly && now - d.seen < STALE_MS) return false;
    if (filter.label) {
      const [key, ...rest] = filter.label.split("=");
      const value = rest.join("=");
      if (!(key in d.labels)) return false;
      if (rest.length && d.labels[key] !== value) return false;
    }
    return true;
  }

  function rowFor(d) {
    if (!d.row) {
      const row = el("tr");
      row.dataset.device = d.id;
      const cells = [];
      for (let i = 0; i < 6; i++) cells.push(row.appendChild(el("td", i === 5 ? "data" : "")));
      cells[0].textContent = d.id;
      d.row = row;
      d.cells = cells;
    }
    return d.row;
  }

  function formatData(data) {
    if (!data || typeof data !== "object") return "";
    const parts = [];
    for (const [k, v] of Object.entries(data)) {
      parts.push(`${k}=${typeof v === "number" ? +v.toFixed(4) : v}`);
    }
    return parts.join("  ");
  }

  function age(ms) {
    if (ms < 1500) return "now";
    if (ms < 120000) return `${Math.round(ms / 1000)} s ago`;
    return `${Math.round(ms / 60000)} min ago`;
  }

  function fillRow(d, flash) {
    if (!d.onScreen) return;
    const now = Date.now();
    const c = d.cells;
    c[1].textContent = d.cls;
    c[2].textContent = d.loc;
    c[3].textContent = d.seen ? age(now - d.seen) : "never";
    c[4].textContent = String(d.count);
    c[5].textContent = formatData(d.data);
    d.row.className = (now - d.seen < STALE_MS ? "online" : "stale") +
      (d.id === chart.device ? " selected" : "");
    if (flash && d.row.animate) {
      d.row.animate([{ background: "#27425f" }, { background: "transparent" }], 600);
    }
  }

  function rebuildTable() {
    tableDirty = false;
    filtersChanged = false;
    lastRebuild = Date.now();
    const now = Date.now();
    const matched = [];
    for (const d of devices.values()) if (matches(d, now)) matched.push(d);
    matched.sort((a, b) => collator.compare(a.id, b.id));
    const shown = matched.slice(0, MAX_ROWS);
    for (const d of visible) d.onScreen = false;
    for (const d of shown) d.onScreen = true;
    visible = shown;
    const rows = shown.map(rowFor);
    for (const d of shown) fillRow(d, false);
    $("devices").tBodies[0].replaceChildren(...rows);
    const more = matched.length > shown.length ?
      ` (first ${shown.length}: narrow the filters to see others)` : "";
    $("shown").textContent = `${matched.length} of ${devices.size} devices${more}`;
    $("shown").dataset.matched = String(matched.length);
  }

  function readFilters() {
    filter.cls = $("f-class").value;
    filter.loc = $("f-location").value;
    filter.label = $("f-label").value.trim();
    filter.prefix = $("f-prefix").value.trim();
    filter.staleOnly = $("f-stale").checked;
    tableDirty = true;
    filtersChanged = true;
    schedule();
  }
  for (const id of ["f-class", "f-location", "f-stale"]) $(id).addEventListener("change", readFilters);
  for (const id of ["f-label", "f-prefix"]) $(id).addEventListener("input", readFilters);
  $("filters").addEventListener("submit", (event) => event.preventDefault());

  $("devices").tBodies[0].addEventListener("click", (event) => {
    const row = event.target.closest("tr");
    if (row && row.dataset.device) selectDevice(row.dataset.device);
  });

  // -- registry metadata ------------------------------------------------------------------

  async function requestMeta() {
    if (metaBusy || needMeta.size === 0) return;
    metaBusy = true;
    const ids = [];
    for (const id of needMeta) {
      ids.push(id);
      if (ids.length >= META_BATCH) break;
    }
    for (const id of ids) needMeta.delete(id);
    let retry = false;
    try {
      const body = await getJson("/api/devices", { ids: ids.join(",") });
      for (const [id, info] of Object.entries(body.devices || {})) {
        const d = devices.get(id);
        if (!d) continue;
        d.cls = info.class;
        d.loc = info.location;
        d.labels = info.labels || {};
        d.meta = true;
      }
      tableDirty = true;
      schedule();
    } catch (_) {
      for (const id of ids) needMeta.add(id);
      retry = true;
    } finally {
      metaBusy = false;
    }
    if (retry) setTimeout(requestMeta, 2000);
    else if (needMeta.size) requestMeta();
  }

  // Devices the registry lists but that have not sent while the page is open are shown as
  // stale ("never"): a fleet page must show the silent ones too. Checked again now and then,
  // since the registry file is reloaded when it changes.
  async function loadRegistry() {
    try {
      const body = await getJson("/api/registry");
      for (const [id, info] of Object.entries(body.devices || {})) {
        const d = device(id);
        d.cls = info.class;
        d.loc = info.location;
        d.labels = info.labels || {};
        d.meta = true;
        needMeta.delete(id);
      }
      if (body.truncated) notice("gap", "the registry lists more devices than this page loads; " +
                                        "the others appear when they send");
      tableDirty = true;
      schedule();
    } catch (_) {
      // The live stream still shows every device that sends.
    }
    setTimeout(loadRegistry, 60000);
  }

  // -- fleet summary, once a second -------------------------------------------------------

  function countBy(key, now) {
    const groups = new Map();
    for (const d of devices.values()) {
      const name = d[key];
      let g = groups.get(name);
      if (!g) groups.set(name, (g = { n: 0, online: 0 }));
      g.n += 1;
      if (now - d.seen < STALE_MS) g.online += 1;
    }
    return [...groups.entries()].sort((a, b) => collator.compare(a[0], b[0]));
  }

  function renderGroups(tableId, groups) {
    const rows = groups.map(([name, g]) => {
      const row = el("tr");
      row.append(el("td", "", name), el("td", "", String(g.n)), el("td", "", String(g.online)),
                 el("td", "", String(g.n - g.online)));
      return row;
    });
    $(tableId).tBodies[0].replaceChildren(...rows);
  }

  function syncOptions(selectId, names) {
    const select = $(selectId);
    const have = new Set([...select.options].map((o) => o.value));
    for (const name of names) {
      if (name !== "…" && !have.has(name)) select.append(new Option(name, name));
    }
  }

  let lastTick = performance.now();
  function tick() {
    const now = Date.now();
    const t = performance.now();
    const seconds = (t - lastTick) / 1000;
    lastTick = t;
    const instant = seconds > 0 ? received / seconds : 0;
    rate = rate ? 0.6 * rate + 0.4 * instant : instant;
    received = 0;
    let online = 0;
    for (const d of devices.values()) if (now - d.seen < STALE_MS) online += 1;
    $("kpi-devices").textContent = String(devices.size);
    $("kpi-online").textContent = String(online);
    $("kpi-stale").textContent = String(devices.size - online);
    $("kpi-rate").textContent = rate >= 100 ? String(Math.round(rate)) : rate.toFixed(1);
    const n = Math.min(latencyCount, latencies.length);
    if (n) {
      const sorted = Array.from(latencies.subarray(0, n)).sort((a, b) => a - b);
      $("kpi-latency").textContent = `${Math.max(0, Math.round(sorted[n >> 1]))} ms`;
    }
    const byClass = countBy("cls", now);
    const byLocation = countBy("loc", now);
    renderGroups("by-class", byClass);
    renderGroups("by-location", byLocation);
    syncOptions("f-class", byClass.map((g) => g[0]));
    syncOptions("f-location", byLocation.map((g) => g[0]));
    if (filter.staleOnly) tableDirty = true;
    for (const d of visible) fillRow(d, false); // ages move on
    schedule();
  }
  setInterval(tick, 1000);

  // -- pipeline health --------------------------------------------------------------------

  let previousHealth = null;

  function perSecond(now, before, name, tier) {
    if (!before || !before.tiers[tier] || !before.tiers[tier].metrics) return null;
    const a = before.tiers[tier].metrics[name];
    const b = now.tiers[tier].metrics[name];
    const dt = now.time - before.time;
    if (a === undefined || b === undefined || dt <= 0 || b < a) return null;
    return (b - a) / dt;
  }

  const fmt = (v, digits = 1) => v === null || v === undefined ? "–" :
    Math.abs(v) >= 100 ? String(Math.round(v)) : Number(v).toFixed(digits);

  function renderHealth(view) {
    const box = $("health");
    const parts = [];
    const order = ["ingest", "middle", "storage", "relay"];
    const names = Object.keys(view.tiers).sort((a, b) => {
      const ia = order.indexOf(a), ib = order.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || collator.compare(a, b);
    });
    for (const tier of names) {
      const info = view.tiers[tier];
      const block = el("div", "tier");
      block.dataset.tier = tier;
      const title = el("h3", "", tier);
      if (!info.up) title.append(" ", el("span", "down", "unreachable"));
      block.append(title);
      if (info.up) {
        for (const q of info.queues || []) {
          const line = el("div");
          const fill = q.fill === null ? 0 : q.fill;
          const bar = el("span", `bar${fill > 0.9 ? " full" : fill > 0.6 ? " high" : ""}`);
          const inner = el("span");
          inner.style.width = `${Math.min(100, fill * 100).toFixed(1)}%`;
          bar.append(inner);
          line.append(`${q.queue || q.tier} queue `, bar,
                      ` ${(fill * 100).toFixed(1)}% · ${Math.round(q.records)} records`);
          block.append(line);
        }
        const m = info.metrics || {};
        const stats = el("div", "stats");
        const stat = (label, value) => {
          const s = el("span");
          s.append(`${label} `, el("b", "", value));
          stats.append(s);
        };
        if (tier === "ingest") {
          stat("connections", fmt(m.iotpipe_ingest_connections, 0));
          stat("acks/s", fmt(perSecond(view, previousHealth, "iotpipe_ingest_messages_accepted_total", tier)));
          stat("busy/s", fmt(perSecond(view, previousHealth, "iotpipe_ingest_busy_total", tier)));
          const a = info.ack_seconds;
          if (a && a.p50 !== null) stat("ack p50/p99", `${fmt(a.p50 * 1000, 2)}/${fmt(a.p99 * 1000, 2)} ms`);
          stat("awaiting middle ack", fmt(m.iotpipe_forwarder_in_flight_records, 0));
        } else if (tier === "middle") {
          stat("feed lag", `${fmt(m.iotpipe_middle_feed_lag_records, 0)} records`);
          stat("consumers", fmt(m.iotpipe_middle_feed_consumers, 0));
        } else if (tier === "storage") {
          stat("stored/s", fmt(perSecond(view, previousHealth, "iotpipe_storage_records_written_total", tier)));
          stat("lag", `${fmt(m.iotpipe_storage_feed_lag_seconds, 2)} s`);
          const w = info.write_seconds;
          if (w && w.p50 !== null) stat("write p50/p99", `${fmt(w.p50 * 1000, 2)}/${fmt(w.p99 * 1000, 2)} ms`);
          // A labelled counter has no sample until its first error.
          stat("write errors", fmt(m.iotpipe_storage_write_errors_total || 0, 0));
        } else if (tier === "relay") {
          stat("clients", fmt(m.iotpipe_relay_clients, 0));
          stat("events/s", fmt(perSecond(view, previousHealth, "iotpipe_relay_events_in_total", tier)));
          stat("dropped (slow clients)", fmt(m.iotpipe_relay_dropped_total, 0));
          stat("missed upstream", fmt(m.iotpipe_relay_upstream_missed_total, 0));
        }
        block.append(stats);
      }
      parts.push(block);
    }
    box.replaceChildren(...parts);
    previousHealth = view;
  }

  async function pollHealth() {
    try {
      renderHealth(await getJson("/api/health"));
    } catch (error) {
      $("health").replaceChildren(el("p", "muted", `health unavailable: ${error.message}`));
    }
    setTimeout(pollHealth, 2000);
  }

  // -- one device's chart -----------------------------------------------------------------

  const chart = { device: null, plot: null, rebuild: false, xs: [], fields: [], ys: new Map(), dirty: false,
                  history: 0, live: 0, lastTs: 0, loading: false, early: [] };
  const PALETTE = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf"];

  function numericFields(data) {
    const out = [];
    if (data && typeof data === "object") {
      for (const [k, v] of Object.entries(data)) {
        if (typeof v === "number" && Number.isFinite(v)) out.push([k, v]);
        else if (typeof v === "boolean") out.push([k, v ? 1 : 0]);
      }
    }
    return out;
  }

  function chartAdd(tsNs, data, kind) {
    if (chart.loading) { chart.early.push([tsNs, data]); return; }
    if (tsNs <= chart.lastTs) return; // already there (history overlaps the live stream)
    chart.lastTs = tsNs;
    const values = numericFields(data);
    for (const [k] of values) {
      if (!chart.ys.has(k) && chart.fields.length < PALETTE.length) {
        chart.fields.push(k);
        chart.ys.set(k, new Array(chart.xs.length).fill(null));
        chart.rebuild = true; // a new series: build the plot again
      }
    }
    chart.xs.push(tsNs / 1e9);
    const byName = new Map(values);
    for (const k of chart.fields) chart.ys.get(k).push(byName.has(k) ? byName.get(k) : null);
    if (chart.xs.length > CHART_POINTS) {
      chart.xs.shift();
      for (const k of chart.fields) chart.ys.get(k).shift();
    }
    if (kind === "live") chart.live += 1; else chart.history += 1;
    chart.dirty = true;
  }

  function chartDraw() {
    chart.dirty = false;
    const box = $("chart");
    box.dataset.history = String(chart.history);
    box.dataset.live = String(chart.live);
    box.dataset.points = String(chart.xs.length);
    $("chart-status").textContent =
      `${chart.history} readings from storage, ${chart.live} live` +
      (chart.fields.length ? "" : " (no numeric values yet)");
    if (!chart.fields.length) return;
    const data = [chart.xs, ...chart.fields.map((k) => chart.ys.get(k))];
    if (!chart.plot || chart.rebuild) {
      if (chart.plot) chart.plot.destroy();
      chart.rebuild = false;
      box.replaceChildren();
      const opts = {
        width: Math.max(300, box.clientWidth || 800), height: 260,
        scales: { x: { time: true } },
        axes: [{ stroke: "#8593a3", grid: { stroke: "#26313d" } },
               { stroke: "#8593a3", grid: { stroke: "#26313d" } }],
        series: [{}, ...chart.fields.map((k, i) => ({ label: k, stroke: PALETTE[i], width: 1.5,
                                                    spanGaps: true }))],
      };
      chart.plot = new uPlot(opts, data, box);
    } else {
      chart.plot.setData(data);
    }
  }

  async function selectDevice(id) {
    if (chart.plot) chart.plot.destroy();
    Object.assign(chart, { device: id, plot: null, xs: [], fields: [], ys: new Map(),
                           history: 0, live: 0, lastTs: 0, loading: true, early: [] });
    $("chart").replaceChildren();
    $("chart-device").textContent = id;
    $("chart-status").textContent = "loading history…";
    tableDirty = true;
    filtersChanged = true; // the selected row's highlight
    schedule();
    let note = "";
    try {
      const body = await getJson("/api/history", { device: id, limit: HISTORY_LIMIT });
      if (chart.device !== id) return;
      chart.loading = false;
      for (const r of body.readings || []) chartAdd(r.ts_ns, r.data, "history");
      if (body.available === false) note = " (no storage read API configured: live only)";
    } catch (error) {
      if (chart.device !== id) return;
      chart.loading = false;
      note = ` (history unavailable: ${error.message})`;
    }
    const early = chart.early;
    chart.early = [];
    for (const [ts, data] of early) chartAdd(ts, data, "live");
    chartDraw();
    if (note) $("chart-status").textContent += note;
  }

  window.addEventListener("resize", () => {
    if (chart.plot) chart.plot.setSize({ width: Math.max(300, $("chart").clientWidth), height: 260 });
  });

  const wanted = params.get("device");
  connect();
  loadRegistry();
  pollHealth();
  if (wanted) selectDevice(wanted);
})();
