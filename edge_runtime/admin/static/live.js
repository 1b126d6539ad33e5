// Refreshes the parts of a page marked data-live every few seconds (no inline script: the CSP
// allows only this file). Each part is replaced by the same part of the page fetched again, and
// the line #live-status says when the page was last brought up to date, or that it could not be.
(function () {
  "use strict";
  var parts = document.querySelectorAll("[data-live][id]");
  var status = document.getElementById("live-status");
  if (!parts.length) { return; }
  var last = new Date();
  function clock(date) { return date.toTimeString().slice(0, 8); }
  function say(text, stale) {
    if (!status) { return; }
    status.textContent = text;
    status.className = stale ? "live-status bad" : "live-status";
  }
  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected && response.url.indexOf("/login") !== -1) {
          say("Signed out (the session expired): reload the page to sign in again.", true);
          return null;
        }
        if (!response.ok) {
          say("Not updated since " + clock(last) + ": the box answered " + response.status + ".", true);
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        parts.forEach(function (part) {
          var next = fresh.getElementById(part.id);
          if (next && next.innerHTML !== part.innerHTML) { part.innerHTML = next.innerHTML; }
        });
        last = new Date();
        say("Updated at " + clock(last) + " (every 3 s).", false);
      })
      .catch(function () {
        say("Not updated since " + clock(last) + ": the box does not answer (restarting?).", true);
      });
  }
  say("Updated at " + clock(last) + " (every 3 s).", false);
  window.setInterval(refresh, 3000);
})();
