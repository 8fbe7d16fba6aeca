// The board: drag a card to another column to act on it, close the task drawer.
// Every move has a button too (keyboard users, moves that need a reason).
(function () {
  "use strict";

  // Which action a drop means, or null when the move is not allowed.
  function actionFor(from, to) {
    if (from === to || to === "claimed") return null;
    if (to === "queued") return from === "claimed" ? "release" : "requeue";
    if (to === "done") return "done";
    if (to === "blocked" && (from === "queued" || from === "claimed")) return "block";
    return null;
  }

  let dragged = null;

  document.addEventListener("dragstart", function (event) {
    const card = event.target.closest && event.target.closest(".card[draggable=true]");
    if (!card) return;
    dragged = card;
    card.classList.add("dragging");
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", card.dataset.id);
  });

  document.addEventListener("dragend", function () {
    if (dragged) dragged.classList.remove("dragging");
    dragged = null;
    document.querySelectorAll(".drop-ok").forEach((el) => el.classList.remove("drop-ok"));
  });

  document.addEventListener("dragover", function (event) {
    const zone = event.target.closest && event.target.closest("[data-drop]");
    if (!zone || !dragged) return;
    if (actionFor(dragged.dataset.status, zone.dataset.drop)) {
      event.preventDefault();
      zone.classList.add("drop-ok");
    }
  });

  document.addEventListener("dragleave", function (event) {
    const zone = event.target.closest && event.target.closest("[data-drop]");
    if (zone && !zone.contains(event.relatedTarget)) zone.classList.remove("drop-ok");
  });

  document.addEventListener("drop", function (event) {
    const zone = event.target.closest && event.target.closest("[data-drop]");
    if (!zone || !dragged) return;
    event.preventDefault();
    zone.classList.remove("drop-ok");
    const action = actionFor(dragged.dataset.status, zone.dataset.drop);
    if (!action) return;
    const form = dragged.querySelector("form.acts");
    // The state the card showed: a task moved meanwhile is not acted on (views.task_action).
    const seen = form.querySelector("input[name=seen]");
    const values = { action: action, seen: seen ? seen.value : "" };
    if (action === "block") {
      const reason = window.prompt("Why is this task blocked?");
      if (!reason || !reason.trim()) return;
      values.reason = reason.trim();
    }
    // The CSRF header comes from the body's hx-headers, inherited through the card.
    htmx.ajax("POST", form.getAttribute("action"), {
      source: dragged,
      target: "#board",
      swap: "outerHTML",
      values: values,
    });
  });

  // The drawer on the board closes in place; on the detail page the link goes to the board.
  // Closing gives focus back to what opened it (a card or its title), found again by id:
  // the board's refresh may have replaced that element meanwhile.
  let openerId = null;
  document.addEventListener("htmx:beforeRequest", function (event) {
    const drawer = document.querySelector("aside#drawer");
    if (!drawer || event.detail.target !== drawer || drawer.children.length) return;
    const opener = document.activeElement && document.activeElement.closest("[id]");
    openerId = opener && opener !== document.body ? opener.id : null;
  });

  function closeDrawer(drawer) {
    drawer.innerHTML = "";
    const opener = openerId && document.getElementById(openerId);
    openerId = null;
    if (opener) opener.focus();
  }

  document.addEventListener("click", function (event) {
    const close = event.target.closest && event.target.closest("[data-close-drawer]");
    const drawer = document.querySelector("aside#drawer");
    if (close && drawer && drawer.contains(close)) {
      event.preventDefault();
      closeDrawer(drawer);
    }
  });

  // Esc closes the drawer, but never throws away what a person typed into its editor
  // without asking (an Esc meant for a field's suggestions, or by habit). refusals.js marks
  // a form typed into.
  document.addEventListener("keydown", function (event) {
    const drawer = document.querySelector("aside#drawer");
    if (event.key !== "Escape" || !drawer || !drawer.children.length) return;
    if (drawer.querySelector("form[data-typed]") && !window.confirm("Close the editor and lose what you typed?")) return;
    closeDrawer(drawer);
  });

  // The board polls only while its tab is visible. This is not an hx-trigger filter because
  // htmx compiles those with eval, which the Content-Security-Policy forbids.
  document.addEventListener("htmx:beforeRequest", function (event) {
    const elt = event.detail.elt;
    if (elt.hasAttribute("data-poll-visible-only") && document.visibilityState !== "visible") {
      event.preventDefault();
    }
  });

  // A refresh or an action that renders the board again asks for as many cards per
  // column as it shows now, so that the cards loaded with "Load more" stay.
  document.addEventListener("htmx:configRequest", function (event) {
    const board = document.getElementById("board");
    if (!board || event.detail.target !== board) return;
    board.querySelectorAll("section.column[data-status]").forEach(function (column) {
      const shown = column.querySelectorAll(".card").length;
      event.detail.parameters["shown_" + column.dataset.status] = String(shown);
    });
  });

  // A refresh renders as many cards per column as the page showed when it was sent: one
  // answered after "Load more" added cards (sent before it, answered after) took them
  // away again, the focus with them. It is left unswapped, and the board asked again.
  document.addEventListener("htmx:beforeSwap", function (event) {
    const board = document.getElementById("board");
    if (!board || event.detail.target !== board || !event.detail.xhr.responseURL) return;
    const asked = new URL(event.detail.xhr.responseURL).searchParams;
    const fewer = Array.from(board.querySelectorAll("section.column[data-status]")).some(function (column) {
      const shown = asked.get("shown_" + column.dataset.status);
      return shown !== null && column.querySelectorAll(".card").length > parseInt(shown, 10);
    });
    if (fewer) {
      event.detail.shouldSwap = false;
      htmx.trigger(document.body, "board-changed");
    }
  });

  // A form the server refused comes back as HTML to show in place (422: a value named
  // by its field; 409: the file changed on disk, with the difference): swap it in.
  document.addEventListener("htmx:beforeSwap", function (event) {
    const xhr = event.detail.xhr;
    const html = (xhr.getResponseHeader("Content-Type") || "").indexOf("text/html") === 0;
    if (html && (xhr.status === 422 || xhr.status === 409)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // After a swap, focus goes where the person continues: the first field of a form, or
  // the heading of what replaced it.
  document.addEventListener("htmx:afterSwap", function (event) {
    const target = event.detail.target;
    const dialog = document.querySelector("dialog[open]");
    if (dialog) {
      const wrong = dialog.querySelector("[aria-invalid=true]");
      if (wrong) wrong.focus();
      return;
    }
    if (!target || target.id !== "drawer") return;
    const invalid = target.querySelector("[aria-invalid=true]");
    const next = invalid || target.querySelector("[data-autofocus]") || target.querySelector("h1");
    if (next) next.focus();
  });
})();
