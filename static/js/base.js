// Every page: the language menu submits its form on change (no inline handler: the
// Content-Security-Policy allows scripts from this site only).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("lang-select");
  if (select && select.form) select.addEventListener("change", () => select.form.submit());
});
