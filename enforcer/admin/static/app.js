// The approvals page: a login form, then two tables from the JSON API, refreshed on
// every change the server pushes (Server-Sent Events, /api/events). Data goes into the
// page with textContent only. The session is a header from this origin's
// sessionStorage, never a cookie (see enforcer/admin/auth.py): the browser attaches
// nothing on its own, to this server or to another port of its host.
"use strict";

const status = document.getElementById("status");
const SESSION = "sandgate-session";
const USER = "sandgate-user";

// The scopes in the words of the CLI (sandgate approvals approve --once/--task/--for/--always).
const SCOPES = [
  ["once", "Approve once"],
  ["task", "Approve for this task"],
  ["for", "Approve for DURATION"],
  ["always", "Approve always"],
];

// The scopes that grant the task itself: nothing to grant once it has ended.
const TASK_SCOPES = new Set(["once", "task"]);

// What the task asks for, as the CLI and the webhook show it (the server's `shown`):
// method and target with the query, hiding characters escaped, a long value cut with
// "... (N more bytes)".
function destination(a) {
  return a.shown.request;
}

function heldText(a) {
  return a.shown.bodies ? `${a.shown.held}; bodies: ${a.shown.bodies}` : a.shown.held;
}

function grantsText(a) {
  return `once: ${a.shown.once}; for this task, for DURATION, always: ${a.shown.wider}`;
}

function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "—" : String(text);
  return td;
}

function sessionHeaders(extra = {}) {
  return { "X-Sandgate-Session": sessionStorage.getItem(SESSION) || "", ...extra };
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "omit", headers: sessionHeaders(), ...options });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/login") {
    showLogin("The session ended (logged out, or the key was revoked): log in again.");
  }
  if (!response.ok) {
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return body;
}

async function decide(row, decision, scope) {
  // The record this row shows now: its revision is what the approver saw, and the
  // server refuses an approval if a request joined it since (it is then shown anew).
  const approval = row.approval;
  const body = { decision, scope, seen: approval.revision };
  if (scope === "for") body.duration = document.getElementById("duration").value;
  if (scope === "for" || scope === "always") {
    const widen = document.getElementById("widen").value.trim();
    if (widen) body.widen = widen;
  }
  if (scope === "always") {
    for (const field of ["ticket", "expires"]) {
      const value = document.getElementById(field).value.trim();
      if (value) body[field] = value;
    }
  }
  try {
    const result = await api(`/api/approvals/${encodeURIComponent(approval.id)}`, {
      method: "POST",
      headers: sessionHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    const done = result.approval;
    status.textContent = `Approval ${done.id} (${destination(done)}): ${done.state}` +
      (done.scope ? ` (${done.scope})` : "") +
      (done.widened ? `, widened to ${done.widened}` : "") + ".";
  } catch (e) {
    status.textContent = `Approval ${approval.id}: ${e.message}`;
  }
  refresh();
}

// Rows are kept by approval id and only their text is updated, so a refresh (every
// pushed change) never replaces the button under the admin's pointer or keyboard focus.
function pendingValues(a) {
  const task = a.task_ended ? `${a.task_id} (task ended)` : a.task_id;
  return [a.id, task, a.sandbox, a.profile, destination(a), heldText(a), grantsText(a),
          a.first_seen, `${a.waiting_s} s`];
}

function pendingRow(tbody, a) {
  const row = tbody.insertRow();
  row.dataset.id = a.id;
  row.approval = a;
  for (const value of pendingValues(a)) cell(row, value);
  const td = cell(row, "");
  td.className = "decide";
  for (const [scope, words] of SCOPES) {
    const button = document.createElement("button");
    button.dataset.scope = scope;
    button.addEventListener("click", () => decide(row, "approve", scope));
    td.append(button);
  }
  const deny = document.createElement("button");
  deny.textContent = "Deny";
  deny.className = "deny";
  deny.dataset.scope = "deny";
  deny.setAttribute("aria-label", `Deny: ${destination(a)}, task ${a.task_id}`);
  deny.addEventListener("click", () => decide(row, "deny"));
  td.append(deny);
  return row;
}

function renderPending(approvals) {
  const tbody = document.querySelector("#pending tbody");
  const rows = new Map();
  for (const row of tbody.querySelectorAll("tr[data-id]")) rows.set(row.dataset.id, row);
  for (const row of tbody.querySelectorAll("tr:not([data-id])")) row.remove();
  const duration = document.getElementById("duration").value;
  for (const a of approvals) {
    const row = rows.get(a.id) || pendingRow(tbody, a);
    row.approval = a;
    rows.delete(a.id);
    pendingValues(a).forEach((value, i) => {
      row.cells[i].textContent = value === null || value === undefined ? "—" : String(value);
    });
    for (const [scope, words] of SCOPES) {
      const button = row.querySelector(`button[data-scope="${scope}"]`);
      const label = scope === "for" ? words.replace("DURATION", duration) : words;
      button.textContent = label;
      button.setAttribute("aria-label", `${label}: ${destination(a)}, task ${a.task_id}`);
      // A task that has ended can only be decided for the profile (for, always) or denied.
      button.disabled = a.task_ended && TASK_SCOPES.has(scope);
      button.title = button.disabled ? "the task has ended: approve for a duration or always, or deny" : "";
    }
    tbody.append(row); // keeps the server's order; moving a row keeps the element
  }
  for (const row of rows.values()) row.remove();
  if (!approvals.length) {
    cell(tbody.insertRow(), "Nothing is waiting for a decision.").colSpan = 10;
  }
}

function renderRecent(recent) {
  const tbody = document.querySelector("#recent tbody");
  tbody.replaceChildren();
  for (const a of recent) {
    const row = tbody.insertRow();
    const scope = a.widened ? `${a.scope}, widened to ${a.widened}` : a.scope;
    for (const value of [a.id, a.task_id, destination(a), heldText(a), a.state, scope,
                         a.approver, `${a.waiting_s} s`]) {
      cell(row, value);
    }
  }
}

async function refresh() {
  try {
    const [pending, recent] = await Promise.all([
      api("/api/approvals"), api("/api/approvals/recent"),
    ]);
    renderPending(pending.approvals);
    renderRecent(recent.recent);
    if (status.textContent === "Loading…") status.textContent = "Up to date.";
  } catch (e) {
    status.textContent = `Could not load the approvals: ${e.message}`;
  }
}

// Server-Sent Events read with fetch (EventSource cannot send the session header):
// a refresh when the stream opens and on every `change`, a new stream after a break.
let listening = false;

async function listen() {
  if (listening) return;
  listening = true;
  while (sessionStorage.getItem(SESSION)) {
    try {
      const response = await fetch("/api/events", { credentials: "omit", headers: sessionHeaders() });
      if (response.status === 401) {
        showLogin("The session ended (logged out, or the key was revoked): log in again.");
        break;
      }
      refresh();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const messages = (buffered + value).split("\n\n");
        buffered = messages.pop();
        if (messages.some((m) => m.startsWith("event: change"))) refresh();
      }
    } catch (e) {
      status.textContent = `Live updates interrupted: ${e.message}`;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  listening = false;
}

function showLogin(problem) {
  sessionStorage.removeItem(SESSION);
  sessionStorage.removeItem(USER);
  document.getElementById("approvals").hidden = true;
  document.getElementById("session").hidden = true;
  document.getElementById("login").hidden = false;
  status.textContent = problem || "Log in to see and decide pending approvals.";
}

function showApprovals() {
  document.getElementById("login").hidden = true;
  document.getElementById("user").textContent = sessionStorage.getItem(USER);
  document.getElementById("session").hidden = false;
  document.getElementById("approvals").hidden = false;
  status.textContent = "Loading…";
  listen();
}

document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = document.getElementById("token");
  try {
    const session = await api("/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: token.value }),
    });
    token.value = "";
    sessionStorage.setItem(SESSION, session.session);
    sessionStorage.setItem(USER, session.approver);
    showApprovals();
  } catch (e) {
    status.textContent = `Log in: ${e.message}`;
  }
});

document.getElementById("logout").addEventListener("click", async () => {
  await api("/logout", { method: "POST" }).catch(() => {});
  showLogin("Logged out.");
});

document.getElementById("duration").addEventListener("change", refresh);
if (sessionStorage.getItem(SESSION)) showApprovals();
else showLogin();
