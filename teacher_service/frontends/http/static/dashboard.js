// The /dashboard page: polls dashboard/data (cumulative metrics, see web/dashboard_data.py)
// every POLL_MS and turns each pair of snapshots into one point per chart, as Prometheus'
// rate() and histogram_quantile() would; the last WINDOW points stay in this tab.
"use strict";

const POLL_MS = 2000;
const WINDOW = 150; // points: five minutes at one a poll
const TOKEN_KEY = "teacher-dashboard-token";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04"];
const NUMBER = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

// Prometheus' histogram_quantile: `le` ascending upper bounds ending in Infinity, `counts`
// cumulative observations per bound; linear within the bucket, the highest finite bound
// for a quantile in the +Inf bucket, null without observations.
function histogramQuantile(q, le, counts) {
  const total = counts[counts.length - 1];
  if (!(total > 0)) return null;
  const rank = q * total;
  const i = counts.findIndex((count) => count >= rank);
  if (le[i] === Infinity) return le[i - 1] ?? null;
  const lower = i === 0 ? 0 : le[i - 1];
  const below = i === 0 ? 0 : counts[i - 1];
  return lower + ((le[i] - lower) * (rank - below)) / (counts[i] - below);
}

// Cumulative latency buckets observed between two snapshots (Infinity last).
function latencyBetween(prev, now) {
  const before = new Map(prev.le.map((le, i) => [le, prev.counts[i]]));
  const le = [...now.le, Infinity];
  const counts = now.counts.map((count, i) => count - (before.get(now.le[i]) ?? 0));
  counts.push(now.count - prev.count);
  return { le, counts };
}

function meanBetween(prev, now) {
  const count = now.count - prev.count;
  return count > 0 ? (now.sum - prev.sum) / count : null;
}

function nonNegative(u, min, max) {
  return [0, max > 0 ? max * 1.1 : 1];
}

// One uPlot chart whose series can grow (a new error status), over the shared time axis.
class Chart {
  constructor(id, series, axes) {
    this.figure = document.getElementById(id);
    this.keys = series.map((spec) => spec.key);
    this.columns = series.map(() => []);
    this.plot = new uPlot(
      {
        width: this.width(),
        height: 220,
        series: [{}, ...series.map((spec, i) => seriesOptions(spec, i))],
        legend: { live: false },
        scales: { x: { time: true }, y: { range: nonNegative }, y2: { range: nonNegative } },
        axes: [{}, { scale: "y", label: axes[0] }, ...(axes[1] ? [rightAxis(axes[1])] : [])],
      },
      [[], ...this.columns],
      this.figure,
    );
  }

  width() {
    return Math.max(300, this.figure.clientWidth - 16);
  }

  add(key, length) {
    this.plot.addSeries(seriesOptions({ key }, this.keys.length), this.keys.length + 1);
    this.keys.push(key);
    this.columns.push(new Array(length).fill(null));
  }

  // values: key -> number or null; a key seen for the first time becomes a series.
  push(times, values) {
    for (const key of Object.keys(values)) {
      if (!this.keys.includes(key)) this.add(key, times.length - 1);
    }
    this.keys.forEach((key, i) => {
      this.columns[i].push(values[key] ?? null);
      if (this.columns[i].length > times.length) this.columns[i].shift();
    });
    this.plot.setData([times, ...this.columns]);
    const first = this.columns[0] ?? [];
    this.figure.dataset.points = String(first.filter((v) => v !== null).length);
  }
}

function seriesOptions(spec, index) {
  const color = PALETTE[index % PALETTE.length];
  return { label: spec.label ?? spec.key, stroke: color, width: 2, scale: spec.scale ?? "y", dash: spec.dash };
}

function rightAxis(label) {
  return { scale: "y2", side: 1, label, grid: { show: false } };
}

const charts = {
  tokens: new Chart(
    "chart-tokens",
    [
      { key: "scored", label: "scored/s" },
      { key: "computed", label: "computed/s (padding included)" },
    ],
    ["tokens/s"],
  ),
  queue: new Chart(
    "chart-queue",
    [
      { key: "depth", label: "sequences waiting" },
      { key: "wait", label: "estimated wait (s)", scale: "y2" },
      { key: "budget", label: "wait budget (s)", scale: "y2", dash: [6, 4] },
    ],
    ["sequences", "seconds"],
  ),
  batching: new Chart(
    "chart-batching",
    [
      { key: "sequences", label: "sequences per forward" },
      { key: "padding", label: "padding (%)", scale: "y2" },
    ],
    ["sequences", "% padding"],
  ),
  latency: new Chart(
    "chart-latency",
    [
      { key: "p50", label: "p50 (ms)" },
      { key: "p90", label: "p90 (ms)" },
      { key: "p99", label: "p99 (ms)" },
    ],
    ["ms"],
  ),
  errors: new Chart("chart-errors", [], ["per second"]),
  gc: new Chart(
    "chart-gc",
    [
      { key: "paused", label: "time paused (ms per s)" },
      { key: "collections", label: "collections per second", scale: "y2" },
    ],
    ["ms per s", "per second"],
  ),
};

const times = [];
let previous = null;

function perSecondBetween(prev, now, dt) {
  const keys = new Set([...Object.keys(prev), ...Object.keys(now)]);
  return Object.fromEntries([...keys].map((key) => [key, ((now[key] ?? 0) - (prev[key] ?? 0)) / dt]));
}

function addPoint(prev, now) {
  const dt = now.time - prev.time;
  times.push(now.time);
  if (times.length > WINDOW) times.shift();
  const latency = latencyBetween(prev.latency, now.latency);
  const ms = (q) => {
    const seconds = histogramQuantile(q, latency.le, latency.counts);
    return seconds === null ? null : seconds * 1000;
  };
  const padding = meanBetween(prev.padding_fraction, now.padding_fraction);
  const dropped = perSecondBetween(prev.dropped, now.dropped, dt);
  charts.tokens.push(times, {
    scored: (now.tokens_scored - prev.tokens_scored) / dt,
    computed: (now.tokens_computed - prev.tokens_computed) / dt,
  });
  charts.queue.push(times, {
    depth: now.queue_sequences,
    wait: now.queue_wait_estimate_seconds,
    budget: now.queue_wait_budget_seconds,
  });
  charts.batching.push(times, {
    sequences: meanBetween(prev.batch_sequences, now.batch_sequences),
    padding: padding === null ? null : padding * 100,
  });
  charts.latency.push(times, { p50: ms(0.5), p90: ms(0.9), p99: ms(0.99) });
  charts.gc.push(times, {
    paused: ((now.gc_pause.sum - prev.gc_pause.sum) / dt) * 1000,
    collections: (now.gc_pause.count - prev.gc_pause.count) / dt,
  });
  charts.errors.push(times, {
    ...perSecondBetween(prev.errors, now.errors, dt),
    ...Object.fromEntries(Object.entries(dropped).map(([k, v]) => [`dropped: ${k}`, v])),
  });
}

function showTotals(now) {
  const totals = {
    tokens_scored: now.tokens_scored,
    tokens_computed: now.tokens_computed,
    sequences_computed: now.sequences_computed,
    forwards: now.batch_sequences.count,
    answered: now.latency.count,
    errors: Object.values(now.errors).reduce((a, b) => a + b, 0),
  };
  for (const [key, value] of Object.entries(totals)) {
    const cell = document.querySelector(`[data-total="${key}"]`);
    cell.textContent = NUMBER.format(value);
    cell.dataset.value = String(value);
  }
  const body = document.querySelector("#requests tbody");
  body.replaceChildren(
    ...now.requests.map((row) => {
      const tr = document.createElement("tr");
      for (const text of [row.frontend, row.method, row.status, NUMBER.format(row.count)]) {
        tr.appendChild(document.createElement("td")).textContent = text;
      }
      return tr;
    }),
  );
}

function setStatus(text, trouble = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("trouble", trouble);
}

// False across a restart of the service (its counters began again) or a clock step back:
// no point is drawn from such a pair, the next one starts afresh.
function comparable(prev, now) {
  const counted = now.tokens_scored >= prev.tokens_scored && now.latency.count >= prev.latency.count;
  return now.time > prev.time && counted;
}

async function poll() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const answer = await fetch("dashboard/data", { headers, cache: "no-store" });
    if (answer.status === 401) {
      document.getElementById("login").hidden = false;
      setStatus("this service needs its bearer token", true);
      return; // polling resumes once a token is entered
    }
    if (!answer.ok) throw new Error(`status ${answer.status}`);
    const now = await answer.json();
    if (previous !== null && comparable(previous, now)) addPoint(previous, now);
    previous = now;
    showTotals(now);
    document.body.dataset.polls = String(Number(document.body.dataset.polls) + 1);
    const clock = new Date(now.time * 1000).toLocaleTimeString("en-GB");
    setStatus(`updated ${clock}, every ${POLL_MS / 1000} s, last ${(WINDOW * POLL_MS) / 60000} min`);
  } catch (error) {
    setStatus(`service unreachable (${error.message}); retrying`, true);
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  document.getElementById("login").hidden = true;
  poll();
});

window.addEventListener("resize", () => {
  for (const chart of Object.values(charts)) chart.plot.setSize({ width: chart.width(), height: 220 });
});

poll();
