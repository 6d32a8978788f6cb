// LLM Chat Test (S8): talks to an OpenAI-compatible API with streaming (server-sent events), token
// by token. "This service" goes through the same-origin relay (serving/web/pages/chat.py explains why);
// "another server" is called directly at the baseURL the user gives (S8.2). Everything the model or
// a server says is put on the page as text, never as HTML.
(function () {
  "use strict";
  const script = document.currentScript;
  if (!script) return;
  const t = script.dataset;
  const $ = (id) => document.getElementById(id);
  const format = (template, values) => template.replace(/%\((\w+)\)s/g, (_, key) => String(values[key]));
  const settings = $("chat-settings");
  const csrf = settings.querySelector("input[name=csrfmiddlewaretoken]").value;
  const log = $("messages");
  const statusLine = $("chat-status");
  const errorLine = $("chat-error");
  const prompt = $("prompt");
  const send = $("send");
  const stop = $("stop");
  const modelSelect = $("model");
  const modelTyped = $("model-typed");
  const serviceToken = $("service-token");
  const history = [];
  let controller = null;

  // --- connection --------------------------------------------------------------------------------
  function mode() {
    return settings.querySelector("input[name=mode]:checked").value;
  }
  function connection() {
    if (mode() === "custom") {
      const base = $("base-url").value.trim().replace(/\/+$/, "");
      return { base: base, token: $("custom-token").value.trim(), relay: false };
    }
    return { base: t.relay, token: serviceToken ? serviceToken.value.trim() : "", relay: true };
  }
  function headers(conn, json) {
    const result = { Accept: json ? "application/json" : "text/event-stream, application/json" };
    if (!json) result["Content-Type"] = "application/json";
    if (conn.token) result.Authorization = "Bearer " + conn.token;
    if (conn.relay) result["X-CSRFToken"] = csrf;
    return result;
  }
  function showError(text) {
    errorLine.textContent = text;
    errorLine.hidden = !text;
  }
  function describe(status, body) {
    const error = (body && body.error) || {};
    const message = (typeof error === "string" ? error : error.message) || (body && body.detail) || "";
    const key = "i18nE" + status;
    return format(t[key] || t.i18nEother, { status: status, message: message });
  }
  function networkError(conn) {
    return conn.relay ? t.i18nRelayDown : format(t.i18nCustomDown, { url: conn.base });
  }
  function readJSON(response) {
    return response.text().then((text) => {
      try { return JSON.parse(text); } catch (_) { return { error: { message: text.slice(0, 300) } }; }
    });
  }

  // --- models ------------------------------------------------------------------------------------
  function setModels(ids) {
    const wanted = modelSelect.value || t.model;
    modelSelect.replaceChildren();
    ids.forEach((id) => {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      modelSelect.appendChild(option);
    });
    if (ids.includes(wanted)) modelSelect.value = wanted;
    else if (ids.includes(t.model)) modelSelect.value = t.model;
    modelSelect.hidden = ids.length === 0;
    modelTyped.hidden = ids.length > 0;
  }
  function openSettings() {
    settings.closest("aside").classList.add("attention");
  }
  function loadModels() {
    const conn = connection();
    if (!conn.base) {
      statusLine.textContent = t.i18nNoBase;
      setModels([]);
      return Promise.resolve();
    }
    statusLine.textContent = t.i18nLoadingModels;
    showError("");
    return fetch(conn.base + "/models", { headers: headers(conn, true), credentials: conn.relay ? "same-origin" : "omit" })
      .then((response) => readJSON(response).then((body) => ({ response: response, body: body })))
      .then(({ response, body }) => {
        if (!response.ok) {
          statusLine.textContent = "";
          if (response.status === 401 && conn.relay && !conn.token) showError(t.i18nNeedToken);
          else showError(describe(response.status, body));
          openSettings();
          return;
        }
        const ids = Array.isArray(body.data) ? body.data.map((m) => String(m.id)) : [];
        setModels(ids);
        statusLine.textContent = ids.length ? format(t.i18nModelsOk, { count: ids.length }) : t.i18nNoModels;
        settings.closest("aside").classList.remove("attention");
      })
      .catch(() => {
        statusLine.textContent = "";
        showError(networkError(conn));
        if (mode() === "custom") setModels([]);
        openSettings();
      });
  }

  // --- the conversation ---------------------------------------------------------------------------
  function addMessage(role, text) {
    const empty = log.querySelector(".chat-empty");
    if (empty) empty.remove();
    const node = $("message").content.firstElementChild.cloneNode(true);
    node.classList.add("msg-" + role);
    node.querySelector(".msg-who").textContent = role === "user" ? t.i18nYou : t.i18nAssistant;
    node.querySelector(".msg-text").textContent = text;
    log.appendChild(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }
  // Under each reply: time to first token (from sending to the first content chunk) and tokens per
  // second (after the first token: (tokens - 1) / (last - first); one token: tokens / whole time).
  // Tokens are the server's usage.completion_tokens when it sent them, else the content chunks.
  function figures(timing) {
    if (timing.first === null) return null;
    const tokens = timing.usage || timing.chunks;
    const span = (timing.last - timing.first) / 1000;
    const rate = tokens > 1 && span > 0 ? (tokens - 1) / span : tokens / Math.max((timing.last - timing.start) / 1000, 0.001);
    return { ttft: Math.round(timing.first - timing.start), tps: rate, tokens: tokens, counted: timing.usage ? "usage" : "chunks" };
  }
  function showFigures(reply, timing) {
    const result = figures(timing);
    if (!result) return;
    const lang = document.documentElement.lang || undefined;
    const line = document.createElement("p");
    line.className = "msg-stats";
    line.dataset.ttftMs = String(result.ttft);
    line.dataset.tps = result.tps.toFixed(2);
    line.dataset.tokens = String(result.tokens);
    line.dataset.counted = result.counted;
    line.textContent = format(t.i18nFigures, {
      ttft: result.ttft.toLocaleString(lang),
      tps: result.tps.toLocaleString(lang, { maximumFractionDigits: 1, minimumFractionDigits: 1 }),
      tokens: result.tokens.toLocaleString(lang),
    });
    line.title = result.counted === "usage" ? t.i18nFromUsage : t.i18nFromChunks;
    reply.appendChild(line);
  }
  function showEmpty() {
    if (log.querySelector(".chat-empty")) return;
    const empty = document.createElement("p");
    empty.className = "empty chat-empty";
    empty.textContent = t.i18nEmpty;
    log.appendChild(empty);
  }
  function busy(on) {
    send.disabled = on;
    stop.disabled = !on;
    prompt.setAttribute("aria-busy", on ? "true" : "false");
  }
  function model() {
    return (modelSelect.hidden ? modelTyped.value : modelSelect.value || modelTyped.value).trim();
  }

  function sendMessage(text) {
    const conn = connection();
    if (!conn.base) { showError(t.i18nNoBase); openSettings(); return; }
    const name = model();
    if (!name) { showError(t.i18nNoModel); return; }
    showError("");
    history.push({ role: "user", content: text });
    const asked = addMessage("user", text);
    // A question that got no answer leaves the conversation and goes back to the input, to retry.
    const unask = () => {
      history.pop();
      asked.remove();
      if (!prompt.value) prompt.value = text;
    };
    const reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    const out = reply.querySelector(".msg-text");
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    // include_usage: the server's own token count ends the stream (OpenAI, vLLM, llm-echo); without it
    // the figures count the stream's content chunks.
    const body = { model: name, messages: messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("temperature").value);
    if (!isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;

    controller = new AbortController();
    busy(true);
    statusLine.textContent = t.i18nThinking;
    let text2 = "";
    let finished = false;
    let finishReason = null;
    const timing = { start: performance.now(), first: null, last: null, chunks: 0, usage: null };
    const done = (note) => {
      reply.classList.remove("streaming");
      if (text2) showFigures(reply, timing);
      busy(false);
      controller = null;
      if (text2) history.push({ role: "assistant", content: text2 });
      else if (!reply.classList.contains("stopped")) reply.remove();
      if (!log.querySelector(".msg")) showEmpty();
      statusLine.textContent = note || "";
    };
    fetch(conn.base + "/chat/completions", {
      method: "POST",
      headers: headers(conn, false),
      credentials: conn.relay ? "same-origin" : "omit",
      body: JSON.stringify(body),
      signal: controller.signal,
    })
      .then((response) => {
        if (!response.ok) {
          return readJSON(response).then((answer) => {
            unask();
            if (response.status === 401 && conn.relay && !conn.token) showError(t.i18nNeedToken);
            else showError(describe(response.status, answer));
            if (response.status === 401) openSettings();
            done("");
          });
        }
        const type = response.headers.get("Content-Type") || "";
        if (!type.includes("text/event-stream")) {
          // A server that ignored "stream": one JSON answer.
          return readJSON(response).then((answer) => {
            const choice = answer && answer.choices && answer.choices[0];
            const content = choice && choice.message ? choice.message.content : null;
            if (typeof content !== "string") { showError(t.i18nBadJson); done(""); return; }
            text2 = content;
            timing.first = timing.last = performance.now();
            timing.chunks = 1;
            if (answer.usage && answer.usage.completion_tokens > 0) timing.usage = answer.usage.completion_tokens;
            out.textContent = content;
            done(t.i18nDone);
          });
        }
        statusLine.textContent = t.i18nStreaming;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        const handle = (block) => {
          const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
          if (!data) return;
          if (data === "[DONE]") { finished = true; return; }
          let event;
          try { event = JSON.parse(data); } catch (_) { return; }
          if (event.error) { showError(describe(500, event)); return; }
          if (event.usage && event.usage.completion_tokens > 0) timing.usage = event.usage.completion_tokens;
          const choice = event.choices && event.choices[0];
          if (!choice) return;
          const piece = (choice.delta && choice.delta.content) || choice.text || "";
          if (piece) {
            timing.last = performance.now();
            if (timing.first === null) timing.first = timing.last;
            timing.chunks += 1;
            text2 += piece;
            out.textContent = text2;
            log.scrollTop = log.scrollHeight;
          }
          if (choice.finish_reason) finishReason = choice.finish_reason;
        };
        const pump = () => reader.read().then(({ value, done: ended }) => {
          if (ended) {
            if (buffer.trim()) handle(buffer);
            if (!finished && !finishReason) showError(t.i18nCut);
            done(finishReason === "length" ? t.i18nLength : t.i18nDone);
            return;
          }
          buffer += decoder.decode(value, { stream: true });
          const blocks = buffer.split(/\r?\n\r?\n/);
          buffer = blocks.pop();
          blocks.forEach(handle);
          return pump();
        });
        return pump();
      })
      .catch((error) => {
        if (error && error.name === "AbortError") {
          reply.classList.add("stopped");
          const mark = document.createElement("span");
          mark.className = "muted stopped-mark";
          mark.textContent = " " + t.i18nStoppedMark;
          reply.querySelector(".msg-who").appendChild(mark);
          done(t.i18nStopped);
          return;
        }
        if (!text2) unask();
        showError(networkError(conn));
        done("");
      });
  }

  // --- wiring ------------------------------------------------------------------------------------
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    prompt.value = "";
    sendMessage(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    log.replaceChildren();
    showEmpty();
    showError("");
    statusLine.textContent = "";
    prompt.focus();
  });
  settings.addEventListener("submit", (event) => event.preventDefault());
  settings.querySelectorAll("input[name=mode]").forEach((radio) => radio.addEventListener("change", () => {
    const custom = mode() === "custom";
    $("custom-settings").hidden = !custom;
    $("service-settings").hidden = custom;
    if (!custom) setModels([t.model]);
    if (!custom || $("base-url").value.trim()) loadModels();
    else { statusLine.textContent = t.i18nNoBase; setModels([]); }
  }));
  $("base-url").addEventListener("change", loadModels);
  $("custom-token").addEventListener("change", loadModels);
  if (serviceToken) serviceToken.addEventListener("change", loadModels);
  $("reload-models").addEventListener("click", loadModels);
  const tokenButton = $("chat-token");
  if (tokenButton) {
    tokenButton.addEventListener("click", () => {
      tokenButton.disabled = true;
      fetch(tokenButton.dataset.url, {
        method: "POST",
        headers: { "X-CSRFToken": csrf, Accept: "application/json" },
        credentials: "same-origin",
      })
        .then((response) => readJSON(response).then((body) => ({ response: response, body: body })))
        .then(({ response, body }) => {
          if (!response.ok || !body.token) {
            showError(format(t.i18nTokenFailed, { message: (body.error && body.error.message) || response.status }));
            return;
          }
          serviceToken.value = body.token;
          const until = new Date(body.expires_at).toLocaleTimeString(undefined, { timeStyle: "short" });
          return loadModels().then(() => {
            statusLine.textContent = format(t.i18nTokenIssued, { prefix: body.prefix, time: until }) + " " + statusLine.textContent;
          });
        })
        .catch(() => showError(t.i18nRelayDown))
        .finally(() => { tokenButton.disabled = false; });
    });
  }

  // A private service without a token can not list its models yet: say what to do instead of
  // showing a 401 before the user did anything.
  if (!t.public && serviceToken && !serviceToken.value) {
    statusLine.textContent = t.i18nNeedToken;
  } else {
    loadModels();
  }
})();
