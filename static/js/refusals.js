// A refused htmx request is said in one line at the top of the page (role=alert), not in a
// dialog: the board's refresh, refused every two seconds, must not stack up dialogs. The
// line goes when the request that was refused next succeeds, when the person's next
// request (not a refresh) succeeds, or when dismissed.
(function () {
  "use strict";

  let refused = null; // the element whose request the line is about

  function line() {
    return document.getElementById("refusal");
  }

  function say(text, elt) {
    const shown = line();
    if (!shown) return;
    shown.querySelector("span").textContent = text;
    shown.hidden = false;
    refused = elt;
  }

  function clear() {
    const shown = line();
    if (shown) shown.hidden = true;
    refused = null;
  }

  document.addEventListener("htmx:responseError", function (event) {
    const xhr = event.detail.xhr;
    const plain = (xhr.getResponseHeader("Content-Type") || "").indexOf("text/plain") === 0;
    let text = "Refused (" + xhr.status + ").";
    if (plain && xhr.responseText) text = xhr.responseText;
    else if (xhr.status >= 500) text = "The server failed (" + xhr.status + "); its log says why.";
    say(text, event.detail.elt);
  });

  document.addEventListener("htmx:sendError", function (event) {
    say("No answer from the server: is Hypervisor running?", event.detail.elt);
  });

  // Requests the page makes by itself: refreshes, and parts fetched once it has loaded.
  function automatic(elt) {
    return /\b(every|load)\b/.test((elt.getAttribute && elt.getAttribute("hx-trigger")) || "");
  }

  // What a person typed and has not sent: the drawer's editor, an open dialog's field.
  document.addEventListener("input", function (event) {
    const form = event.target.closest && event.target.closest("#drawer form, dialog form");
    if (form) form.dataset.typed = "1";
  });

  // ... or selected (the bulk bar shows while cards are), or sent and refused for a
  // session that had ended (below).
  let refusedSend = false;
  function typedAndUnsent() {
    const kept = "#drawer form[data-typed], dialog[open] form[data-typed], #bulk-bar:not([hidden])";
    return refusedSend || document.querySelector(kept);
  }

  const SESSION_ENDED =
    "Your session has ended (logged out in another tab, or expired): nothing was saved or " +
    "done. What you typed is still on this page: log in again in another tab, then send it again.";

  // A session that ended sends the page to the login form (the middleware's redirect), but
  // not from what the person just sent (a save, a bulk action: it did nothing, and going
  // threw away what they typed into it) nor while they have typed into a form not sent yet.
  // The next save takes the CSRF token the login elsewhere renewed (below).
  function keptFromTheLogin(event) {
    if (!event.detail.xhr.getResponseHeader("X-Session-Ended")) {
      refusedSend = false; // logged in again
      return false;
    }
    const sent = event.detail.requestConfig && event.detail.requestConfig.verb !== "get";
    if (!sent && !typedAndUnsent()) return false;
    refusedSend = refusedSend || sent;
    event.preventDefault(); // htmx follows no redirect
    say(SESSION_ENDED, event.detail.elt);
    return true;
  }

  document.addEventListener("htmx:configRequest", function (event) {
    if (event.detail.verb === "get") return;
    // The cookie's token, not the page's: a login in another tab renewed it.
    const cookie = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (!cookie) return;
    event.detail.headers["x-csrftoken"] = cookie[1];
    event.detail.parameters["csrfmiddlewaretoken"] = cookie[1];
  });

  // Before the response is swapped in: a refresh may replace its own element, and the
  // events after the swap then name the nearest element left instead.
  document.addEventListener("htmx:beforeOnLoad", function (event) {
    if (keptFromTheLogin(event)) return;
    const elt = event.detail.elt;
    const answered = event.detail.xhr.status < 400;
    if (refused && answered && (elt === refused || !automatic(elt))) clear();
  });

  document.addEventListener("click", function (event) {
    if (!event.target.closest || !event.target.closest("[data-dismiss-refusal]")) return;
    clear();
    // The button hid with its line: the focus goes on to the page's content.
    const main = document.getElementById("main");
    if (main) main.focus({ preventScroll: true });
  });
})();
