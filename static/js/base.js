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
    document.body.appendChild(area);
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
