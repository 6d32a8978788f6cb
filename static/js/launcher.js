// Service launcher (S4.1): the name checked as you type, defaults from the folder's
// service-definition.toml when the folder or the runtime changes (S3.2), rows of mounts and
// environment variables, and the Validate dialog (S4.2) that streams the run's lifecycle events and
// container log over the websocket until Finished. Without this script the form still submits and
// the server shows its errors next to the fields.
(function () {
  "use strict";
  const script = document.currentScript;
  const form = document.getElementById("launcher");
  if (!form || !script) return;
  const t = script.dataset;
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  const $ = (selector, root) => (root || form).querySelector(selector);
  const $$ = (selector, root) => Array.from((root || form).querySelectorAll(selector));

  // --- errors next to the fields ---------------------------------------------------------------
  function showErrors(errors) {
    $$(".field-error").forEach((p) => { p.textContent = ""; });
    $$("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
    const general = document.getElementById("form-errors");
    general.textContent = "";
    general.hidden = true;
    let first = null;
    Object.entries(errors || {}).forEach(([field, messages]) => {
      const slot = $('[data-error-for="' + field + '"]');
      const text = messages.join(" ");
      if (slot) {
        slot.textContent = text;
        const input = form.querySelector('[aria-describedby~="err-' + field + '"]');
        if (input) input.setAttribute("aria-invalid", "true");
        first = first || input || slot;
      } else {
        const line = document.createElement("p");
        line.textContent = text;
        general.appendChild(line);
        general.hidden = false;
        first = first || general;
      }
    });
    if (first && first.focus) first.focus();
  }

  // --- name, checked as you type ----------------------------------------------------------------
  const name = $("#f-name");
  const nameError = $("#err-name");
  const pattern = new RegExp(name.dataset.pattern);
  function checkName() {
    const value = name.value.trim();
    let message = "";
    if (value.length < 4) message = t.i18nNameShort;
    else if (value.length > 24) message = t.i18nNameLong;
    else if (!pattern.test(value)) message = t.i18nNameChars;
    nameError.textContent = message;
    nameError.classList.toggle("ok", !message);
    if (!message) nameError.textContent = t.i18nNameOk;
    if (message) name.setAttribute("aria-invalid", "true");
    else name.removeAttribute("aria-invalid");
    return !message;
  }
  name.addEventListener("input", checkName);

  // --- runtime-dependent fields -----------------------------------------------------------------
  const runtime = $("#f-runtime");
  function onRuntime() {
    const option = runtime.selectedOptions[0];
    const needsDefinition = option && option.dataset.needsDefinition === "1";
    $("#definition-field").hidden = !needsDefinition;
    $$("details.runtime-vars").forEach((d) => { d.hidden = d.dataset.runtime !== runtime.value; });
  }
  function onResourceMode() {
    const mode = ($("input[name=resource_mode]:checked") || {}).value;
    $("#preset-field").hidden = mode !== "preset";
    $("#custom-resources").hidden = mode === "preset";
  }
  $$("input[name=resource_mode]").forEach((r) => r.addEventListener("change", onResourceMode));

  // --- rows of mounts and environment variables --------------------------------------------------
  function wireRow(row) {
    const remove = $(".remove-row", row);
    remove.hidden = false;
    remove.onclick = () => {
      const container = row.parentElement;
      if (container.children.length > 1) row.remove();
      else $$("input, select", row).forEach((el) => { el.value = ""; });
      markEdited(container.id);
    };
    $$("input, select", row).forEach((el) => el.addEventListener("input", () => markEdited(row.parentElement.id)));
  }
  function addRow(containerId, values) {
    const container = document.getElementById(containerId);
    const row = container.lastElementChild.cloneNode(true);
    $$("input, select", row).forEach((el, i) => { el.value = values ? values[i] || "" : ""; });
    container.appendChild(row);
    wireRow(row);
    return row;
  }
  $$(".rows > .row").forEach(wireRow);
  $$("button.add-row").forEach((button) => {
    button.hidden = false;
    button.onclick = () => {
      const row = addRow(button.dataset.rows);
      $("input, select", row).focus();
    };
  });

  // --- defaults from the folder (S3.2): replace only what the user has not edited ----------------
  const edited = new Set();
  function markEdited(key) { edited.add(key); }
  ["f-image", "f-cpu", "f-mem", "f-accelerator", "f-accelerator-amount", "f-definition"].forEach((id) => {
    const el = document.getElementById(id);
    el.addEventListener("input", () => markEdited(id));
  });
  const problems = document.getElementById("problems");
  function applyDefaults(values) {
    const set = (id, value) => { if (!edited.has(id)) document.getElementById(id).value = value || ""; };
    set("f-image", values.image);
    set("f-cpu", values.cpu);
    set("f-mem", values.mem);
    set("f-accelerator", values.accelerator);
    set("f-accelerator-amount", values.accelerator_amount);
    set("f-definition", values.model_definition_path);
    if (!edited.has("env-rows")) {
      const container = document.getElementById("env-rows");
      while (container.children.length > 1) container.lastElementChild.remove();
      $$("input", container.firstElementChild).forEach((el) => { el.value = ""; });
      const rows = (values.environ || []).concat([["", ""]]);
      $$("input", container.firstElementChild).forEach((el, i) => { el.value = rows[0][i]; });
      rows.slice(1).forEach((pair) => addRow("env-rows", pair));
    }
    const list = $("ul", problems);
    list.textContent = "";
    (values.problems || []).forEach((problem) => {
      // Where, as the folder page says it: file, field, line, then what is wrong.
      const item = document.createElement("li");
      if (problem.file) {
        const where = [problem.file, problem.field].filter(Boolean).map((text) => {
          const code = document.createElement("code");
          code.textContent = text;
          return code;
        });
        where.forEach((code, i) => item.append(i ? " " : "", code));
        if (problem.line) {
          const line = t.i18nLine.replace("%(line)s", String(problem.line)) + (problem.column ? ":" + problem.column : "");
          item.append(" (" + line + ")");
        }
        item.append(": ");
      }
      item.append(problem.message || String(problem));
      list.appendChild(item);
    });
    problems.hidden = !(values.problems || []).length;
  }
  function loadDefaults() {
    const folder = $("#f-folder").value;
    if (!folder) return;
    const url = form.dataset.defaultsUrl + "?folder=" + encodeURIComponent(folder) +
      "&runtime=" + encodeURIComponent(runtime.value);
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((response) => (response.ok ? response.json() : null))
      .then((values) => { if (values) applyDefaults(values); })
      .catch(() => {});
  }
  if (form.dataset.mode === "create") {
    $("#f-folder").addEventListener("change", loadDefaults);
    runtime.addEventListener("change", loadDefaults);
  }
  runtime.addEventListener("change", onRuntime);
  onRuntime();
  onResourceMode();

  // --- Validate (S4.2) --------------------------------------------------------------------------
  const dialog = document.getElementById("validate-dialog");
  const log = document.getElementById("validate-log");
  const state = document.getElementById("validate-state");
  const outcome = document.getElementById("validate-outcome");
  const validateButton = document.getElementById("validate-button");
  let socket = null;
  let finished = false;

  function append(line, kind) {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const span = document.createElement("span");
    span.className = "line line-" + kind;
    span.textContent = line + "\n"; // textContent: a container log is never HTML
    log.appendChild(span);
    if (atBottom || kind !== "log") log.scrollTop = log.scrollHeight;
  }
  function timeOf(event) {
    const when = event.at ? new Date(event.at * 1000) : new Date();
    return when.toLocaleTimeString();
  }
  function onEvent(event) {
    if (event.kind === "log") {
      append(event.line, "log");
    } else if (event.kind === "finished") {
      finished = true;
      append("[" + timeOf(event) + "] Finished: " + event.outcome + (event.message ? " — " + event.message : ""), "finished");
      state.textContent = t.i18nFinished;
      outcome.hidden = false;
      outcome.className = "validate-outcome " + (event.outcome === "healthy" ? "ok" : "bad");
      outcome.textContent = event.outcome === "healthy"
        ? t.i18nHealthy
        : t.i18nFailed + " " + (event.message || event.outcome);
      dialog.dataset.outcome = event.outcome;
      validateButton.disabled = false;
      if (socket) socket.close();
    } else {
      append("[" + timeOf(event) + "] " + (event.message || event.kind), "lifecycle");
    }
  }
  function watch(path) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + location.host + path);
    socket.onopen = () => { state.textContent = t.i18nRunning; };
    socket.onmessage = (message) => onEvent(JSON.parse(message.data));
    socket.onclose = () => {
      if (!finished) {
        state.textContent = t.i18nLost;
        outcome.hidden = false;
        outcome.className = "validate-outcome bad";
        outcome.textContent = t.i18nLost;
        validateButton.disabled = false;
      }
    };
  }
  function startValidation() {
    if (!checkName()) { name.focus(); return; }
    finished = false;
    log.textContent = "";
    outcome.hidden = true;
    delete dialog.dataset.outcome;
    state.textContent = t.i18nStarting;
    validateButton.disabled = true;
    const data = new FormData(form);
    fetch(form.dataset.validateUrl, {
      method: "POST",
      body: data,
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrf, Accept: "application/json" },
    })
      .then((response) => response.json().then((body) => ({ status: response.status, body })))
      .then(({ status, body }) => {
        if (status === 202 && body.websocket) {
          showErrors({});
          dialog.showModal();
          watch(body.websocket);
        } else {
          validateButton.disabled = false;
          showErrors(body.errors || { form: [t.i18nError + " " + status] });
        }
      })
      .catch((error) => {
        validateButton.disabled = false;
        showErrors({ form: [t.i18nError + " " + error] });
      });
  }
  if (dialog && typeof dialog.showModal === "function" && window.WebSocket && window.fetch) {
    validateButton.hidden = false;
    validateButton.addEventListener("click", startValidation);
    document.getElementById("validate-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      if (socket) socket.close();
      validateButton.disabled = false;
      validateButton.focus();
    });
    document.getElementById("validate-copy").addEventListener("click", () => {
      window.modelserveCopy(log.textContent).then(() => { state.textContent = t.i18nCopied; }, () => {});
    });
  }
})();
