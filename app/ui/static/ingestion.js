// The ingestion page: starts runs and polls the API until every shown run is terminal.
// The token lives in sessionStorage (this tab only) and travels only in the Authorization
// header; it is never put in a URL, the DOM or the console.
"use strict";

(() => {
  const root = document.getElementById("ingestion");
  if (!root) return;

  const API_BASE = root.dataset.apiBase;
  const POLL_MS = Number(root.dataset.pollMs) || 1000;
  const LIST_LIMIT = 20;
  const TOKEN_KEY = "ingest.apiToken";
  const TERMINAL = new Set(["success", "failed"]);
  const KNOWN_STATUSES = new Set(["queued", "running", "success", "failed"]);
  const DASH = "\u2014";

  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token");
  const forgetButton = document.getElementById("token-forget");
  const startForm = document.getElementById("start-form");
  const jobSelect = document.getElementById("job-code");
  const marketplaceInput = document.getElementById("marketplace-code");
  const startButton = document.getElementById("start-button");
  const message = document.getElementById("message");
  const table = document.getElementById("runs");
  const tbody = document.getElementById("runs-body");
  const emptyNote = document.getElementById("runs-empty");

  let timer = null;
  let latestRequest = 0; // answers to older list requests are dropped, never shown over newer
  let listFailed = false; // the message shows a list error, to clear once the list loads again

  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (err) {
      return ""; // storage disabled: the field still works for this page
    }
  }

  function saveToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // storage disabled: nothing to keep
    }
  }

  function currentToken() {
    const token = tokenInput.value.trim();
    saveToken(token);
    return token;
  }

  function showMessage(text, kind) {
    message.textContent = text;
    message.className = "message" + (kind ? " message-" + kind : "");
    message.dataset.kind = kind || "";
  }

  function setPolling(on) {
    table.dataset.polling = on ? "true" : "false";
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, POLL_MS);
    setPolling(true);
  }

  function stopPolling() {
    clearTimeout(timer);
    timer = null;
    setPolling(false);
  }

  function api(method, url, body) {
    const headers = { Accept: "application/json", Authorization: "Bearer " + currentToken() };
    const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init);
  }

  async function errorText(response) {
    let detail = "";
    try {
      const data = await response.json();
      if (Array.isArray(data.detail)) {
        // FastAPI's validation errors: say which field and what is wrong with it.
        detail = data.detail
          .map((e) => (Array.isArray(e.loc) ? e.loc.slice(1).join(".") + ": " : "") + e.msg)
          .join("; ");
      } else if (data.detail !== undefined) {
        detail = String(data.detail);
      }
    } catch (err) {
      detail = response.statusText;
    }
    if (response.status === 401) return "The token was refused (401): check it. " + detail;
    if (response.status === 503) {
      return "The service cannot do this right now (503): " + detail + " The runs shown are cleared until it answers again.";
    }
    return "Error " + response.status + ": " + detail;
  }

  function formatDuration(ms) {
    if (ms === null || ms === undefined) return DASH;
    if (ms < 1000) return ms + " ms";
    const seconds = ms / 1000;
    if (seconds < 60) return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
    const minutes = Math.floor(seconds / 60);
    return minutes + " min " + Math.round(seconds - minutes * 60) + " s";
  }

  function formatTime(iso) {
    // "2026-01-27T10:00:00.123456Z" -> "2026-01-27 10:00:00"
    return iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, "") : DASH;
  }

  function cell(text, testid) {
    const td = document.createElement("td");
    if (testid) td.dataset.testid = testid;
    if (text !== undefined) td.textContent = text;
    return td;
  }

  function statsCell(stats) {
    const td = cell(undefined, "run-stats");
    if (!stats || typeof stats !== "object" || Object.keys(stats).length === 0) {
      td.textContent = DASH;
      return td;
    }
    const list = document.createElement("dl");
    list.className = "stats";
    for (const [key, value] of Object.entries(stats)) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
      list.append(dt, dd);
    }
    td.append(list);
    return td;
  }

  function renderRow(run) {
    const tr = document.createElement("tr");
    tr.dataset.testid = "run-row";
    tr.dataset.runId = String(run.id);
    tr.dataset.status = run.status;

    const statusCell = cell(undefined);
    const badge = document.createElement("span");
    const statusClass = KNOWN_STATUSES.has(run.status) ? run.status : "unknown";
    badge.className = "status status-" + statusClass;
    badge.dataset.testid = "run-status";
    badge.textContent = run.status;
    statusCell.append(badge);

    const duration = cell(formatDuration(run.duration_ms), "run-duration");
    if (run.duration_ms !== null && run.duration_ms !== undefined) {
      duration.dataset.durationMs = String(run.duration_ms);
    }

    const error = cell("", "run-error");
    if (run.status === "failed" && run.error_message) {
      error.textContent = run.error_message;
      error.className = "error-text";
    }

    tr.append(
      cell(String(run.id), "run-id"),
      cell(run.job_code, "run-job"),
      cell(run.marketplace_code, "run-marketplace"),
      statusCell,
      cell(formatTime(run.created_at), "run-created"),
      duration,
      statsCell(run.stats_json),
      error,
    );
    return tr;
  }

  function renderRuns(runs) {
    tbody.replaceChildren(...runs.map(renderRow));
    emptyNote.hidden = runs.length > 0;
  }

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (!currentToken()) {
      stopPolling();
      showMessage("Enter the API token to see and start runs.", "info");
      return;
    }
    const requestId = ++latestRequest;
    let response;
    try {
      response = await api("GET", API_BASE + "?limit=" + LIST_LIMIT);
    } catch (err) {
      if (requestId !== latestRequest) return;
      listFailed = true;
      showMessage("The API did not answer (" + err.message + "); retrying.", "error");
      schedule();
      return;
    }
    if (requestId !== latestRequest) return;
    if (!response.ok) {
      stopPolling();
      listFailed = true;
      // Rows from before the error (a running one no longer polled) would pass for current.
      tbody.replaceChildren();
      emptyNote.hidden = true;
      showMessage(await errorText(response), "error");
      return;
    }
    const runs = await response.json();
    if (requestId !== latestRequest) return;
    renderRuns(runs);
    if (listFailed) {
      listFailed = false;
      showMessage("", "");
    }
    if (runs.some((run) => !TERMINAL.has(run.status))) schedule();
    else stopPolling();
  }

  async function startRun(event) {
    event.preventDefault();
    if (!currentToken()) {
      showMessage("Enter the API token first.", "error");
      tokenInput.focus();
      return;
    }
    startButton.disabled = true;
    try {
      const response = await api("POST", API_BASE, {
        job_code: jobSelect.value,
        marketplace_code: marketplaceInput.value.trim(),
      });
      if (response.status === 202) {
        const run = await response.json();
        showMessage(
          "Run " + run.id + " started: " + run.job_code + " on " + run.marketplace_code + ".",
          "info",
        );
      } else {
        showMessage(await errorText(response), "error");
      }
    } catch (err) {
      showMessage("The API did not answer (" + err.message + ").", "error");
    } finally {
      startButton.disabled = false;
    }
    refresh();
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    showMessage("", "");
    refresh();
  });
  forgetButton.addEventListener("click", () => {
    tokenInput.value = "";
    saveToken("");
    stopPolling();
    renderRuns([]);
    showMessage("Token forgotten.", "info");
  });
  startForm.addEventListener("submit", startRun);

  tokenInput.value = readToken();
  refresh();
})();
