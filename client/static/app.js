// The llmmixer web page: runs, one run's steps live, and the interventions.
//
// Plain JS, no build step. Every value from the server is put in the page with
// textContent, never innerHTML, so step outputs cannot inject markup.
//
// The event stream is read with fetch, not EventSource: EventSource cannot send
// the Authorization header, and the server takes the token only there (a token
// in a URL would end up in logs). So this file parses text/event-stream itself
// and reconnects with Last-Event-ID, as EventSource would.
"use strict";

const TOKEN_KEY = "llmmixer-token";
const RECONNECT_MS = 2000;
const MAX_EVENT_LINES = 300;

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- talking to the API -------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

class ApiError extends Error {
  constructor(status, messages) {
    super(messages.join("\n"));
    this.status = status;
    this.messages = messages;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = authHeaders();
  // The server takes a request that changes something only as JSON (what other
  // sites cannot send without its permission), so such a request always has a body.
  if (method !== "GET" && body === undefined) body = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) askForToken(sentToken(headers));
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const messages = (data && data.errors) || [`${response.status} ${response.statusText}`];
    throw new ApiError(response.status, messages);
  }
  return data;
}

function notify(message, isError = false) {
  const notice = $("#notice");
  notice.textContent = message;
  notice.className = isError ? "error" : "";
  notice.hidden = !message;
}

let tokenRefused = false;  // the last token pasted was refused (said until another is pasted)

// A 401 answered a request that carried `sent` (the token, or null for none).
// A refused token is forgotten, so the page does not keep sending it, and the
// person is asked again. A 401 for a request sent before the token now stored
// was pasted says nothing about that token: requests run concurrently, and a
// late answer must not throw away the token just pasted.
function askForToken(sent) {
  const stored = sessionStorage.getItem(TOKEN_KEY) || null;
  if (sent !== stored) return;
  if (sent !== null) {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenRefused = true;
  }
  $("#token-form").hidden = false;
  notify(tokenRefused
    ? "The server refused that API token: paste the value of LLMMIXER_API_TOKEN it was started with."
    : "The server wants an API token: paste the value of LLMMIXER_API_TOKEN above.", true);
  $("#token-input").focus();
}

function sentToken(headers) {
  return headers.Authorization ? headers.Authorization.slice("Bearer ".length) : null;
}

// ---- the list of runs ---------------------------------------------------------------

let currentRun = null;

function runsPath() {
  // The filters are the runs' search attributes, as `llmmixer list --state --spec`.
  const params = new URLSearchParams({ limit: "100" });
  const state = $("#runs-state").value;
  const spec = $("#runs-spec").value.trim();
  if (state) params.set("state", state);
  if (spec) params.set("spec", spec);
  return `/workflows?${params}`;
}

let runsAsked = 0;  // answers to an older filter must not replace a newer one's

async function loadRuns() {
  const mine = ++runsAsked;
  const filtered = Boolean($("#runs-state").value || $("#runs-spec").value.trim());
  let data;
  try {
    data = await api(runsPath());
  } catch (error) {
    if (error.status !== 401 && mine === runsAsked) notify(`Could not list runs: ${error.message}`, true);
    return;
  }
  if (mine !== runsAsked) return;
  const list = $("#runs");
  list.replaceChildren();
  for (const run of data.runs) {
    const link = el(
      "a",
      { href: `#/runs/${encodeURIComponent(run.workflow_id)}`, dataset: { run: run.workflow_id } },
      el("span", { textContent: run.workflow_id }),
      el("span", { className: `state ${run.status}`, textContent: run.status }),
    );
    if (run.workflow_id === currentRun) link.classList.add("current");
    list.append(el("li", {}, link));
  }
  if (!data.runs.length) {
    list.append(el("li", { className: "muted", textContent: filtered ? "no such runs" : "no runs yet" }));
  }
}

// ---- schedules ----------------------------------------------------------------------

async function loadSchedules() {
  let data;
  try {
    data = await api("/schedules");
  } catch (error) {
    if (error.status !== 401) notify(`Could not list schedules: ${error.message}`, true);
    return;
  }
  const list = $("#schedules");
  list.replaceChildren();
  for (const schedule of data.schedules) list.append(scheduleRow(schedule));
  if (!data.schedules.length) list.append(el("li", { className: "muted", textContent: "no schedules" }));
}

function scheduleRow(schedule) {
  const next = schedule.paused
    ? `paused${schedule.note ? `: ${schedule.note}` : ""}`
    : `next ${schedule.next_run ? new Date(schedule.next_run).toISOString().replace(".000Z", "Z") : "—"}`;
  return el(
    "li",
    { dataset: { schedule: schedule.schedule_id } },
    el("span", { className: "schedule-name", textContent: `${schedule.schedule_id} (${schedule.spec})` }),
    el("span", { className: "schedule-when muted", textContent: `${schedule.cron.join(", ")} · ${next}` }),
    el(
      "span",
      { className: "schedule-actions" },
      el("button", {
        type: "button",
        className: "schedule-trigger",
        textContent: "Trigger now",
        title: "Start this schedule's run now, as if it were due (its overlap policy applies)",
        dataset: { trigger: schedule.schedule_id },
        onclick: (event) => triggerSchedule(schedule.schedule_id, event.currentTarget),
      }),
      el("button", {
        type: "button",
        className: "schedule-pause",
        textContent: schedule.paused ? "Unpause" : "Pause",
        title: schedule.paused
          ? "Start runs again when they are due"
          : "Start no runs until unpaused (a run going on goes on)",
        onclick: (event) => pauseSchedule(schedule, event.currentTarget),
      }),
    ),
  );
}

// POST /schedules/{id}/pause or /unpause. The list of schedules is eventually
// consistent, so the row shows the state the answer reports, not a new listing.
async function pauseSchedule(schedule, button) {
  const action = schedule.paused ? "unpause" : "pause";
  const id = schedule.schedule_id;
  button.disabled = true;
  try {
    const answer = await api(`/schedules/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    notify(`${id}: ${answer.message}`);
    button.closest("li").replaceWith(scheduleRow({ ...schedule, paused: answer.paused, note: answer.note }));
  } catch (error) {
    if (error.status !== 401) notify(`Could not ${action} ${id}: ${error.message}`, true);
    button.disabled = false;
  }
}

// POST /schedules/{id}/trigger; the run it starts shows in the list of runs
// once Temporal's visibility has it, so the list is asked again a few times.
async function triggerSchedule(scheduleId, button) {
  button.disabled = true;
  try {
    const answer = await api(`/schedules/${encodeURIComponent(scheduleId)}/trigger`, { method: "POST" });
    notify(`${scheduleId}: ${answer.message}`);
  } catch (error) {
    if (error.status !== 401) notify(`Could not trigger ${scheduleId}: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
  for (const delay of [500, 1500, 4000]) setTimeout(loadRuns, delay);
}

// ---- one run ------------------------------------------------------------------------

let streamAbort = null;
let refreshTimer = null;
let needs = {};             // step id -> ids it needs, from the spec
let liveText = {};          // step id -> text streamed since the step started
let lastProgress = null;

function dagOrder(stepIds) {
  // Topological order (a step after everything it needs), ties kept in spec
  // order; steps the spec does not list (from a decompose step) keep their place.
  const order = [];
  const seen = new Set();
  const visit = (id, path) => {
    if (seen.has(id) || path.has(id)) return;
    path.add(id);
    for (const need of needs[id] || []) if (stepIds.includes(need)) visit(need, path);
    seen.add(id);
    order.push(id);
  };
  for (const id of stepIds) visit(id, new Set());
  return order;
}

function money(value) {
  return value === null || value === undefined ? "unknown" : `$${value.toFixed(4)}`;
}

function preview(text, limit = 400) {
  if (!text) return "";
  return text.length > limit ? `${text.slice(0, limit)}…` : text;
}

// The budget that holds a waiting step (the workflow's budget_hold): which
// scope ("" is the spec's) and which limit to raise.
function heldBudget(record) {
  return record.status === "waiting" ? record.budget_hold || null : null;
}

function actionsFor(record) {
  const actions = [];
  // An approval step, or an llm step whose tool call waits to be approved.
  if (record.status === "waiting" && (record.kind === "approval" || record.tool_approval)) {
    actions.push("approve", "reject");
  }
  if (heldBudget(record)) {
    actions.push("budget");  // retrying would only be held again
  } else if (record.status === "waiting" || record.status === "failed") {
    actions.push("retry");
  }
  if (["pending", "waiting", "failed"].includes(record.status)) actions.push("skip", "override");
  return actions;
}

const ACTION_LABELS = {
  retry: "Retry", skip: "Skip…", override: "Override…", approve: "Approve", reject: "Reject…",
  budget: "Raise budget…",
};

async function raiseBudget(id, step, held) {
  const scope = held.step ? `the budget of ${held.step}` : "the spec's budget";
  const answer = prompt(`New ${held.limit} for ${scope} (now ${held.current}):`, "");
  if (answer === null) return;
  const value = Number(answer);
  if (!answer.trim() || !Number.isFinite(value)) {
    notify(`${held.limit} must be a number above ${held.current}`, true);
    return;
  }
  try {
    const limits = await api(`/workflows/${encodeURIComponent(id)}/budget`, {
      method: "POST",
      body: { step: held.step, [held.limit]: value },
    });
    notify(`${scope} raised: max_tokens ${limits.max_tokens ?? "none"}, ` +
      `max_cost_usd ${limits.max_cost_usd ?? "none"}; ${step} can start`);
  } catch (error) {
    notify(`raising ${scope} refused: ${error.message}`, true);
  }
  scheduleRefresh(id);
}

function renderProgress(id, progress) {
  lastProgress = progress;
  const closed = ["completed", "failed", "cancelled"].includes(progress.status);
  $("#run-id").textContent = id;
  const status = $("#run-status");
  status.textContent = progress.status;
  status.className = `state ${progress.status}`;
  const usage = progress.usage || {};
  $("#run-summary").textContent =
    `${progress.name || ""} · tokens ${usage.input_tokens || 0} in / ${usage.output_tokens || 0} out` +
    ` · cost ${money(usage.cost_usd)}${usage.cost_complete === false ? " (some prices unknown)" : ""}` +
    (progress.dry_run ? " · dry run" : "");
  $("#run-error").hidden = !progress.error;
  $("#run-error").textContent = progress.error || "";
  $("#run-cancel").hidden = closed;
  $("#run-output").textContent = progress.output || "";

  const body = $("#steps tbody");
  body.replaceChildren();
  for (const stepId of dagOrder(Object.keys(progress.steps))) {
    const record = progress.steps[stepId];
    const model = record.provider ? `${record.provider} / ${record.model || ""}` : "";
    const live = record.status === "running" ? liveText[stepId] : "";
    const skipped = record.status === "skipped" && record.skipped_reason
      ? `skipped: ${record.skipped_reason}` : "";
    const text = record.output || live || skipped || record.error || record.waiting_reason || "";
    const buttons = closed ? [] : actionsFor(record).map((action) =>
      el("button", {
        type: "button",
        textContent: ACTION_LABELS[action],
        dataset: { action, step: stepId },
        onclick: () => intervene(id, stepId, action),
      }));
    const needsText = (needs[stepId] || []).length ? `needs ${needs[stepId].join(", ")}` : "";
    body.append(el("tr", { dataset: { step: stepId } },
      el("td", {}, el("strong", { textContent: stepId }), el("br"),
        el("span", { className: "muted", textContent: needsText })),
      el("td", { className: `state ${record.status}`, textContent: record.status }),
      el("td", { textContent: record.kind || "" }),
      el("td", { textContent: model }),
      el("td", { className: "attempts", textContent: String(record.attempts) }),
      el("td", { textContent: `${record.usage.input_tokens} / ${record.usage.output_tokens}` }),
      el("td", { textContent: money(record.cost_usd) }),
      el("td", { className: record.error && !record.output ? "output error" : "output",
        textContent: preview(text) }),
      el("td", { className: "actions" }, ...buttons),
    ));
  }
}

async function refreshProgress(id) {
  try {
    const progress = await api(`/workflows/${encodeURIComponent(id)}`);
    if (id === currentRun) renderProgress(id, progress);
  } catch (error) {
    if (error.status !== 401) notify(`Could not read run ${id}: ${error.message}`, true);
  }
}

function scheduleRefresh(id) {
  // Events can come in bursts; one progress read per burst is enough.
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refreshProgress(id); }, 150);
}

async function intervene(id, step, action) {
  if (action === "budget") {
    const held = heldBudget(lastProgress.steps[step]);
    if (held) await raiseBudget(id, step, held);
    return;
  }
  const body = {};
  if (action === "override") {
    const output = prompt(`New output for step ${step}:`);
    if (output === null) return;
    body.output = output;
  } else if (action === "reject" || action === "skip") {
    // Asking first also guards the click: a skip or a reject cannot be undone.
    const reason = prompt(`Why ${action} step ${step}? (optional)`, "");
    if (reason === null) return;
    if (reason.trim()) body.reason = reason.trim();
  }
  try {
    const outcome = await api(
      `/workflows/${encodeURIComponent(id)}/steps/${encodeURIComponent(step)}/${action}`,
      { method: "POST", body },
    );
    notify(`${action} ${step}: ${outcome.message} (now ${outcome.status})`);
  } catch (error) {
    notify(`${action} ${step} refused: ${error.message}`, true);
  }
  scheduleRefresh(id);
}

function logEvent(event) {
  const list = $("#events");
  const summary = event.type === "step_delta"
    ? `${event.step}: +${(event.data.text || "").length} chars`
    : `${event.step || ""} ${JSON.stringify(event.data)}`;
  list.append(el("li", { value: event.offset, textContent: `${event.type} ${summary}` }));
  while (list.children.length > MAX_EVENT_LINES) list.firstElementChild.remove();
  $("#events-count").textContent = String(event.offset + 1);
}

function handleEvent(id, event) {
  if (event.type === "step_started") liveText[event.step] = "";
  if (event.type === "step_delta") {
    liveText[event.step] = (liveText[event.step] || "") + (event.data.text || "");
    if (lastProgress && lastProgress.steps[event.step]) {
      const row = document.querySelector(`tr[data-step="${CSS.escape(event.step)}"] td.output`);
      if (row) row.textContent = preview(liveText[event.step]);
    }
  } else {
    scheduleRefresh(id);
  }
  logEvent(event);
}

function parseEventBlock(block) {
  // One SSE event: lines of `field: value`; comments (":") and `retry:` ignored.
  const event = { id: null, type: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") event.id = value;
    else if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
  }
  return event.data.length ? event : null;
}

async function followEvents(id, signal) {
  let lastEventId = null;
  for (;;) {
    try {
      const headers = authHeaders();
      if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
      const response = await fetch(`/workflows/${encodeURIComponent(id)}/events`, { headers, signal });
      if (response.status === 401) { askForToken(sentToken(headers)); return; }
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      $("#connection").textContent = "live";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const parsed = parseEventBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!parsed) continue;
          if (parsed.id !== null) lastEventId = parsed.id;
          handleEvent(id, JSON.parse(parsed.data.join("\n")));
        }
      }
      // A clean end: the run has closed and every event was sent.
      $("#connection").textContent = "run closed";
      scheduleRefresh(id);
      loadRuns();
      return;
    } catch (error) {
      if (signal.aborted) return;
      $("#connection").textContent = `reconnecting (${error.message})`;
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
      if (signal.aborted) return;
    }
  }
}

let opened = 0;  // counts openRun calls: an earlier one still awaiting stops there

async function openRun(id) {
  const mine = ++opened;
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
  currentRun = id;
  needs = {};
  liveText = {};
  lastProgress = null;
  $("#events").replaceChildren();
  $("#events-count").textContent = "0";
  $("#steps tbody").replaceChildren();
  $("#run").hidden = false;
  $("#empty").hidden = true;
  for (const link of document.querySelectorAll("#runs a")) {
    link.classList.toggle("current", link.dataset.run === id);
  }
  let spec = null;
  try {
    ({ spec } = await api(`/workflows/${encodeURIComponent(id)}/spec`));
  } catch (_) {
    spec = null;  // without the spec the steps keep the run's own order
  }
  // Opened again meanwhile (another run, or this one with a new token): only
  // the latest may follow the events, or each event would be shown twice.
  if (mine !== opened) return;
  for (const step of (spec && spec.steps) || []) needs[step.id] = step.needs || [];
  await refreshProgress(id);
  if (mine !== opened) return;
  streamAbort = new AbortController();
  followEvents(id, streamAbort.signal);
}

function route() {
  const match = location.hash.match(/^#\/runs\/(.+)$/);
  if (match) {
    openRun(decodeURIComponent(match[1]));
  } else {
    opened += 1;
    if (streamAbort) streamAbort.abort();
    currentRun = null;
    $("#run").hidden = true;
    $("#empty").hidden = false;
  }
}

// ---- wiring -------------------------------------------------------------------------

function setup() {
  $("#token-button").onclick = () => { $("#token-form").hidden = !$("#token-form").hidden; };
  $("#token-form").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
    tokenRefused = false;
    $("#token-input").value = "";
    $("#token-form").hidden = true;
    notify("");
    loadRuns();
    loadSchedules();
    route();
  };
  $("#token-clear").onclick = () => { sessionStorage.removeItem(TOKEN_KEY); notify("Token forgotten."); };
  $("#runs-refresh").onclick = () => { loadRuns(); loadSchedules(); };
  $("#runs-state").onchange = loadRuns;
  $("#runs-spec").oninput = loadRuns;
  $("#runs-filter").onsubmit = (event) => { event.preventDefault(); loadRuns(); };
  $("#run-cancel").onclick = async () => {
    if (!currentRun || !confirm(`Cancel run ${currentRun}?`)) return;
    try {
      const answer = await api(`/workflows/${encodeURIComponent(currentRun)}/cancel`, { method: "POST" });
      notify(answer.message);
    } catch (error) {
      notify(`cancel refused: ${error.message}`, true);
    }
  };
  $("#start-form").onsubmit = async (event) => {
    event.preventDefault();
    const body = { spec: $("#start-spec").value, dry_run: $("#start-dry-run").checked };
    const wanted = $("#start-id").value.trim();
    if (wanted) body.workflow_id = wanted;
    try {
      const started = await api("/workflows", { method: "POST", body });
      notify(`started ${started.workflow_id}`);
      await loadRuns();
      location.hash = `#/runs/${encodeURIComponent(started.workflow_id)}`;
    } catch (error) {
      notify(`The run was not started:\n${error.message}`, true);
    }
  };
  window.addEventListener("hashchange", route);
  loadRuns();
  loadSchedules();
  setInterval(loadRuns, 10000);
  setInterval(loadSchedules, 30000);
  route();
}

document.addEventListener("DOMContentLoaded", setup);
