// wslb live status page: server-sent events from /api/live, charts in inline SVG, drain
// buttons over the admin API. No libraries, no external assets; text goes in through
// textContent only (names, guids and bindings come from backends).
"use strict";
(function () {
  const HISTORY = 300;
  const token = new URLSearchParams(location.search).get("token");
  const q = token ? "?token=" + encodeURIComponent(token) : "";
  const hist = new Map(); // backend name -> {active: [], rate: [], up: [], down: []}
  const fresh = () => ({ active: [], rate: [], up: [], down: [] });
  const totals = { up: [], down: [] };
  // Counting descriptors reads /proc (O(connections)): the live line keeps the page's figure.
  const fds = (document.getElementById("totals").textContent.match(/descriptors .*/) || [""])[0];
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(
      tag === "svg" || tag === "polyline" ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const push = (arr, v) => { arr.push(v); if (arr.length > HISTORY) arr.splice(0, arr.length - HISTORY); };

  // One chart: a polyline per series, scaled to the largest value shown.
  function chart(series, label) {
    const w = 300, h = 60;
    const svg = el("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "chart" });
    const max = Math.max(1, ...series.flatMap((s) => s.values));
    // A fresh page fills a minute-wide window, then widens to the full five minutes.
    const span = Math.min(HISTORY, Math.max(60, ...series.map((s) => s.values.length)));
    let points = 0;
    for (const s of series) {
      const n = s.values.length;
      const pts = s.values.map((v, i) => `${(w * (span - n + i)) / (span - 1)},${h - 2 - ((h - 4) * v) / max}`);
      points += n;
      svg.appendChild(el("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.5 }));
    }
    svg.setAttribute("data-points", points);
    const fig = el("figure");
    fig.appendChild(svg);
    fig.appendChild(el("figcaption", {}, `${label}, last ${span} s, max ${max}`));
    return fig;
  }

  async function act(name, what) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch(`/api/backends/${encodeURIComponent(name)}/${what}`, { method: "POST", headers });
    document.getElementById("status").textContent = `${what} ${name}: ${r.status}`;
  }

  function render(snap) {
    document.getElementById("totals").textContent =
      `uptime ${snap.uptime}s · ${snap.clients} client connections · ${snap.active} backend connections · ` +
      `${snap.backends.length} backends · messages/s up ${snap.up_s} down ${snap.down_s}` +
      (fds ? ` · ${fds} (at load)` : "");
    const table = document.getElementById("backends");
    while (table.rows.length > 1) table.deleteRow(1);
    const charts = document.getElementById("charts");
    charts.replaceChildren();
    const all = el("div", { class: "card" });
    all.appendChild(el("h3", {}, "all WebSockets"));
    all.appendChild(chart([{ values: totals.up, color: "#06c" }, { values: totals.down, color: "#c60" }],
      "messages/s up (blue) and down (orange)"));
    charts.appendChild(all);
    for (const b of snap.backends) {
      const tr = el("tr", { class: b.state, "data-name": b.name });
      const state = b.down && b.state === "ready" ? "ready (backing off)" : b.state;
      for (const v of [state, b.name, b.bindings.join(" "), b.weight, b.active, b.selected, b.dispatches,
        `${b.rate}/s · ${b.up_s}↑ ${b.down_s}↓ msg/s` + (b.heard === null ? "" : ` · heard ${b.heard}s ago`)]) {
        tr.appendChild(el("td", {}, String(v)));
      }
      const td = el("td");
      const what = b.state === "draining" ? "undrain" : "drain";
      const btn = el("button", { type: "button", class: what }, what === "drain" ? "Drain" : "Undrain");
      btn.disabled = b.state === "gone";
      btn.addEventListener("click", () => act(b.name, what));
      td.appendChild(btn);
      tr.appendChild(td);
      table.tBodies[0].appendChild(tr);
      const h = hist.get(b.name) || fresh();
      const card = el("div", { class: "card " + b.state, "data-name": b.name });
      card.appendChild(el("h3", {}, `${b.name} — ${state}`));
      card.appendChild(chart([{ values: h.active, color: "#070" }, { values: h.rate, color: "#a0a" }],
        "connections (green), new/s (purple)"));
      card.appendChild(chart([{ values: h.up, color: "#06c" }, { values: h.down, color: "#c60" }],
        "messages/s up (blue), down (orange)"));
      charts.appendChild(card);
    }
    document.body.setAttribute("data-snapshots", String(+(document.body.dataset.snapshots || 0) + 1));
  }

  function addEvent(e) {
    const list = document.getElementById("events");
    const when = e.ts ? new Date(e.ts * 1000).toLocaleTimeString() : new Date().toLocaleTimeString();
    const { ts, event, ...rest } = e;
    const detail = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
    list.prepend(el("li", { class: event }, `${when} ${event} ${detail}`));
    while (list.children.length > 50) list.lastElementChild.remove();
  }

  const live = new EventSource("/api/live" + q);
  live.addEventListener("history", (m) => {
    const h = JSON.parse(m.data);
    hist.clear();
    for (const [name, s] of Object.entries(h.backends)) hist.set(name, s);
    totals.up = h.up;
    totals.down = h.down;
    document.getElementById("events").replaceChildren();
  });
  live.addEventListener("snapshot", (m) => {
    const snap = JSON.parse(m.data);
    push(totals.up, snap.up_s);
    push(totals.down, snap.down_s);
    for (const b of snap.backends) {
      const h = hist.get(b.name) || fresh();
      push(h.active, b.active);
      push(h.rate, b.rate);
      push(h.up, b.up_s);
      push(h.down, b.down_s);
      hist.set(b.name, h);
    }
    render(snap);
  });
  live.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
  live.onopen = () => { document.getElementById("status").textContent = "live"; };
  live.onerror = () => { document.getElementById("status").textContent = "reconnecting…"; };
  window.wslbAct = act;
})();
