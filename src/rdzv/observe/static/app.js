// The rdzv status page: polls /api/status and renders it. Data is inserted as text only.
"use strict";

const POLL_MS = 1000;
let token = sessionStorage.getItem("rdzv-token") || "";
let previous = null; // {time, requests} of the last store document, for the request rate

function readHashToken() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem("rdzv-token", token);
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "-";
}

function fmtAge(age, watched) {
  if (age === null || age === undefined) return watched ? `>${watched.toFixed(1)}s` : "?";
  return `${age.toFixed(1)}s`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function cards(items) {
  return el("div", { class: "cards" }, ...items.map(([label, value, id]) =>
    el("div", { class: "card", id },
      el("div", { class: "label" }, label), el("div", { class: "value" }, value))));
}

function table(id, headers, rows) {
  if (!rows.length) return el("p", { class: "muted", id }, "none");
  return el("table", { id },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function stateCell(state) {
  return el("td", { class: `state state-${state}` }, state);
}

function failureRows(failures) {
  return failures.slice().reverse().map((f) =>
    el("tr", { class: f.kind, "data-rank": f.rank, "data-kind": f.kind },
      el("td", {}, f.rank === null ? "-" : f.rank),
      el("td", {}, `${f.node_rank} (${f.host})`),
      el("td", {}, f.kind),
      el("td", { class: "cause" }, f.how),
      el("td", {}, fmtTime(f.time)),
      el("td", {}, f.message ? el("pre", {}, f.message) : "")));
}

const FAILURE_HEADERS = ["RANK", "NODE", "KIND", "CAUSE", "TIME", "MESSAGE"];

function renderAgent(doc) {
  const a = doc.agent;
  const out = [];
  out.push(cards([
    ["run id", a.run_id, "run-id"],
    ["state", a.state, "agent-state"],
    ["restarts", `${a.restart_count} of ${a.max_restarts}`, "restarts"],
    ["node", a.group_rank === null ? "-" : `${a.group_rank} of ${a.group_world_size}`, "node"],
    ["world size", a.world_size ?? "-", "world-size"],
    ["host", a.host, "host"],
  ]));
  out.push(el("h2", {}, "Ranks on this node"));
  out.push(table("ranks", ["RANK", "LOCAL", "PID", "STATE", "CAUSE", "RUN TIME"],
    a.workers.map((w) =>
      el("tr", { class: w.state, "data-rank": w.rank, "data-state": w.state },
        el("td", {}, w.rank), el("td", {}, w.local_rank), el("td", {}, w.pid ?? "-"),
        stateCell(w.state), el("td", { class: "cause" }, w.cause ?? ""),
        el("td", {}, `${w.run_time.toFixed(1)} s`)))));
  out.push(el("h2", {}, "Failed, hung and lost ranks (every node)"));
  out.push(table("job-failures", FAILURE_HEADERS, failureRows(doc.failures)));
  out.push(el("h2", {}, "Failures seen by this node (earlier attempts)"));
  out.push(table("failures", ["RANK", "LOCAL", "PID", "CAUSE", "TIME", "ATTEMPT", "ERROR"],
    a.failures.slice().reverse().map((f) =>
      el("tr", { class: "failed", "data-rank": f.rank },
        el("td", {}, f.rank), el("td", {}, f.local_rank), el("td", {}, f.pid),
        el("td", { class: "cause" }, f.exit), el("td", {}, fmtTime(f.exit_time)),
        el("td", {}, f.restart_count),
        el("td", {}, f.error_message || (f.stderr_tail || []).slice(-3).join("\n") ?
          el("pre", {}, f.error_message || f.stderr_tail.slice(-3).join("\n")) : "")))));
  out.push(el("h2", {}, "Nodes"));
  out.push(table("nodes", ["NODE", "HOST", "WORKERS", "ROLE", "HEARTBEAT", "AGE"],
    doc.nodes.map((n) =>
      el("tr", {}, el("td", {}, n.group_rank), el("td", {}, n.host ?? "?"),
        el("td", {}, n.nproc ?? "-"), el("td", {}, n.role ?? "-"),
        el("td", {}, n.heartbeat ?? "-"), el("td", {}, fmtAge(n.heartbeat_age, n.heartbeat_watched))))));
  out.push(el("h2", {}, "Rounds"));
  out.push(table("rounds", ["#", "TIME", "JOIN", "NODE", "NODES", "WORLD SIZE", "RESTARTS"],
    a.rounds.map((r, i) =>
      el("tr", {}, el("td", {}, i + 1), el("td", {}, fmtTime(r.time)),
        el("td", {}, `${r.join_seconds} s`), el("td", {}, r.group_rank),
        el("td", {}, r.group_world_size), el("td", {}, r.world_size),
        el("td", {}, r.restart_count))).reverse()));
  if (doc.error) out.push(el("p", { class: "error" }, `store: ${doc.error}`));
  return out;
}

function renderStore(doc) {
  const s = doc.store;
  let rate = "-";
  if (previous && doc.time > previous.time) {
    rate = Math.round((s.requests - previous.requests) / (doc.time - previous.time));
  }
  previous = { time: doc.time, requests: s.requests };
  const out = [cards([
    ["connections (rdzv / torch)", `${s.connections.rdzv} / ${s.connections.torch}`, "connections"],
    ["requests/s", rate, "rate"],
    ["requests", s.requests, "requests"],
    ["keys", s.keys, "keys"],
    ["stored", fmtBytes(s.value_bytes), "bytes"],
    ["waiters", s.waiters, "waiters"],
    ["auth failures", s.auth_failures, "auth-failures"],
    ["limit hits", s.limit_hits, "limit-hits"],
    ["writes", s.read_only ? "refused (log not writable)" : "accepted", "writes"],
  ])];
  if (!doc.runs.length) out.push(el("p", { class: "muted" }, "No rendezvous in this store."));
  for (const run of doc.runs) {
    out.push(el("h2", {}, `Rendezvous ${run.run_id}` + (run.closed ? " (closed)" : "")));
    if (run.error) { out.push(el("p", { class: "error" }, run.error)); continue; }
    out.push(el("p", {}, run.round === null ? "No round completed yet." :
      `Round ${run.round}: ${run.world_size} node(s)` +
      (run.workers !== null ? `, ${run.workers} worker(s)` : "")));
    out.push(table(null, ["RANK", "SLOT", "ADDR", "AGENT PID", "WORKERS", "HEARTBEAT", "AGE", "STATE"],
      run.members.map((m) => el("tr", {},
        el("td", {}, m.rank ?? "-"), el("td", {}, m.slot), el("td", {}, m.addr ?? "?"),
        el("td", {}, m.pid ?? "?"), el("td", {}, m.nproc ?? "-"), el("td", {}, m.heartbeat ?? "?"),
        el("td", {}, fmtAge(m.heartbeat_age, m.heartbeat_age_min)), stateCell(m.state)))));
    if (run.waiting.length) {
      out.push(el("p", {}, `Waiting for round ${run.open_round}: ${run.waiting.length} node(s)`));
    }
    out.push(el("h2", {}, "Failed, hung and lost ranks"));
    out.push(table(null, FAILURE_HEADERS, failureRows(run.failures)));
  }
  return out;
}

async function poll() {
  readHashToken();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const live = document.getElementById("live");
  try {
    const response = await fetch("/api/status", { headers, cache: "no-store" });
    if (response.status === 401) {
      document.getElementById("login").hidden = false;
      live.textContent = "token required";
      live.classList.add("stale");
      return;
    }
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const doc = await response.json();
    document.getElementById("login").hidden = true;
    document.getElementById("error").hidden = true;
    document.getElementById("kind").textContent = doc.kind === "agent" ? "run (agent)" : "store";
    document.getElementById("keys").hidden = doc.kind !== "store";
    document.getElementById("content").replaceChildren(
      ...(doc.kind === "agent" ? renderAgent(doc) : renderStore(doc)));
    live.textContent = `live, updated ${new Date(doc.time * 1000).toLocaleTimeString()}`;
    live.classList.remove("stale");
    document.body.dataset.updated = String(doc.time);
  } catch (err) {
    live.textContent = "disconnected";
    live.classList.add("stale");
    const box = document.getElementById("error");
    box.textContent = `cannot read the status: ${err.message}`;
    box.hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function listKeys(event) {
  event.preventDefault();
  const prefix = document.getElementById("keys-prefix").value;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const box = document.getElementById("keys-list");
  try {
    const response = await fetch(`/api/keys?prefix=${encodeURIComponent(prefix)}&limit=200`,
      { headers, cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const doc = await response.json();
    box.replaceChildren(
      el("p", { class: "muted" }, `${doc.total} key(s) with prefix "${doc.prefix}"` +
        (doc.total > doc.keys.length ? `, first ${doc.keys.length} shown` : "") +
        " (values are never shown)"),
      table("key-table", ["KEY", "VALUE BYTES"],
        doc.keys.map((k) => el("tr", {}, el("td", {}, k.key), el("td", {}, k.bytes ?? "-")))));
  } catch (err) {
    box.replaceChildren(el("p", { class: "error" }, `cannot list keys: ${err.message}`));
  }
}

document.getElementById("keys-form").addEventListener("submit", listKeys);
document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("rdzv-token", token);
});
poll();
