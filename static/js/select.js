// Select many and act: card checkboxes, shift-click ranges, "select all N matching", the
// bulk bar and its dialogs, and the keys (j/k, x, e, a, d, b, /, ?). Everything the mouse
// does, the keyboard does too.
(function () {
  "use strict";

  const selection = { ids: new Set(), all: false };
  let lastPickedId = null; // the card whose checkbox a shift-click extends from
  let focusedId = null; // the card j/k moved to
  let focusedBoxId = null; // the card whose checkbox has the focus

  const board = () => document.getElementById("board");
  const bar = () => document.getElementById("bulk-bar");
  const cards = () => Array.from(document.querySelectorAll("#board article.card"));
  const total = () => parseInt((board() && board().dataset.total) || "0", 10);
  const count = () => (selection.all ? total() : selection.ids.size);

  const idOf = (box) => box.closest(".card").dataset.id;

  function plural(n) {
    return n.toLocaleString() + (n === 1 ? " task" : " tasks");
  }

  // Checkboxes follow the selection after every swap of the board.
  function paint() {
    document.querySelectorAll("#board input.pick").forEach(function (box) {
      box.checked = selection.all || selection.ids.has(idOf(box));
      box.closest(".card").classList.toggle("picked", box.checked);
    });
    const b = bar();
    if (!b) return;
    b.hidden = count() === 0;
    // "All matching" is every task of the view, in every column, loaded or not: said so.
    const said = selection.all
      ? "All " + plural(total()) + " of this view selected, in every column, shown or not"
      : count().toLocaleString() + " selected";
    const shown = document.getElementById("bulk-count");
    const before = shown.textContent;
    setText(shown, said);
    // Said once each time the selection changes (not on the page's first paint).
    const region = document.getElementById("bulk-said");
    if (region && before !== said) {
      setText(region, count() > 0 ? said : "Selection cleared");
    }
    b.querySelectorAll("[data-total]").forEach((el) => setText(el, total().toLocaleString()));
    b.querySelector("[data-select-all]").hidden = selection.all;
    const lost = !document.activeElement || document.activeElement === document.body;
    const focusedBox = focusedBoxId && document.querySelector("#task-" + focusedBoxId + " input.pick");
    if (lost && focusedBox) {
      focusedBox.focus({ preventScroll: true }); // the board was swapped under it
    } else if (focusedId) {
      // The board was swapped under the focused card: it gets the focus back.
      const card = document.getElementById("task-" + focusedId);
      if (card) card.classList.add("focused");
      if (card && (!document.activeElement || document.activeElement === document.body)) {
        card.tabIndex = -1;
        card.focus({ preventScroll: true });
      }
    }
  }

  // The count is a live region and the board refreshes every 2 s: text written again,
  // even the same, is a change a screen reader may read out again.
  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function clearSelection() {
    selection.ids.clear();
    selection.all = false;
    lastPickedId = null;
    paint();
  }

  function pick(box, on, range) {
    if (selection.all) {
      // Leaving "all matching": keep what is on screen, less this one.
      selection.all = false;
      cards().forEach((card) => {
        const other = card.querySelector("input.pick");
        if (other) selection.ids.add(idOf(other));
      });
    }
    const boxes = Array.from(document.querySelectorAll("#board input.pick"));
    let chosen = [box];
    // By the card's id: a refresh of the board replaces the checkbox elements.
    const from = boxes.findIndex((el) => idOf(el) === lastPickedId);
    if (range && from >= 0) {
      const to = boxes.indexOf(box);
      chosen = boxes.slice(Math.min(from, to), Math.max(from, to) + 1);
    }
    chosen.forEach((el) => (on ? selection.ids.add(idOf(el)) : selection.ids.delete(idOf(el))));
    lastPickedId = idOf(box);
    paint();
  }

  document.addEventListener("click", function (event) {
    const box = event.target.closest && event.target.closest("#board input.pick");
    if (box) {
      pick(box, box.checked, event.shiftKey);
      return;
    }
    // Each button hides itself (the bar goes with the selection): the focus moves on
    // rather than fall to the top of the page.
    if (event.target.closest("[data-select-all]")) {
      selection.all = true;
      paint();
      bar().querySelector("[data-clear-selection]").focus();
    } else if (event.target.closest("[data-clear-selection]")) {
      const back = lastPickedId && document.querySelector("#task-" + lastPickedId + " input.pick");
      clearSelection();
      if (back) back.focus();
      else focusCard(cards()[0] || null);
    } else if (event.target.closest("[data-bulk]")) {
      act(event.target.closest("[data-bulk]").dataset.bulk);
    } else if (event.target.closest("[data-dialog-cancel]")) {
      event.target.closest("dialog").close();
    } else if (event.target.closest("[data-new-task]")) {
      openDialog("dialog-new-task");
    } else if (event.target.closest("[data-keys-help]")) {
      openDialog("dialog-keys");
    } else if (event.target.closest("[data-dismiss-status]")) {
      const status = document.getElementById("bulk-status");
      status.innerHTML = "";
      // The button went with what it dismissed: the focus goes on to the board below.
      board().focus({ preventScroll: true });
    }
  });

  function openDialog(id) {
    const dialog = document.getElementById(id);
    if (!dialog) return null;
    const counter = dialog.querySelector("[data-dialog-count]");
    if (counter) counter.textContent = plural(count());
    const claimed = dialog.querySelector("[data-dialog-claimed]");
    if (claimed) {
      // Closing or blocking a claimed task ends the agent at work on it: say so first.
      const n = claimedCount();
      claimed.hidden = n === 0;
      claimed.textContent =
        (n === count() ? (n === 1 ? "It is" : "All of them are") : n.toLocaleString() + " of them " + (n === 1 ? "is" : "are")) +
        " being worked: " + (n === 1 ? "its agent is" : "their agents are") + " ended.";
    }
    const form = dialog.querySelector("form.bulk-form");
    if (form && !form.dataset.unsent) form.reset();
    if (form) delete form.dataset.unsent;
    dialog.showModal();
    const field = dialog.querySelector("[autofocus]") || dialog.querySelector("input, select, textarea, button");
    if (field) field.focus();
    return dialog;
  }

  // How many of the selection are claimed: the claimed column's count for "all matching"
  // (the column counts the same filter), else the selected cards in that column.
  function claimedCount() {
    const column = document.querySelector('#board section.column[data-status="claimed"]');
    if (!column) return 0;
    if (selection.all) {
      const shown = column.querySelector(".count");
      return parseInt(((shown && shown.textContent) || "0").replace(/[^0-9]/g, ""), 10) || 0;
    }
    return Array.from(column.querySelectorAll("article.card")).filter((card) => selection.ids.has(card.dataset.id)).length;
  }

  // A bulk action: a dialog for those that take a value, at once for the others.
  function act(action) {
    if (count() === 0) return;
    if (document.getElementById("dialog-" + action)) {
      openDialog("dialog-" + action);
    } else {
      send(action, "");
    }
  }

  function send(action, value) {
    const values = { action: action, value: value };
    if (selection.all) {
      values.all = "on";
      // The board's filters as the server read them: the server refuses anything else.
      values.filters = bar().dataset.filters || "";
    } else {
      values.ids = Array.from(selection.ids).join(",");
      // The state each selected card shows: a task a worker took since is not closed,
      // blocked or released from under its run (views.bulk_start).
      values.seen = Array.from(selection.ids)
        .map(function (id) {
          const seen = document.querySelector("#task-" + id + " form.acts input[name=seen]");
          return seen ? id + "=" + seen.value : "";
        })
        .filter(Boolean)
        .join(",");
    }
    // The CSRF header comes from the body's hx-headers, inherited through the bar.
    const before = document.getElementById("bulk-status");
    htmx
      .ajax("POST", bar().dataset.url || "/bulk/", {
        source: bar(),
        target: "#bulk-status",
        swap: "outerHTML",
        values: values,
      })
      .then(function () {
        const status = document.getElementById("bulk-status");
        // Nothing swapped in (refused, a session ended, no answer): nothing was done, and
        // the selection stays to be sent again.
        if (status === before) {
          const form = document.querySelector('form.bulk-form[data-action="' + action + '"]');
          if (form) form.dataset.unsent = "1"; // its value too (openDialog)
          return;
        }
        if (status && !status.querySelector("[role=alert]")) clearSelection();
        // The bar that opened the dialog is hidden now: the focus goes to what happened.
        const at = document.activeElement;
        const lost = !at || at === document.body || (bar().hidden && bar().contains(at));
        if (status && lost) {
          status.tabIndex = -1;
          status.focus({ preventScroll: true });
        }
      });
  }

  document.addEventListener("submit", function (event) {
    const form = event.target.closest && event.target.closest("form.bulk-form");
    if (!form) return;
    event.preventDefault();
    const value = form.querySelector("[name=value]").value;
    form.closest("dialog").close();
    send(form.dataset.action, value);
  });

  // A task was created from the dialog: it closes, the drawer shows the new task.
  document.addEventListener("task-created", closeNewTask);

  function closeNewTask() {
    const dialog = document.getElementById("dialog-new-task");
    if (!dialog) return;
    dialog.close();
    const form = dialog.querySelector("form");
    if (form) form.reset();
  }

  document.addEventListener("focusin", function (event) {
    const box = event.target.closest && event.target.closest("#board input.pick");
    focusedBoxId = box ? idOf(box) : null;
  });

  // "Load more" replaces itself with the next cards: the focus goes to the first of them.
  let loading = null;
  document.addEventListener("htmx:beforeRequest", function (event) {
    const more = event.detail.elt.closest && event.detail.elt.closest("#board a.more");
    if (!more || document.activeElement !== more) return;
    const column = more.closest("section.column");
    loading = { status: column.dataset.status, shown: column.querySelectorAll(".card").length };
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (!loading) return;
    const column = document.querySelector('#board section.column[data-status="' + loading.status + '"]');
    const first = column && column.querySelectorAll("article.card")[loading.shown];
    loading = null;
    if (first) focusCard(first);
  });

  document.addEventListener("htmx:afterSettle", paint);
  document.addEventListener("DOMContentLoaded", paint);

  // Keys -----------------------------------------------------------------------

  function typing(target) {
    return target.closest && target.closest("input, textarea, select, [contenteditable]");
  }

  function focusCard(card) {
    document.querySelectorAll("article.card.focused").forEach((c) => c.classList.remove("focused"));
    if (!card) return;
    focusedId = card.dataset.id;
    card.classList.add("focused");
    card.tabIndex = -1; // focusable by script, not a tab stop of its own
    card.focus();
    card.scrollIntoView({ block: "nearest" });
  }

  function currentCard() {
    const active = document.activeElement && document.activeElement.closest("#board article.card");
    return active || (focusedId && document.getElementById("task-" + focusedId)) || null;
  }

  function moveFocus(step) {
    const all = cards();
    if (all.length === 0) return;
    const at = all.indexOf(currentCard());
    const next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    focusCard(all[next]);
  }

  // a, d, b act on the selection, or on the card at hand when nothing is selected.
  function selectCurrentIfNone() {
    if (count() > 0) return true;
    const card = currentCard();
    const box = card && card.querySelector("input.pick");
    if (!box) return false;
    pick(box, true, false);
    return true;
  }

  // The one-letter keys can be turned off (in the keys dialog): speech input types words,
  // and a stray letter must not mark a task done.
  const KEYS = "hypervisor-keys";
  function keysOn() {
    try {
      return window.localStorage.getItem(KEYS) !== "off";
    } catch (e) {
      return true;
    }
  }

  document.addEventListener("change", function (event) {
    if (!event.target.matches || !event.target.matches("[data-keys-on]")) return;
    try {
      if (event.target.checked) window.localStorage.removeItem(KEYS);
      else window.localStorage.setItem(KEYS, "off");
    } catch (e) {
      // No storage: the keys stay as they are.
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    const box = document.querySelector("[data-keys-on]");
    if (box) box.checked = keysOn();
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    if (!keysOn()) return;
    if (document.querySelector("dialog[open]")) return;
    const card = currentCard();
    switch (event.key) {
      case "j":
        moveFocus(1);
        break;
      case "k":
        moveFocus(-1);
        break;
      case "x":
      case "X": {
        // Shift+x sends "X": a range, as a shift-click does.
        const box = card && card.querySelector("input.pick");
        if (!box) return;
        box.checked = !box.checked;
        pick(box, box.checked, event.shiftKey);
        break;
      }
      case "Enter":
        if (!card || event.target !== card) return;
        card.querySelector("a.title").click();
        break;
      case "e":
        if (!card || !bar()) return;
        htmx.ajax("GET", "/tasks/" + card.dataset.id + "/edit/", { target: "#drawer" });
        break;
      case "a":
        if (!bar() || !selectCurrentIfNone()) return;
        act("assign");
        break;
      case "d":
        if (!bar()) return;
        if (count() === 0 && card) {
          const done = card.querySelector("button[value=done]");
          // One key must not throw away an agent's run without a word.
          const running = card.dataset.status === "claimed";
          if (done && (!running || window.confirm("A worker holds this task: end its agent and mark it done?"))) done.click();
        } else if (count() > 0) {
          act("close");
        }
        break;
      case "b":
        if (!bar() || !selectCurrentIfNone()) return;
        act("block");
        break;
      case "/": {
        const search = document.querySelector("form.filters input[name=q]");
        if (search) search.focus();
        break;
      }
      case "?":
        openDialog("dialog-keys");
        break;
      default:
        return;
    }
    event.preventDefault();
  });
})();
