// Live updates for the console's pages: one EventSource per tab to /events, listing the tasks and
// documents this page shows (elements with data-live-task / data-live-doc). The server holds one
// LISTEN connection for all tabs. Text is set with textContent, never as HTML.
(function () {
  "use strict";
  var STATUSES = ["waiting", "queued", "running", "done", "failed", "cancelled"];

  function ids(attr) {
    var seen = {};
    document.querySelectorAll("[" + attr + "]").forEach(function (el) { seen[el.getAttribute(attr)] = true; });
    return Object.keys(seen).slice(0, 300);
  }

  function apply(el, row) {
    el.querySelectorAll("[data-field]").forEach(function (f) { set(f, row); });
    if (el.hasAttribute("data-field")) { set(el, row); }
  }

  function set(f, row) {
    var field = f.getAttribute("data-field");
    if (field === "status") {
      f.textContent = row.status;
      paint(f, row.status);
    } else if (field === "status-class") {
      paint(f, row.status);
      f.title = f.title.replace(/: \w+$/, ": " + row.status);
    } else if (field === "progress") {
      f.value = Math.max(row.progress || 0, 0);
    } else if (field === "percent") {
      f.textContent = Math.round(Math.max(row.progress || 0, 0) * 100) + "%";
    } else if (field in row && row[field] !== null) {
      f.textContent = String(row[field]);
    }
  }

  function paint(el, status) {
    STATUSES.forEach(function (s) { el.classList.remove("st-" + s); });
    el.classList.add("st-" + status);
  }

  function listen() {
    var tasks = ids("data-live-task"), docs = ids("data-live-doc");
    if (!tasks.length && !docs.length) { return; }
    var source = new EventSource("/events?tasks=" + tasks.join(",") + "&docs=" + docs.join(","));
    function handler(attr) {
      return function (e) {
        var row = JSON.parse(e.data);
        document.querySelectorAll("[" + attr + '="' + row.id + '"]').forEach(function (el) { apply(el, row); });
      };
    }
    source.addEventListener("task", handler("data-live-task"));
    source.addEventListener("document", handler("data-live-doc"));
    window.addEventListener("beforeunload", function () { source.close(); });
  }

  function dropZone() {
    var form = document.getElementById("upload");
    if (!form) { return; }
    var input = form.querySelector("input[type=file]");
    ["dragenter", "dragover"].forEach(function (n) {
      form.addEventListener(n, function (e) { e.preventDefault(); form.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (n) {
      form.addEventListener(n, function () { form.classList.remove("over"); });
    });
    form.addEventListener("drop", function (e) {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; }
    });
  }

  document.addEventListener("DOMContentLoaded", function () { listen(); dropZone(); });
})();
