// The triage review: "Accept all" and "Reject all" choose for every proposal; nothing is
// applied until the person presses Apply.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    const all = event.target.closest && event.target.closest("[data-accept-all], [data-reject-all]");
    if (!all) return;
    const value = all.hasAttribute("data-accept-all") ? "accept" : "reject";
    all.closest("form")
      .querySelectorAll('input[type=radio][value="' + value + '"]')
      .forEach((radio) => (radio.checked = true));
  });
})();
