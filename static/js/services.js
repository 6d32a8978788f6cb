// Services list: live statuses over the websocket /ws/services/ (no reload, through live.js), copy
// buttons, local dates, and the terminate confirmation dialog. Without this script the page still works: links go
// to the confirmation page and the statuses are those of the moment the page was loaded.
(function () {
  "use strict";
  const script = document.currentScript;
  const table = document.getElementById("services");
  if (!table || !script) return;
  const text = {
    public: script.dataset.i18nPublic,
    private: script.dataset.i18nPrivate,
    copied: script.dataset.i18nCopied,
    copy: script.dataset.i18nCopy,
    live: script.dataset.i18nLive,
    offline: script.dataset.i18nOffline,
    loggedOut: script.dataset.i18nLoggedOut,
    count: script.dataset.i18nCount,
  };
  const read = (id) => JSON.parse(document.getElementById(id).textContent);
  const statusLabels = read("status-labels");
  const urls = read("url-templates");
  const chatRuntimes = read("chat-runtimes");
  const modelNameVariables = read("model-name-variables");
  const PLACEHOLDER = "00000000-0000-0000-0000-000000000000";
  const body = table.tBodies[0];
  const empty = document.getElementById("services-empty");
  const liveState = document.getElementById("live-state");
  const filter = { status: table.dataset.statusFilter, scope: table.dataset.scope, user: table.dataset.user };

  // --- copy buttons and dates -------------------------------------------------------------------
  function copyText(value, button) {
    const label = button.firstChild;
    window.modelserveCopy(value).then(() => {
      label.textContent = text.copied;
      setTimeout(() => { label.textContent = text.copy; }, 1500);
    }, () => {});
  }
  function wireRow(row) {
    row.querySelectorAll("button.copy").forEach((button) => {
      button.hidden = false;
      button.onclick = () => copyText(button.dataset.copy, button);
    });
    row.querySelectorAll("time[datetime]").forEach((time) => window.modelserveLocalTime(time, false));
    row.querySelectorAll("a.terminate").forEach((link) => { link.onclick = openTerminate; });
  }

  // --- terminate dialog -------------------------------------------------------------------------
  const dialog = document.getElementById("terminate-dialog");
  function openTerminate(event) {
    if (!dialog || typeof dialog.showModal !== "function") return; // the confirmation page then
    event.preventDefault();
    const link = event.currentTarget;
    dialog.querySelector("form").action = link.getAttribute("href");
    dialog.querySelector(".terminate-name").textContent = link.dataset.name || "";
    dialog.showModal();
  }
  if (dialog) {
    dialog.querySelector("button.cancel").onclick = () => dialog.close();
  }

  // --- live rows --------------------------------------------------------------------------------
  function statusOf(service) {
    return String(service.status || "");
  }
  function matches(service) {
    if (filter.status && statusOf(service) !== filter.status) return false;
    if (filter.scope === "mine" && service.owner !== filter.user) return false;
    if (filter.scope.startsWith("project:") && String(service.project) !== filter.scope.slice(8)) return false;
    return true;
  }
  function offersChat(service) {
    if (chatRuntimes.includes(service.runtime)) return true;
    const environ = service.environ || {};
    return modelNameVariables.some((name) => environ[name]);
  }
  function url(kind, id) {
    return urls[kind].replace(PLACEHOLDER, id);
  }
  function newRow(service) {
    const row = document.getElementById("service-row").content.firstElementChild.cloneNode(true);
    row.dataset.id = service.id;
    const time = row.querySelector("time");
    time.setAttribute("datetime", service.created_at);
    time.textContent = service.created_at;
    const copy = row.querySelector("button.copy");
    copy.dataset.copy = service.url;
    row.querySelector(".svc-name a").href = url("detail", service.id);
    row.querySelector(".act-chat").href = url("chat", service.id);
    row.querySelector(".act-modify").href = url("modify", service.id);
    const terminate = row.querySelector(".act-terminate");
    terminate.href = url("terminate", service.id);
    wireRow(row);
    return row;
  }
  function fill(row, service) {
    // textContent everywhere: names and addresses are user data, never HTML.
    row.querySelector(".svc-name a").textContent = service.name;
    const status = statusOf(service);
    row.dataset.name = service.name;
    row.dataset.runtime = service.runtime || "";
    row.dataset.status = status;
    row.dataset.statusLabel = String(statusLabels[status] || status);
    row.dataset.desired = String(service.desired_replicas);
    row.dataset.created = service.created_at;
    const badge = row.querySelector(".svc-status .status");
    badge.className = "status status-" + status.toLowerCase();
    badge.textContent = String(statusLabels[status] || status).toUpperCase();
    const live = (service.routes || []).filter((r) => r.status === "healthy").length;
    row.querySelector(".svc-replicas").textContent = live + " / " + service.desired_replicas;
    row.dataset.healthy = String(live);
    row.querySelector(".svc-url code").textContent = service.url;
    row.querySelector(".svc-public").textContent = service.open_to_public ? text.public : text.private;
    const owner = row.querySelector(".svc-owner");
    if (!owner.textContent) owner.textContent = service.owner; // an owner never changes
    // A service being terminated can no longer be chatted with or changed (as on its own page).
    const running = service.lifecycle === "created";
    const chat = row.querySelector(".act-chat");
    if (chat) chat.hidden = !running || !offersChat(service);
    // The websocket says whether the user may change the service; the REST list (resync) does not.
    const canWrite = service.can_write === undefined ? row.dataset.canWrite === "1" : service.can_write;
    row.dataset.canWrite = canWrite ? "1" : "";
    const modify = row.querySelector(".act-modify");
    if (modify) modify.hidden = !canWrite || !running;
    const terminate = row.querySelector("a.terminate");
    if (terminate) {
      terminate.hidden = !canWrite || !running;
      terminate.dataset.name = service.name;
    }
  }
  function refreshEmpty() {
    const any = body.rows.length > 0;
    table.hidden = !any;
    if (empty) empty.hidden = any;
    applyView();
  }

  // --- sort and find: over the rendered rows, as the server does for ?sort= and ?q= without JS ----
  const form = document.getElementById("filters");
  const search = document.getElementById("filter-q");
  const statusSelect = document.getElementById("filter-status");
  const sortInput = document.getElementById("filter-sort");
  const count = document.getElementById("filter-count");
  const noneMatch = document.getElementById("services-none-match");
  const STATUS_ORDER = ["UNHEALTHY", "DEGRADED", "PROVISIONING", "READY", "SLEEPING", "HEALTHY", "TERMINATING"];
  let sort = table.dataset.sort || "-created";
  const lower = (value) => String(value || "").toLowerCase();
  function sortValue(row, key) {
    const d = row.dataset;
    if (key === "name") return [lower(d.name), Date.parse(d.created) || 0];
    if (key === "status") {
      const index = STATUS_ORDER.indexOf(d.status);
      return [index < 0 ? STATUS_ORDER.length : index, lower(d.name)];
    }
    if (key === "replicas") return [Number(d.healthy) || 0, Number(d.desired) || 0, lower(d.name)];
    return [Date.parse(d.created) || 0];
  }
  function compare(a, b) {
    const key = sort.replace(/^-/, "");
    const left = sortValue(a, key);
    const right = sortValue(b, key);
    for (let i = 0; i < left.length; i += 1) {
      if (left[i] < right[i]) return sort.startsWith("-") ? 1 : -1;
      if (left[i] > right[i]) return sort.startsWith("-") ? -1 : 1;
    }
    return 0;
  }
  function rememberInUrl() {
    const params = new URLSearchParams(window.location.search);
    const set = (name, value) => { if (value) params.set(name, value); else params.delete(name); };
    set("q", search ? search.value.trim() : "");
    set("status", filter.status);
    set("sort", sort === "-created" ? "" : sort);
    const query = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (query ? "?" + query : ""));
  }
  function applyView() {
    const words = search ? lower(search.value).split(/\s+/).filter(Boolean) : [];
    const rows = Array.from(body.rows);
    let shown = 0;
    rows.forEach((row) => {
      const d = row.dataset;
      const haystack = lower([d.name, d.runtime, d.status, d.statusLabel].join(" "));
      row.hidden = !words.every((word) => haystack.includes(word));
      if (!row.hidden) shown += 1;
    });
    rows.sort(compare).forEach((row) => body.appendChild(row));
    table.querySelectorAll("thead a.sort").forEach((link) => {
      const key = link.dataset.sort;
      link.parentElement.setAttribute("aria-sort", sort === key ? "ascending" : sort === "-" + key ? "descending" : "none");
    });
    if (sortInput) sortInput.value = sort;
    if (noneMatch) noneMatch.hidden = shown > 0 || rows.length === 0;
    if (count) count.textContent = words.length && rows.length ? format(text.count, { shown: shown, total: rows.length }) : "";
  }
  function format(template, values) {
    return String(template || "").replace(/%\((\w+)\)s/g, (_, key) => String(values[key]));
  }
  table.querySelectorAll("thead a.sort").forEach((link) => {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      const key = link.dataset.sort;
      sort = sort === key ? "-" + key : key;
      applyView();
      rememberInUrl();
    });
  });
  if (search) {
    // Loaded with ?q=, the page holds only the rows that matched: the others come from the REST list.
    let allRows = !search.value.trim();
    search.addEventListener("input", () => {
      applyView();
      rememberInUrl();
      if (!allRows) { allRows = true; resync(); }
    });
  }
  if (statusSelect && form) {
    // Another status: the rows that no longer match leave at once; those that now match come from
    // the REST list (the page holds only the rows of the status it was loaded with).
    statusSelect.addEventListener("change", () => {
      filter.status = statusSelect.value;
      Array.from(body.rows).forEach((row) => { if (filter.status && row.dataset.status !== filter.status) row.remove(); });
      refreshEmpty();
      rememberInUrl();
      resync();
    });
  }
  function findRow(id) {
    return Array.from(body.rows).find((r) => r.dataset.id === id);
  }
  function onService(service) {
    let row = findRow(service.id);
    if (!matches(service)) {
      if (row) row.remove();
      refreshEmpty();
      return;
    }
    if (!row) {
      row = newRow(service);
      body.insertBefore(row, body.firstChild); // newest first, as the list is ordered
    }
    fill(row, service);
    refreshEmpty();
  }
  function onGone(id) {
    const row = findRow(id);
    if (row) row.remove();
    refreshEmpty();
  }

  Array.from(body.rows).forEach(wireRow);
  applyView();

  // Whatever changed before the socket was open (or while it was down) comes from the REST list.
  function resync() {
    fetch("/api/v1/services/", { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : null))
      .then((services) => {
        if (!Array.isArray(services)) return;
        const seen = new Set(services.map((s) => s.id));
        Array.from(body.rows).forEach((row) => { if (!seen.has(row.dataset.id)) row.remove(); });
        services.slice().reverse().forEach(onService);
        refreshEmpty();
      })
      .catch(() => {});
  }

  if (window.modelserveLive) window.modelserveLive.keepLive({
    path: "/ws/services/",
    state: liveState,
    liveText: text.live,
    offlineText: text.offline,
    // 4401: the session ended (logged out, or the password changed elsewhere): no reconnect helps.
    finalText: text.loggedOut,
    isFinal: (event) => event.code === 4401,
    onOpen: () => {
      table.dataset.live = "1";
      resync();
    },
    onMessage: (event) => {
      if (event.type === "service") onService(event.service);
      else if (event.type === "gone") onGone(event.id);
    },
    onClose: () => { table.dataset.live = ""; },
  });
})();
