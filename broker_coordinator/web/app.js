// The maskfl status page: polls /api/dashboard and draws it. No external requests:
// uPlot is served from /static (vendored). Text goes in with textContent only.
"use strict";

const REFRESH_MS = 2000;
const COLORS = ["#2f6fde", "#1f8f4e", "#c4352b", "#c98a12", "#7a4fd0", "#12899a", "#b8467e", "#5c6b7a"];
const charts = {};

function $(id) { return document.getElementById(id); }

function text(id, value) { $(id).textContent = value; }

function fmtNum(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : v.toFixed(digits);
}

function fmtSecs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return (s / 3600).toFixed(1) + " h";
}

function ago(t, now) { return t ? fmtSecs(Math.max(0, now - t)) + " ago" : "never"; }

function cell(tr, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

// Whole numbers on a round or version axis; exponents for tiny figures (error bounds).
const INT_AXIS = { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], values: (u, v) => v.map(String) };
const EXP_VALUES = (u, v) => v.map(x => (x === null ? "" : x.toExponential(0)));

// One uPlot per element id; recreated when its series change, else given new data.
function draw(id, series, data, opts = {}) {
  const el = $(id);
  const points = data[0].filter((_, i) => data.slice(1).some(s => s[i] !== null && s[i] !== undefined)).length;
  el.dataset.points = String(points);
  const key = JSON.stringify(series.map(s => s.label)) + JSON.stringify(opts.key || "");
  const width = Math.max(300, el.clientWidth || 440);
  const old = charts[id];
  if (old && old.key === key && old.width === width) {
    old.plot.setData(data);
    return;
  }
  if (old) old.plot.destroy();
  const plotOpts = {
    width, height: 220,
    legend: { live: false },
    scales: opts.scales || { x: { time: false } },
    axes: opts.axes || [INT_AXIS, {}],
    series: [{ label: opts.xLabel || "round" }].concat(series.map((s, i) => Object.assign({
      stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 5 }, spanGaps: false,
    }, s))),
  };
  charts[id] = { key, width, plot: new uPlot(plotOpts, data, el) };
}

function renderHeader(d) {
  const st = d.status || {};
  text("fleet", d.fleet || "");
  const ready = $("ready");
  ready.textContent = st.ready ? "ready" : "not ready";
  ready.className = "badge " + (st.ready ? "ok" : "bad");
  text("round", st.round_id ?? "–");
  text("phase", st.phase ?? "–");
  text("groups", st.groups ?? "–");
  const byGroup = {};
  for (const sg of st.summer_groups || []) (byGroup[sg.group] ||= []).push(sg.device);
  text("summer-groups", Object.keys(byGroup).length === 0 ? "" : "summers by mask group: " +
    Object.entries(byGroup).map(([g, ds]) => `${g}: ${ds.join(", ")}`).join("; "));
  text("model", st.model_version === undefined ? "–" : `${st.model_id} v${st.model_version}`);
  // Heartbeats are not read in a round's update and sum2 phases (the count holds still).
  text("alive", st.devices_alive === undefined ? "–" :
    st.devices_alive + (st.liveness_listening === false ? " (heartbeats paused this phase)" : ""));
  const ev = st.model_evaluation;
  text("fleet-acc", ev ? `${(100 * ev.accuracy).toFixed(1)} % (v${ev.evaluated_version}, ${ev.examples} examples)` : "–");
  text("completed", st.rounds_completed ?? 0);
  text("failed", st.rounds_failed ?? 0);
  text("updated", "updated " + new Date(d.now * 1000).toLocaleTimeString() + " · refreshes every " + REFRESH_MS / 1000 + " s");
}

function renderProgress(d) {
  const p = d.progress || {};
  const msgFill = $("msg-fill"), timeFill = $("time-fill");
  if (p.messages === undefined) {
    text("progress-text", p.round_id ? `round ${p.round_id}: ${p.phase}` : `no round in progress (${p.phase || "starting"})`);
    msgFill.style.width = "0"; timeFill.style.width = "0";
    $("msg-min").style.display = "none"; $("time-min").style.display = "none";
    return;
  }
  const elapsed = Math.max(0, d.now - p.phase_opened_at);
  const left = Math.max(0, p.deadline - d.now);
  text("progress-text",
    `round ${p.round_id}, ${p.phase} phase: ${p.messages} messages in (closes at ${p.count_max}, ` +
    `or at ${p.count_min} after ${fmtSecs(p.time_min_s)}) · ${fmtSecs(elapsed)} elapsed, ` +
    `deadline in ${fmtSecs(left)} (time_max ${fmtSecs(p.time_max_s)})`);
  msgFill.style.width = Math.min(100, 100 * p.messages / p.count_max) + "%";
  const minTick = $("msg-min");
  minTick.style.display = "block";
  minTick.style.left = Math.min(100, 100 * p.count_min / p.count_max) + "%";
  timeFill.style.width = Math.min(100, 100 * elapsed / p.time_max_s) + "%";
  const tTick = $("time-min");
  tTick.style.display = p.time_min_s > 0 ? "block" : "none";
  tTick.style.left = Math.min(100, 100 * p.time_min_s / p.time_max_s) + "%";
}

function renderCharts(d) {
  const rounds = d.rounds || [];
  const x = rounds.map(r => r.round_id);
  draw("chart-participants",
    [{ label: "summers" }, { label: "updaters" }, { label: "dropped" }],
    [x, rounds.map(r => r.summers), rounds.map(r => r.updaters), rounds.map(r => r.dropped)]);
  const phases = ["sum", "update", "sum2", "unmask"];
  draw("chart-phases", phases.map(p => ({ label: p })), [x].concat(phases.map(p => rounds.map(r => r.phases[p]))));

  const priv = rounds.map(r => r.privacy || {});
  const eps = priv.some(p => p.epsilon !== null && p.epsilon !== undefined);
  const privSeries = [{ label: "updates in aggregate", scale: "n" }, { label: "error bound", scale: "err" }];
  const privData = [x, priv.map(p => p.updates ?? null), priv.map(p => p.error_bound ?? null)];
  if (eps) { privSeries.push({ label: "ε", scale: "eps" }); privData.push(priv.map(p => p.epsilon ?? null)); }
  draw("chart-privacy", privSeries, privData, {
    scales: { x: { time: false }, err: { distr: 3 } },
    axes: [INT_AXIS, { scale: "n" }, { scale: "err", side: 1, grid: { show: false }, values: EXP_VALUES, size: 60 }],
  });

  const models = d.models || [];
  const hasEval = models.some(m => m.accuracy !== null && m.accuracy !== undefined);
  text("eval-note", hasEval
    ? "Computed under masking: only fleet totals over the devices' held-out data are ever unmasked."
    : "No federated evaluation published yet: the models so far carry no evaluation counts.");
  draw("chart-eval", [{ label: "accuracy", scale: "acc" }, { label: "loss", scale: "loss" }],
    [models.map(m => m.version), models.map(m => m.accuracy ?? null), models.map(m => m.loss ?? null)], {
      xLabel: "model version",
      scales: { x: { time: false }, acc: { range: [0, 1] } },
      axes: [INT_AXIS, { scale: "acc" }, { scale: "loss", side: 1, grid: { show: false } }],
    });

  const tl = d.timeline || { t: [], alive: [], rejected: {} };
  const reasons = Object.keys(tl.rejected);
  text("rejections-note", reasons.length ? "" : "No message rejected since the coordinator started.");
  draw("chart-rejections", reasons.map(r => ({ label: r, points: { show: false } })),
    [tl.t].concat(reasons.map(r => tl.rejected[r])), { xLabel: "time", scales: { x: { time: true } }, axes: [{}, {}], key: "t" });
  draw("chart-alive", [{ label: "devices alive", points: { show: false } }], [tl.t, tl.alive],
    { xLabel: "time", scales: { x: { time: true } }, axes: [{}, {}], key: "t" });
}

function renderRounds(d) {
  const body = $("rounds").tBodies[0];
  body.replaceChildren();
  for (const r of (d.rounds || []).slice().reverse().slice(0, 30)) {
    const tr = document.createElement("tr");
    tr.dataset.round = r.round_id;
    if (r.outcome === "failed") tr.className = "failed";
    cell(tr, r.round_id, "num");
    const outcome = cell(tr, r.outcome || `in progress (${r.phase})`, "outcome-" + (r.outcome || "running"));
    if (r.detail) outcome.title = r.detail;
    cell(tr, fmtSecs(r.duration_s), "num");
    for (const p of ["sum", "update", "sum2", "unmask"]) cell(tr, fmtSecs(r.phases[p]), "num");
    cell(tr, r.summers, "num"); cell(tr, r.updaters, "num"); cell(tr, r.dropped, "num");
    const p = r.privacy || {};
    cell(tr, fmtNum(p.updates ?? null), "num");
    cell(tr, fmtNum(p.error_bound ?? null), "num");
    cell(tr, p.epsilon === null || p.epsilon === undefined ? (r.privacy ? "DP off" : "–") : fmtNum(p.epsilon), "num");
    const e = r.evaluation || {};
    cell(tr, e.accuracy === undefined || e.accuracy === null ? "–" : (100 * e.accuracy).toFixed(1) + " %", "num");
    cell(tr, fmtNum(e.loss ?? null), "num");
    body.appendChild(tr);
  }
}

function renderDevices(d) {
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  const shown = (d.devices || []).length;
  text("devices-note", d.devices_total > shown
    ? `Showing the ${shown} most recently heard from of ${d.devices_total} (all: maskfl-coordinator devices).`
    : "");
  for (const dev of d.devices || []) {
    const tr = document.createElement("tr");
    tr.dataset.device = dev.device;
    cell(tr, dev.device);
    cell(tr, ago(dev.last_seen, d.now));
    cell(tr, dev.alive === null ? "–" : dev.alive ? "yes" : "no");
    const rev = cell(tr, dev.revoked === null ? "unknown" : dev.revoked ? "REVOKED" : "no");
    if (dev.revoked) rev.className = "yes";
    const roles = cell(tr, "");
    for (const r of dev.roles) {
      const span = document.createElement("span");
      span.className = "role " + (r.role || "");
      span.textContent = r.role === "summer" ? "S" : r.role === "updater" ? "U" : "·";
      span.title = `round ${r.round_id}: ${r.role || "no accepted message"}`;
      roles.appendChild(span);
    }
    cell(tr, `${dev.accepted.sum} / ${dev.accepted.update} / ${dev.accepted.sum2}`, "num");
    const rej = Object.entries(dev.rejected).map(([k, v]) => `${k} ×${v}`).join(", ");
    cell(tr, rej || "none");
    body.appendChild(tr);
  }
}

async function refresh() {
  try {
    const response = await fetch("/api/dashboard", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    const d = await response.json();
    renderHeader(d);
    renderProgress(d);
    renderCharts(d);
    renderRounds(d);
    renderDevices(d);
    document.body.dataset.loaded = "1";
  } catch (err) {
    text("updated", "cannot reach the coordinator: " + err.message);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
