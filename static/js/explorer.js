// Folder explorer: drag and drop uploads with a progress bar per file (S1.2).
// Without this script the page still works: the upload form posts to the same API and comes back.
// Each file is its own multipart request to POST /api/v1/folders/{id}/upload/?path=DIR, which the
// server streams straight into the folder; XMLHttpRequest (not fetch) because only it reports
// upload progress.
(function () {
  "use strict";
  const script = document.currentScript;
  const form = document.getElementById("upload-form");
  if (!form || !script || !window.XMLHttpRequest || !window.FormData) return;

  const text = {
    done: script.dataset.i18nDone || "done",
    failed: script.dataset.i18nFailed || "failed",
    waiting: script.dataset.i18nWaiting || "waiting",
    reload: script.dataset.i18nReload || "All uploads finished; refreshing the list.",
  };
  const uploadUrl = form.dataset.uploadUrl;
  const cwd = form.dataset.cwd || "";
  const csrf = (form.querySelector("input[name=csrfmiddlewaretoken]") || {}).value || "";
  const input = document.getElementById("upload-files");
  const list = document.getElementById("upload-progress");
  const template = document.getElementById("upload-row");
  const dropZone = document.getElementById("drop-zone");
  const PARALLEL = 2;

  dropZone.hidden = false;

  function join(dir, sub) {
    return [dir, sub].filter(Boolean).join("/");
  }

  function addRow(label) {
    const row = template.content.firstElementChild.cloneNode(true);
    row.querySelector(".upload-name").textContent = label;  // textContent: names are never HTML
    const bar = row.querySelector("progress");
    bar.setAttribute("aria-label", label);
    row.querySelector(".upload-status").textContent = text.waiting;
    list.appendChild(row);
    return row;
  }

  function uploadOne(item) {
    return new Promise((resolve) => {
      const { file, dir, row } = item;
      const bar = row.querySelector("progress");
      const status = row.querySelector(".upload-status");
      const data = new FormData();
      data.append("files", file, file.name);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", uploadUrl + "?path=" + encodeURIComponent(dir));
      xhr.setRequestHeader("X-CSRFToken", csrf);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) {
          bar.value = Math.floor((100 * event.loaded) / event.total);
          status.textContent = bar.value + "%";
        }
      });
      xhr.addEventListener("load", () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          bar.value = 100;
          status.textContent = text.done;
          row.classList.add("ok");
          resolve(true);
          return;
        }
        let detail = xhr.statusText;
        try {
          detail = JSON.parse(xhr.responseText).detail || detail;
        } catch (ignored) { /* not JSON: keep the status text */ }
        status.textContent = text.failed + ": " + detail;
        row.classList.add("failed");
        resolve(false);
      });
      xhr.addEventListener("error", () => {
        status.textContent = text.failed;
        row.classList.add("failed");
        resolve(false);
      });
      xhr.send(data);
    });
  }

  async function uploadAll(items) {
    if (!items.length) return;
    const queue = items.map((item) => ({ ...item, row: addRow(join(item.dir, item.file.name)) }));
    let succeeded = 0;
    let failed = 0;
    async function worker() {
      while (queue.length) {
        const ok = await uploadOne(queue.shift());
        if (ok) succeeded += 1; else failed += 1;
      }
    }
    await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
    if (succeeded && !failed) {
      const note = document.createElement("li");
      note.textContent = text.reload;
      list.appendChild(note);
      window.setTimeout(() => window.location.reload(), 800);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const files = Array.from(input.files || []);
    uploadAll(files.map((file) => ({ file, dir: cwd })));
    form.reset();
  });

  // A dropped directory is walked, and its files go to the same relative place in the folder.
  function readEntries(reader) {
    return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
  }
  async function collect(entry, dir, out) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ file, dir });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      let batch;
      do {
        batch = await readEntries(reader);  // readEntries returns at most ~100 at a time
        for (const child of batch) await collect(child, join(dir, entry.name), out);
      } while (batch.length);
    }
  }

  function hasFiles(event) {
    return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    dropZone.classList.add("active");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) dropZone.classList.remove("active");
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", async (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    dropZone.classList.remove("active");
    const items = Array.from(event.dataTransfer.items || []);
    const entries = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
    if (entries.length && entries.every(Boolean)) {
      const out = [];
      for (const entry of entries) await collect(entry, cwd, out);
      uploadAll(out);
    } else {
      uploadAll(Array.from(event.dataTransfer.files).map((file) => ({ file, dir: cwd })));
    }
  });
})();
