// The herd page refreshes its live section every 2 s. What the refresh replaces must not
// take the keyboard's focus with it, and a change of the herd's state is said once, in a
// live region the refresh leaves alone (the section itself is not one: it would be read
// out every 2 s).
(function () {
  "use strict";

  const state = () => document.querySelector("#herd-live .herd-progress .herd-status");
  const words = () => (state() ? state().textContent.replace(/\s+/g, " ").trim() : "");
  let said = null; // the state last seen
  let hadFocus = false; // the focus was in the section the swap replaces

  document.addEventListener("DOMContentLoaded", function () {
    said = words();
  });

  let scrolled = {}; // how far each wide table was scrolled sideways, by its box's id

  document.addEventListener("htmx:beforeSwap", function (event) {
    const live = document.getElementById("herd-live");
    hadFocus = !!live && event.detail.target === live && live.contains(document.activeElement);
    scrolled = {};
    document.querySelectorAll("#herd-live .table-scroll[id]").forEach(function (box) {
      scrolled[box.id] = box.scrollLeft;
    });
  });

  document.addEventListener("htmx:afterSettle", function () {
    // The refresh must not throw a table scrolled sideways (a phone) back to its start.
    Object.keys(scrolled).forEach(function (id) {
      const box = document.getElementById(id);
      if (box) box.scrollLeft = scrolled[id];
    });
    const now = words();
    const region = document.getElementById("herd-state");
    if (region && said !== null && now && now !== said) {
      region.textContent = region.dataset.herd + " is now " + now.toLowerCase() + ".";
    }
    if (now) said = now;
    // A Drain or Cancel that took its own button away: the focus goes to what it says.
    const at = document.activeElement;
    if (hadFocus && (!at || at === document.body)) {
      const next = document.getElementById("herd-notice");
      next.tabIndex = -1;
      next.focus({ preventScroll: true });
    }
    hadFocus = false;
  });
})();
