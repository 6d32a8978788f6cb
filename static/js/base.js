// Every page: the language menu submits its form on change (no inline handler: the
// Content-Security-Policy allows scripts from this site only).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("lang-select");
  if (select && select.form) select.addEventListener("change", () => select.form.submit());
});

// Copy text to the clipboard; then() after it was copied. The Clipboard API needs a secure context
// (https or localhost): on plain http from another host a hidden textarea and execCommand do it.
window.modelserveCopy = function copy(value) {
  const fallback = () => new Promise((resolve, reject) => {
    const area = document.createElement("textarea");
    area.value = value;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    // Inside the open modal dialog if there is one: the rest of the page is inert while it is open,
    // and a textarea there could not be selected (the copy would be empty, yet "succeed").
    (document.querySelector("dialog[open]") || document.body).appendChild(area);
    area.select();
    try {
      if (document.execCommand("copy")) resolve(); else reject(new Error("copy refused"));
    } finally {
      area.remove();
    }
  });
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(value).catch(fallback);
  }
  return fallback();
};

// A <time datetime="..."> in the reader's time zone and the page's language (the server renders
// UTC as a fallback). Every one on the page is shown so once it has loaded; pages that add rows
// later call this for them.
window.modelserveLocalTime = function localTime(time, withSeconds) {
  const when = new Date(time.getAttribute("datetime"));
  if (isNaN(when)) return;
  time.textContent = when.toLocaleString(document.documentElement.lang || undefined, withSeconds
    ? { dateStyle: "medium", timeStyle: "medium" } : { dateStyle: "medium", timeStyle: "short" });
  time.title = time.getAttribute("datetime");
  time.dataset.local = "1";
};
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("time[datetime]:not([data-local])").forEach((time) =>
    window.modelserveLocalTime(time, time.hasAttribute("data-seconds")));
});
