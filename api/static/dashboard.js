// sitiancal dashboard: polls the JSON API; no libraries, no external requests.
"use strict";

const POLL_MS = 3000;
const $ = (sel) => document.querySelector(sel);

function headers(extra) {
  const h = Object.assign({"Accept": "application/json"}, extra || {});
  const token = $("#token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function getJSON(url) {
  const r = await fetch(url, {headers: headers()});
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e[k] = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "n/a";
  const a = Math.abs(v);
  if (digits === undefined) digits = a >= 100 ? 1 : a >= 1 ? 3 : 4;
  return a !== 0 && a < 1e-3 ? v.toExponential(3) : v.toFixed(digits);
}

function short(t) { return t ? t.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : ""; }

function setStatus(text) { $("#status").textContent = text; }

// The JSON each view was last drawn from: a view is drawn again only when its data
// changed, so a button or link under the pointer, or a text selection, survives the
// polls. A draw is recorded once it is done (one that failed is tried again at the
// next poll) and counted in the view's data-draws attribute.
const drawnFrom = {};
function unchanged(view, data) { return drawnFrom[view] === JSON.stringify(data); }
function drawn(view, data) {
  drawnFrom[view] = JSON.stringify(data);
  const box = $("#" + view);
  box.dataset.draws = String(Number(box.dataset.draws || 0) + 1);
}

async function refreshJobs() {
  const data = await getJSON("/v1/jobs?limit=50");
  if (unchanged("jobs", data)) return;
  const body = $("#jobs tbody");
  body.replaceChildren(...data.jobs.map((j) => el("tr", {"data-job": j.id},
    el("td", {}, el("code", {}, j.id.slice(0, 8))), el("td", {}, j.camera),
    el("td", {class: "state-" + j.state}, j.state), el("td", {}, j.stage || ""),
    el("td", {}, el("progress", {max: "1", value: String(j.progress)}), " " + Math.round(100 * j.progress) + "%"),
    el("td", {}, short(j.created)), el("td", {}, short(j.finished)),
    el("td", {}, j.error || j.message || ""),
    el("td", {}, j.state === "succeeded" && j.products.length
      ? el("a", {href: "/v1/jobs/" + encodeURIComponent(j.id) + "/report.html", target: "_blank"}, "report") : ""))));
  if (!data.jobs.length) body.append(el("tr", {}, el("td", {colspan: "9", class: "muted"}, "no jobs yet")));
  drawn("jobs", data);
}

async function refreshFleet() {
  const data = await getJSON("/ui/fleet.json");
  if (unchanged("fleet", data)) return;
  $("#nsigma").textContent = data.n_sigma;
  const keys = Object.keys(data.figures);
  $("#fleet thead").replaceChildren(el("tr", {}, el("th", {}, "camera"),
    ...keys.map((k) => el("th", {}, data.figures[k].label + " (" + data.figures[k].units + ")"))));
  $("#fleet tbody").replaceChildren(...data.cameras.map((c) => el("tr", {"data-camera": c.camera},
    el("td", {}, c.camera),
    ...keys.map((k) => {
      const out = data.figures[k].outliers.includes(c.camera);
      return el("td", {class: "num" + (out ? " outlier" : ""), title: out ? "outlier against the fleet" : ""}, fmt(c[k]));
    }))));
  $("#fleet tfoot").replaceChildren(
    el("tr", {}, el("th", {}, "fleet median"), ...keys.map((k) => el("td", {class: "num"}, fmt(data.figures[k].median)))),
    el("tr", {}, el("th", {}, "robust sigma"), ...keys.map((k) => el("td", {class: "num"}, fmt(data.figures[k].robust_sigma)))));
  drawn("fleet", data);
}

async function act(id, action) {
  let body;
  if (action === "certify") {
    const from = prompt("Valid from (UTC, ISO 8601)", new Date().toISOString().slice(0, 19) + "Z");
    if (!from) return;
    body = {valid_from: from, reason: "reviewed on the dashboard"};
  } else {
    const reason = prompt("Reason for retracting");
    if (!reason) return;
    body = {reason: reason};
  }
  if (!$("#token").value.trim()) { alert("Type an operator token first."); return; }
  const r = await fetch("/v1/products/" + id + "/" + action,
    {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(body)});
  const reply = await r.json().catch(() => ({}));
  setStatus(r.ok ? action + " done" : action + " failed: " + (reply.detail || r.status));
  refreshCameras();
}

function productCell(p) {
  if (!p) return el("td", {class: "muted"}, "-");
  const validity = p.valid_from ? " [" + short(p.valid_from) + ", " + (p.valid_to ? short(p.valid_to) : "open") + ")" : "";
  return el("td", {}, el("span", {class: "state-" + p.state}, "v" + p.version + " " + p.state), validity);
}

async function refreshCameras() {
  const data = await getJSON("/ui/cameras.json");
  if (unchanged("cameras", data)) return;
  const box = $("#cameras");
  box.replaceChildren(...data.cameras.map((c) => {
    const rows = Object.entries(c.products).map(([type, p]) => el("tr", {},
      el("td", {}, type), productCell(p.latest), productCell(p.certified),
      el("td", {}, p.latest ? el("button", {onclick: () => act(p.latest.id, "certify")}, "certify") : "",
        " ", p.latest && p.latest.state !== "retracted" ? el("button", {onclick: () => act(p.latest.id, "retract")}, "retract") : "")));
    return el("div", {class: "camera", "data-camera": c.camera},
      el("h3", {}, c.camera, " ", el("a", {href: "/v1/cameras/" + encodeURIComponent(c.camera) + "/report.html", target: "_blank"}, "QC report")),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "product"), el("th", {}, "newest version"),
        el("th", {}, "certified now (validity)"), el("th", {}, "actions"))), el("tbody", {}, ...rows)));
  }));
  if (!data.cameras.length) box.append(el("p", {class: "muted"}, "no cameras yet"));
  drawn("cameras", data);
}

function sparkline(points, label, units) {
  const W = 220, H = 70, P = 6;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const ts = points.map((p) => Date.parse(p.time)), vs = points.map((p) => p.value);
  const t0 = Math.min(...ts), t1 = Math.max(...ts), v0 = Math.min(...vs), v1 = Math.max(...vs);
  const x = (t) => P + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - 2 * P);
  const y = (v) => H - P - (v1 > v0 ? (v - v0) / (v1 - v0) : 0.5) * (H - 2 * P);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p, i) => x(ts[i]) + "," + y(vs[i])).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#06c");
  svg.append(line);
  points.forEach((p, i) => {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x(ts[i])); c.setAttribute("cy", y(vs[i])); c.setAttribute("r", 3);
    c.setAttribute("fill", p.state === "certified" ? "#080" : "#06c");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = "v" + p.version + " " + p.state + " " + short(p.time) + ": " + fmt(p.value) + " " + units;
    c.append(tip); svg.append(c);
  });
  const last = points[points.length - 1];
  return el("div", {class: "trend"}, el("div", {}, label + ": " + fmt(last.value) + " " + units +
    " (" + points.length + " versions)"), svg);
}

async function refreshTrends() {
  const data = await getJSON("/ui/trends.json");
  if (unchanged("trends", data)) return;
  const box = $("#trends");
  box.replaceChildren(...Object.entries(data.cameras).map(([cam, series]) => el("div", {class: "camera"},
    el("h3", {}, cam), ...Object.entries(series).filter(([, pts]) => pts.length).map(([k, pts]) =>
      sparkline(pts, data.figures[k].label, data.figures[k].units)))));
  drawn("trends", data);
}

// why the page shows no dask dashboard link (dask_dashboard_state of /ui/info.json)
const DASK_NOTES = {
  disabled: "off (SITIANCAL_DASK_DASHBOARD)",
  unavailable: "not running",
};

async function refreshInfo() {
  const info = await getJSON("/ui/info.json");
  $("#version").textContent = "v" + info.version;
  const link = $("#dask-link"), note = $("#dask-note");
  const running = Boolean(info.dask_dashboard);
  if (running) link.href = info.dask_dashboard;
  link.hidden = !running;
  note.hidden = running;
  note.textContent = running ? "" : "dask dashboard: " + (DASK_NOTES[info.dask_dashboard_state] || "not running");
}

async function tick(all) {
  const tasks = [refreshJobs()];
  if (all) tasks.push(refreshFleet(), refreshCameras(), refreshTrends(), refreshInfo());
  const results = await Promise.allSettled(tasks);
  const failed = results.filter((r) => r.status === "rejected");
  setStatus(failed.length ? "error: " + failed[0].reason.message : "updated " + new Date().toISOString().slice(11, 19) + " UTC");
}

let n = 0;
function loop() {
  tick(n % 5 === 0).finally(() => { n += 1; $("#status").dataset.polls = String(n); setTimeout(loop, POLL_MS); });
}
$("#token").value = sessionStorage.getItem("sitiancal-token") || "";
$("#token").addEventListener("change", () => { sessionStorage.setItem("sitiancal-token", $("#token").value); tick(true); });
loop();
