// mxspool dashboard: confirmed JSON actions with the session's CSRF token, and self-refresh.
// No framework, no build step, nothing loaded from other hosts.
(function () {
  "use strict";

  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute("content") : "";
  var main = document.getElementById("main");

  function flash(text, ok) {
    var el = document.getElementById("flash");
    if (!el) return;
    el.textContent = text;
    el.className = "flash " + (ok ? "ok" : "error");
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (data) {
        if (!response.ok) {
          var message = data && data.error ? data.error.message : response.status + " " + response.statusText;
          throw new Error(message);
        }
        return data;
      });
    });
  }

  function refresh() {
    if (!main) return Promise.resolve();
    return fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "X-Partial": "1" },
    }).then(function (response) {
      if (response.redirected || response.status === 401) {
        window.location.reload();
        return;
      }
      if (response.ok) {
        return response.text().then(function (html) { main.innerHTML = html; });
      }
    });
  }

  function after(el, data) {
    flash(el.getAttribute("data-done") || "Done", true);
    var next = el.getAttribute("data-next");
    if (next) {
      window.location.href = next;
      return;
    }
    return refresh();
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-url]");
    if (!button) return;
    event.preventDefault();
    var question = button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) return;
    button.disabled = true;
    var body = JSON.parse(button.getAttribute("data-body") || "{}");
    post(button.getAttribute("data-url"), body)
      .then(function (data) { return after(button, data); })
      .catch(function (error) { flash(error.message, false); })
      .then(function () { button.disabled = false; });
  });

  document.addEventListener("submit", function (event) {
    var form = event.target.closest("form[data-url]");
    if (!form) return;
    event.preventDefault();
    var body = {};
    new FormData(form).forEach(function (value, key) {
      if (String(value).trim() !== "") body[key] = String(value).trim();
    });
    var question = (form.getAttribute("data-confirm") || "").replace(/\{(\w+)\}/g, function (_, key) {
      return body[key] || "the default rate";
    });
    if (question && !window.confirm(question)) return;
    post(form.getAttribute("data-url"), body)
      .then(function (data) { form.reset(); return after(form, data); })
      .catch(function (error) { flash(error.message, false); });
  });

  var every = main ? Number(main.getAttribute("data-refresh") || "0") : 0;
  if (every > 0) {
    window.setInterval(function () {
      var active = document.activeElement;
      var typing = active && main.contains(active) && (active.tagName === "INPUT" || active.tagName === "SELECT");
      if (!document.hidden && !typing) refresh().catch(function () {});
    }, every);
  }
})();
