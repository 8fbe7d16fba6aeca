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

  // Before the response is swapped in: a refresh may replace its own element, and the
  // events after the swap then name the nearest element left instead.
  document.addEventListener("htmx:beforeOnLoad", function (event) {
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
