// The service page: routes (with a cluster's members) and status live over /ws/services/<id>/ (through live.js), the event and
// decision logs refreshed on each change, per-route error details and logs (followed live), metric charts (SVG, every 5 s), copy
// buttons, local dates and the terminate confirmation. Every change itself is a plain form post, so
// the page works without this script; this only keeps what it shows up to date.
(function () {
  "use strict";
  const script = document.currentScript;
  if (!script) return;
  const t = script.dataset;
  const serviceId = t.service;
  const api = "/api/v1/services/" + serviceId + "/";
  const read = (id) => JSON.parse(document.getElementById(id).textContent);
  const routeStatuses = read("route-statuses");
  const statusLabels = read("status-labels");
  const memberStatuses = read("member-statuses");
  const format = (template, values) => template.replace(/%\((\w+)\)s/g, (_, key) => String(values[key]));
  const megabytes = (bytes) => (Number(bytes || 0) / 1048576).toFixed(1) + " MB";
  const $ = (selector, root) => (root || document).querySelector(selector);

  // --- small helpers ----------------------------------------------------------------------------
  const localTime = window.modelserveLocalTime;
  function timeCell(iso, withSeconds) {
    const time = document.createElement("time");
    time.setAttribute("datetime", iso);
    time.textContent = iso;
    localTime(time, withSeconds);
    return time;
  }
  function copyText(value, button) {
    const label = button.firstChild;
    window.modelserveCopy(value).then(() => {
      label.textContent = t.i18nCopied;
      setTimeout(() => { label.textContent = t.i18nCopy; }, 1500);
    }, () => {});
  }
  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" }).then((response) =>
      response.json().catch(() => ({})).then((body) => ({ status: response.status, body: body })));
  }

  document.querySelectorAll("button.copy").forEach((button) => {
    button.hidden = false;
    button.addEventListener("click", () => {
      const from = button.dataset.copyFrom;
      copyText(from ? document.getElementById(from).textContent : button.dataset.copy, button);
    });
  });
  document.querySelectorAll("time[datetime]").forEach((time) => localTime(time, time.closest("#events, #decisions")));

  // The token form says in which time zone its date is meant; after a form answered here (a new
  // token, or errors), the address goes back to the page's own, so a reload does not post again.
  const tz = $("#token-form input[name=tz]");
  if (tz && window.Intl) tz.value = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  const pagePath = "/services/" + serviceId + "/";
  if (location.pathname !== pagePath) {
    const anchor = $("#new-token") || $("#err-expires_on:not(:empty)") ? "#tokens" : ($("#rules .field-error:not(:empty), #rules .form-errors") ? "#rules" : "");
    history.replaceState(null, "", pagePath + anchor);
  }
  const newToken = $("#new-token");
  if (newToken) newToken.scrollIntoView({ block: "center" });

  // --- terminate dialog -------------------------------------------------------------------------
  const terminateDialog = $("#terminate-dialog");
  const terminateLink = $("a.terminate");
  if (terminateDialog && terminateLink && typeof terminateDialog.showModal === "function") {
    terminateLink.addEventListener("click", (event) => {
      event.preventDefault();
      terminateDialog.showModal();
    });
    $("button.cancel", terminateDialog).addEventListener("click", () => terminateDialog.close());
  }

  // --- revisions: promote and rollback confirm in a dialog; the panel follows the service -------
  // Each button is a link to its confirmation page (the page without this script); here it opens the
  // dialog instead, whose form posts to the same address. The panel is rendered by the server
  // (/services/<id>/revisions/, the compare of ?from=&to= kept) and swapped in when the service changes.
  const revisionsSection = $("#revisions");
  const revisionDialog = $("#revision-dialog");
  if (revisionDialog && typeof revisionDialog.showModal === "function") {
    revisionsSection.addEventListener("click", (event) => {
      const link = event.target.closest("a.revision-move");
      if (!link) return;
      event.preventDefault();
      $("form", revisionDialog).action = link.getAttribute("href");
      $("#revision-title").textContent = link.dataset.title;
      $(".revision-text", revisionDialog).textContent = link.dataset.text;
      $("button[type=submit]", revisionDialog).textContent = link.dataset.submit;
      revisionDialog.showModal();
    });
    $("button.cancel", revisionDialog).addEventListener("click", () => revisionDialog.close());
  }
  let revisionsTimer = null;
  let revisionsAsked = 0;
  function refreshRevisions() {
    const asked = ++revisionsAsked;
    const diff = $("#revision-diff");
    const query = diff ? "?from=" + encodeURIComponent(diff.dataset.from) + "&to=" + encodeURIComponent(diff.dataset.to) : "";
    fetch(revisionsSection.dataset.url + query, { credentials: "same-origin" }).then((response) => {
      if (!response.ok) return null;
      return response.text();
    }).then((html) => {
      if (html === null || asked !== revisionsAsked) return;
      const focused = document.activeElement && revisionsSection.contains(document.activeElement)
        ? document.activeElement.id : "";
      // The server's own rendering of the panel's template (every value escaped by it, as on a page
      // load), parsed as a document of its own (scripts in it never run), then moved in as nodes.
      const fragment = new DOMParser().parseFromString(html, "text/html");
      revisionsSection.replaceChildren(...Array.from(fragment.body.childNodes));
      revisionsSection.querySelectorAll("time[datetime]").forEach((time) => localTime(time, false));
      revisionsSection.dataset.refreshed = String(asked);
      if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
    }).catch(() => {});
  }
  function scheduleRevisions() {
    clearTimeout(revisionsTimer);
    revisionsTimer = setTimeout(refreshRevisions, 300);
  }

  // --- routes, live -----------------------------------------------------------------------------
  const routesTable = $("#routes");
  const routesBody = routesTable.tBodies[0];
  const routesById = new Map();
  const errorDialog = $("#error-dialog");
  const logsDialog = $("#logs-dialog");
  let logsRoute = null;

  function bytes(size) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (size >= 1024 && i < units.length - 1) { size /= 1024; i += 1; }
    return (i ? size.toFixed(1) : String(size)) + " " + units[i];
  }
  function fillRoute(row, route) {
    row.dataset.id = route.id;
    $(".r-id code", row).textContent = String(route.id).slice(0, 8);
    $(".r-node", row).textContent = route.node || "–";
    $(".r-address code", row).textContent = route.host && route.port ? route.host + ":" + route.port : "–";
    const badge = $(".r-status .status", row);
    badge.className = "status status-" + String(route.status).replace(/_/g, "");
    badge.textContent = String(routeStatuses[route.status] || route.status).toUpperCase();
    $(".r-ratio", row).textContent = Number(route.traffic_ratio).toFixed(2);
    // While its node pulls the image (SERVING_IMAGE_PULL=missing): bytes done of the total known so far.
    const pull = $(".r-pull", row);
    const progress = route.pull_progress || {};
    pull.hidden = !progress.total;
    pull.textContent = progress.total ? format(t.i18nPullProgress, { done: megabytes(progress.done), total: megabytes(progress.total) }) : "";
    // While the node copies the model folder (a node that does not share the web app's storage).
    const snap = route.snapshot || {};
    const copying = route.status === "provisioning" && (snap.state === "fetching" || snap.state === "waiting");
    const snapshotNote = $(".r-snapshot", row);
    if (snapshotNote) {
      snapshotNote.hidden = !copying;
      snapshotNote.textContent = copying ? format(t.i18nSnapshot, { done: bytes(snap.done || 0), total: bytes(snap.total || 0) }) : "";
    }
    fillMembers(row, route.members);
    $(".r-error .error-text", row).textContent = route.error || "";
    const hasError = route.error || (route.error_detail && Object.keys(route.error_detail).length);
    $(".r-error-detail", row).hidden = !hasError;
    $(".r-logs", row).hidden = false;
  }
  // A cluster-mode replica lists its containers (main first, as the API gives them): host name, node,
  // status and, for a failed sub, its error. A replica of one container shows no list.
  function fillMembers(row, members) {
    const list = $(".r-members", row);
    const many = Array.isArray(members) && members.length > 1;
    list.hidden = !many;
    if (!many) { list.replaceChildren(); return; }
    const items = members.map((member) => {
      const item = $("#member-item").content.firstElementChild.cloneNode(true);
      item.dataset.host = member.host_name;
      item.className = "member member-" + String(member.status).replace(/_/g, "");
      $(".m-host", item).textContent = member.host_name;
      $(".m-node", item).textContent = member.node ? format(t.i18nMemberNode, { name: member.node }) : t.i18nMemberNoNode;
      const labels = member.role === "main" ? routeStatuses : memberStatuses;
      $(".m-status", item).textContent = String(labels[member.status] || member.status);
      const error = $(".m-error", item);
      // Main's error is the route's own, in the row's Error cell already.
      const text = member.role === "main" ? "" : member.error || "";
      error.textContent = text;
      error.hidden = !text;
      return item;
    });
    list.replaceChildren(...items);
  }
  function wireRoute(row) {
    $(".r-error-detail", row).onclick = () => showError(row.dataset.id);
    $(".r-logs", row).onclick = () => showLogs(row.dataset.id);
  }
  function renderRoutes(routes) {
    routesById.clear();
    routes.forEach((route) => routesById.set(String(route.id), route));
    const existing = new Map(Array.from(routesBody.rows).map((row) => [row.dataset.id, row]));
    routes.forEach((route, index) => {
      let row = existing.get(String(route.id));
      if (!row) {
        row = $("#route-row").content.firstElementChild.cloneNode(true);
        wireRoute(row);
      }
      existing.delete(String(route.id));
      fillRoute(row, route);
      if (routesBody.rows[index] !== row) routesBody.insertBefore(row, routesBody.rows[index] || null);
    });
    existing.forEach((row) => row.remove());
    routesTable.hidden = routes.length === 0;
    $("#routes-empty").hidden = routes.length > 0;
  }
  Array.from(routesBody.rows).forEach(wireRoute);

  function showError(id) {
    const route = routesById.get(id);
    if (!route || typeof errorDialog.showModal !== "function") return;
    const detail = route.error_detail || {};
    $(".error-message", errorDialog).textContent = route.error || detail.message || t.i18nNoMessage;
    const list = $(".error-fields", errorDialog);
    list.replaceChildren();
    Object.keys(detail).filter((key) => key !== "message").forEach((key) => {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      const value = detail[key];
      const pre = document.createElement("pre");
      pre.className = "code";
      pre.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
      dd.appendChild(pre);
      list.append(dt, dd);
    });
    errorDialog.showModal();
  }
  $("button.close", errorDialog).addEventListener("click", () => errorDialog.close());

  // The log dialog follows the replica's log live over /ws/services/<id>/routes/<route>/logs/ while
  // "Follow" is on (the default each time it opens); off, it shows the tail as of the last refresh.
  const logsPre = $(".logs-lines", logsDialog);
  const logsState = $(".logs-state", logsDialog);
  const followBox = $(".logs-follow", logsDialog);
  const MAX_SHOWN = 5000;
  const canFollow = Boolean(window.WebSocket && window.modelserveLive);
  let shown = [];
  let follower = null;

  // A cluster-mode replica is several containers: the picker chooses whose log (main1 by default).
  const memberPick = $(".logs-member", logsDialog);
  function showLogs(id) {
    logsRoute = id;
    $(".logs-route", logsDialog).textContent = String(id).slice(0, 8);
    const route = routesById.get(String(id));
    const members = route && Array.isArray(route.members) ? route.members : [];
    memberPick.replaceChildren(...members.map((member) => {
      const option = document.createElement("option");
      option.value = member.host_name;
      option.textContent = member.node ? member.host_name + " (" + format(t.i18nMemberNode, { name: member.node }) + ")"
        : member.host_name;
      return option;
    }));
    memberPick.closest("label").hidden = members.length < 2;
    if (!logsDialog.open && typeof logsDialog.showModal === "function") {
      followBox.checked = canFollow;
      logsDialog.showModal();
    }
    reloadLogs();
  }
  function logsQuery() {
    const member = memberPick.closest("label").hidden ? "" : memberPick.value;
    return "?tail=200" + (member && member !== "main1" ? "&member=" + encodeURIComponent(member) : "");
  }
  memberPick.addEventListener("change", reloadLogs);
  function reloadLogs() {
    if (followBox.checked) followLogs(); else loadLogs();
  }
  function setLines(lines, append) {
    // Stay at the bottom while the reader is there; leave them where they are once they scrolled up.
    const atBottom = logsPre.scrollHeight - logsPre.scrollTop - logsPre.clientHeight < 24;
    shown = append ? shown.concat(lines) : lines.slice();
    if (shown.length > MAX_SHOWN) shown = shown.slice(shown.length - MAX_SHOWN);
    logsPre.textContent = shown.join("\n");
    if (atBottom || !append) logsPre.scrollTop = logsPre.scrollHeight;
  }
  function stopFollowing() {
    if (follower) {
      const socket = follower;
      follower = null;
      socket.onclose = null;
      socket.close();
    }
    logsDialog.dataset.following = "";
  }
  function followLogs() {
    stopFollowing();
    logsState.textContent = t.i18nLogsLoading;
    const socket = new WebSocket(window.modelserveLive.socketURL(
      "/ws/services/" + serviceId + "/routes/" + logsRoute + "/logs/" + logsQuery()));
    follower = socket;
    let fresh = true;
    let ended = false;
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "lines") {
        setLines(event.lines || [], !fresh);
        fresh = false;
      } else if (event.type === "following") {
        if (fresh) setLines([], false);
        fresh = false;
        logsDialog.dataset.following = "1";
        logsState.textContent = t.i18nLogsFollowing;
      } else if (event.type === "end") {
        ended = true;
        if (fresh) setLines([], false);
        fresh = false;
        logsState.textContent = event.reason === "ended" || event.reason === "gone" ? t.i18nLogsEnded
          : event.reason === "not-running" ? (shown.length ? t.i18nLogsNotRunning : t.i18nLogsEmpty)
          : format(t.i18nLogsFailed, { reason: event.message || event.reason });
      }
    };
    socket.onclose = (event) => {
      if (follower !== socket) return;
      follower = null;
      logsDialog.dataset.following = "";
      followBox.checked = false;
      if (event.code === 4404) {
        setLines([], false);
        logsState.textContent = t.i18nLogsMissing;
      } else if (!ended) {
        logsState.textContent = t.i18nLogsInterrupted;
      }
    };
  }
  function loadLogs() {
    stopFollowing();
    logsState.textContent = t.i18nLogsLoading;
    getJSON(api + "routes/" + logsRoute + "/logs/" + logsQuery()).then(({ status, body }) => {
      if (followBox.checked) return; // Follow was turned on meanwhile: the socket shows the log
      if (status === 200) {
        const lines = Array.isArray(body.lines) ? body.lines : [];
        setLines(lines, false);
        const when = new Date().toLocaleTimeString();
        logsState.textContent = lines.length === 0 ? t.i18nLogsEmpty
          : (body.truncated ? t.i18nLogsTruncated + " " : "") + format(t.i18nLogsShown, { time: when });
      } else if (status === 404) {
        setLines([], false);
        logsState.textContent = t.i18nLogsMissing;
      } else if (status === 501) {
        setLines([], false);
        logsState.textContent = t.i18nLogsUnavailable;
      } else {
        const field = body && (body.tail || body.member);
        const reason = (body && (body.detail || (field && [].concat(field).join(" ")))) || "HTTP " + status;
        logsState.textContent = format(t.i18nLogsFailed, { reason: reason });
      }
    }).catch(() => { logsState.textContent = format(t.i18nLogsFailed, { reason: t.i18nNetwork }); });
  }
  if (!canFollow) {
    followBox.checked = false;
    followBox.closest("label").hidden = true;
  }
  followBox.addEventListener("change", () => {
    if (followBox.checked) {
      followLogs();
    } else {
      stopFollowing();
      logsState.textContent = format(t.i18nLogsPaused, { time: new Date().toLocaleTimeString() });
    }
  });
  $("button.refresh", logsDialog).addEventListener("click", reloadLogs);
  $("button.close", logsDialog).addEventListener("click", () => logsDialog.close());
  logsDialog.addEventListener("close", stopFollowing); // also Esc: nobody reads, so the node stops
  $("button.copy-log", logsDialog).addEventListener("click", (event) =>
    copyText(logsPre.textContent, event.currentTarget));

  // --- events and decisions (refreshed when the service changes) --------------------------------
  function renderTable(tableId, emptyId, items, cells) {
    const table = document.getElementById(tableId);
    const body = table.tBodies[0];
    body.replaceChildren();
    items.slice(0, 50).forEach((item) => {
      const row = document.createElement("tr");
      const labels = Array.from(table.tHead.rows[0].cells).map((cell) => cell.textContent);
      cells(item, row).forEach((content, index) => {
        const cell = document.createElement("td");
        cell.dataset.label = labels[index] || "";
        if (content instanceof Node) cell.appendChild(content); else cell.textContent = content;
        row.appendChild(cell);
      });
      body.appendChild(row);
    });
    table.hidden = items.length === 0;
    document.getElementById(emptyId).hidden = items.length > 0;
  }
  function code(text) {
    const element = document.createElement("code");
    element.textContent = text;
    return element;
  }
  // An event that stems from a request shows its id (the X-Request-ID the client got), copyable: the
  // same markup as the page's first rendering (templates/serving/detail.html).
  function messageCell(event) {
    if (!event.request_id) return event.message;
    const cell = document.createDocumentFragment();
    cell.append(event.message + " ");
    const note = document.createElement("small");
    note.className = "request-id";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy small";
    const hint = document.createElement("span");
    hint.className = "visually-hidden";
    hint.textContent = " " + t.i18nTheRequestId;
    button.append(t.i18nCopy, hint);
    button.addEventListener("click", () => copyText(event.request_id, button));
    note.append(t.i18nRequest + " ", code(event.request_id), " ", button);
    cell.append(note);
    return cell;
  }
  function refreshLogs() {
    getJSON(api + "events/").then(({ status, body }) => {
      if (status !== 200 || !Array.isArray(body)) return;
      renderTable("events", "events-empty", body, (event, row) => {
        row.className = "level-" + event.level;
        return [timeCell(event.created_at, true), event.level, code(event.kind), messageCell(event), event.actor || "–"];
      });
    }).catch(() => {});
    getJSON(api + "scaling-events/").then(({ status, body }) => {
      if (status !== 200 || !Array.isArray(body)) return;
      renderTable("decisions", "decisions-empty", body, (event) => [
        timeCell(event.created_at, true), code(event.metric || "–"),
        event.observed === null ? "–" : String(Math.round(event.observed * 1000) / 1000),
        event.old_replicas + " → " + event.new_replicas, event.acted ? t.i18nYes : t.i18nNo, event.reason,
      ]);
    }).catch(() => {});
  }
  let logsTimer = null;
  function scheduleLogs() {
    clearTimeout(logsTimer);
    logsTimer = setTimeout(refreshLogs, 400);
  }

  // --- the service, live ------------------------------------------------------------------------
  const liveState = $("#live-state");
  const statusBadge = $("#svc-status");
  function onService(service) {
    const status = String(service.status);
    statusBadge.className = "status status-" + status.toLowerCase();
    statusBadge.textContent = String(statusLabels[status] || status).toUpperCase();
    const routes = service.routes || [];
    const healthy = routes.filter((route) => route.status === "healthy").length;
    $("#svc-replicas").textContent = format(t.i18nReplicas, { healthy: healthy, desired: service.desired_replicas });
    const size = Number(service.cluster_size) || 1;
    const cluster = $("#svc-cluster");
    cluster.hidden = size <= 1;
    cluster.textContent = size <= 1 ? ""
      : format(service.cluster_mode === "multi-node" ? t.i18nClusterMulti : t.i18nClusterSingle, { size: size });
    renderRoutes(routes);
    routesTable.dataset.live = "1";
  }
  let first = true;
  let gone = false;
  if (window.modelserveLive) window.modelserveLive.keepLive({
    path: "/ws/services/" + serviceId + "/",
    state: liveState,
    liveText: t.i18nLive,
    offlineText: t.i18nOffline,
    // 4401: the session ended (logged out, or the password changed elsewhere); the service is not gone.
    finalText: (event) => (event.code === 4401 ? t.i18nLoggedOut : t.i18nGone),
    onMessage: (event) => {
      if (event.type === "service") {
        onService(event.service);
        if (!first) { scheduleLogs(); scheduleRevisions(); }
        first = false;
      } else if (event.type === "gone") {
        gone = true;
      }
    },
    onClose: () => { routesTable.dataset.live = ""; },
    isFinal: (event) => {
      if (event.code === 4404) gone = true;
      return gone || event.code === 4401;
    },
  });

  // --- metric charts ----------------------------------------------------------------------------
  const WINDOW = 600;
  const CHARTS = {
    rps: { source: "proxy", match: /(^|:)(rps|requests_per_second)$/ },
    in_flight: { source: "proxy", match: /(^|:)(requests_)?in_flight$/ },
    p95: { source: "proxy", match: /(^|:)(p95|p95_ms|p95_latency|latency_p95)$/ },
    cpu: { source: "kernel", prefer: "kernel:cpu_percent", match: /cpu/, unit: "%" },
    mem: { source: "kernel", prefer: "kernel:mem_bytes", match: /mem/ },
  };
  const metricsState = $("#metrics-state");
  const SVG = "http://www.w3.org/2000/svg";

  function pick(series, chart) {
    if (chart.prefer && series && series[chart.prefer]) return series[chart.prefer];
    const keys = Object.keys(series || {}).filter((key) => key.startsWith(chart.source + ":") && chart.match.test(key));
    return keys.length ? series[keys.sort()[0]] : null;
  }
  function human(kind, value) {
    if (kind === "mem") {
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let index = 0;
      while (value >= 1024 && index < units.length - 1) { value /= 1024; index += 1; }
      return value.toFixed(index ? 1 : 0) + " " + units[index];
    }
    if (Math.abs(value) >= 100) return value.toFixed(0);
    return String(Math.round(value * 100) / 100);
  }
  function draw(figure, kind, points) {
    const svg = $("svg", figure);
    const empty = $(".chart-empty", figure);
    const value = $(".chart-value", figure);
    svg.replaceChildren();
    const now = Date.now() / 1000;
    const data = (points || [])
      .map(([time, y]) => [time > 1e12 ? time / 1000 : time, Number(y)])
      .filter(([time, y]) => time >= now - WINDOW && isFinite(y));
    figure.dataset.points = String(data.length);
    if (data.length === 0) {
      empty.hidden = false;
      value.textContent = "";
      return;
    }
    empty.hidden = true;
    const width = 300, height = 90, pad = 4;
    const max = Math.max(...data.map(([, y]) => y), 0) * 1.15 || 1;
    const x = (time) => ((time - (now - WINDOW)) / WINDOW) * width;
    const y = (v) => height - pad - (v / max) * (height - 2 * pad);
    const line = data.map(([time, v], index) => (index ? "L" : "M") + x(time).toFixed(1) + " " + y(v).toFixed(1)).join(" ");
    const area = document.createElementNS(SVG, "path");
    area.setAttribute("d", line + " L" + x(data[data.length - 1][0]).toFixed(1) + " " + (height - pad) + " L" + x(data[0][0]).toFixed(1) + " " + (height - pad) + " Z");
    area.setAttribute("class", "chart-area");
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", line);
    path.setAttribute("class", "chart-line");
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", "0"); base.setAttribute("x2", String(width));
    base.setAttribute("y1", String(height - pad)); base.setAttribute("y2", String(height - pad));
    base.setAttribute("class", "chart-axis");
    const top = document.createElementNS(SVG, "text");
    top.setAttribute("x", "2"); top.setAttribute("y", "10");
    top.setAttribute("class", "chart-label");
    top.textContent = human(kind, max / 1.15);
    const last = data[data.length - 1];
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", x(last[0]).toFixed(1));
    dot.setAttribute("cy", y(last[1]).toFixed(1));
    dot.setAttribute("r", "2.5");
    dot.setAttribute("class", "chart-dot");
    svg.append(area, path, base, top, dot);
    value.textContent = human(kind, data[data.length - 1][1]) + (CHARTS[kind].unit || "");
  }
  let metricsDelay = 5000;
  const metricsSection = $("#metrics");
  function loadMetrics() {
    // Read at every round: an empty address means the platform has no metrics API (nothing fetched).
    const url = metricsSection.dataset.url;
    if (!url) {
      metricsState.textContent = t.i18nMetricsMissing;
      if (!gone) setTimeout(loadMetrics, 5000);
      return;
    }
    const sources = ["proxy", "kernel"];
    Promise.all(sources.map((source) => getJSON(url + "?source=" + source + "&window=" + WINDOW)))
      .then((answers) => {
        if (answers.every(({ status }) => status === 404 || status === 501)) {
          metricsState.textContent = t.i18nMetricsMissing;
          metricsDelay = 30000;
        } else {
          metricsState.textContent = answers.some(({ status }) => status !== 200) ? t.i18nMetricsFailed : t.i18nMetricsLive;
          metricsDelay = 5000;
        }
        const series = {};
        answers.forEach(({ status, body }) => { if (status === 200 && body && body.series) Object.assign(series, body.series); });
        document.querySelectorAll("figure.chart").forEach((figure) => {
          const kind = figure.dataset.chart;
          draw(figure, kind, pick(series, CHARTS[kind]));
        });
      })
      .catch(() => { metricsState.textContent = t.i18nMetricsFailed; })
      .finally(() => { if (!gone) setTimeout(loadMetrics, metricsDelay); });
  }
  loadMetrics();
})();
