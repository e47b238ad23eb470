// The stats page's admin actions (served only when global.stats.admin_token is set).
// The token is kept in this tab's sessionStorage, never in a cookie, and sent as
// "Authorization: Bearer" with each action: a page of another site can neither read it nor
// make the browser send it.
(function () {
  "use strict";
  var TOKEN = "sclb-admin-token";
  var RESULT = "sclb-action-result";
  var tokenBox = document.getElementById("token");
  var tokenState = document.getElementById("token-state");
  var result = document.getElementById("result");

  function show(text, cls) {
    result.textContent = text;
    result.className = cls;
  }

  function showToken() {
    tokenState.textContent = sessionStorage.getItem(TOKEN)
      ? "token set for this tab"
      : "enter the admin token to use the buttons";
  }

  function useToken() {
    var t = tokenBox.value.trim();
    tokenBox.value = "";
    if (t) {
      sessionStorage.setItem(TOKEN, t);
    }
    showToken();
  }

  // The page reloads itself every data-refresh seconds, but not while the operator is
  // ticking servers or typing the token.
  var refresh = Number(document.body.dataset.refresh || 0);
  if (refresh > 0) {
    setInterval(function () {
      var busy = document.querySelector("input.sel:checked") ||
        document.activeElement === tokenBox;
      if (!busy) {
        location.reload();
      }
    }, refresh * 1000);
  }

  // What the last action answered, carried over the reload that shows its effect.
  var last = sessionStorage.getItem(RESULT);
  if (last) {
    sessionStorage.removeItem(RESULT);
    var r = JSON.parse(last);
    show(r.text, r.cls);
  }
  showToken();

  document.getElementById("use-token").addEventListener("click", useToken);
  tokenBox.addEventListener("keydown", function (e) {
    if (e.key === "Enter") {
      useToken();
    }
  });
  document.getElementById("forget-token").addEventListener("click", function () {
    sessionStorage.removeItem(TOKEN);
    showToken();
  });

  document.querySelectorAll("input.all").forEach(function (all) {
    all.addEventListener("change", function () {
      all.closest("table").querySelectorAll("input.sel").forEach(function (c) {
        c.checked = all.checked;
      });
    });
  });

  function act(button) {
    var bar = button.parentElement;
    var backend = bar.dataset.backend;
    var table = bar.previousElementSibling;
    var servers = Array.prototype.map.call(
      table.querySelectorAll("input.sel:checked"),
      function (c) { return c.value; });
    if (servers.length === 0) {
      show("Tick one or more servers of backend " + backend + " first.", "err");
      return;
    }
    var token = sessionStorage.getItem(TOKEN);
    if (!token) {
      show("Enter the admin token first.", "err");
      tokenBox.focus();
      return;
    }
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
      return;
    }
    var form = new URLSearchParams();
    form.append("b", backend);
    servers.forEach(function (s) { form.append("s", s); });
    form.append("action", button.dataset.action);
    show(button.textContent + " on " + servers.join(", ") + "...", "");
    fetch("/stats", {
      method: "POST",
      headers: { "Authorization": "Bearer " + token },
      body: form,
      credentials: "omit",
      cache: "no-store",
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var cls = resp.ok ? "ok" : "err";
        if (!resp.ok) {
          text = "HTTP " + resp.status + ": " + text;
        }
        if (/ done$/m.test(text)) {
          // Something changed: reload to show it, with the answer.
          sessionStorage.setItem(RESULT, JSON.stringify({ text: text, cls: cls }));
          location.reload();
        } else {
          show(text, cls);
        }
      });
    }, function (e) {
      show("The request failed: " + e, "err");
    });
  }

  document.querySelectorAll("div.actions button").forEach(function (b) {
    b.addEventListener("click", function () { act(b); });
  });
  // For tests (and the curious): the buttons work from now on.
  document.body.setAttribute("data-actions-ready", "");
})();
