// The launch form is sent once: a second click on Start while the first submit is on its
// way would send it again. The server launches once per form anyway (its launch token);
// this only keeps the page from asking twice.
(function () {
  "use strict";

  const form = document.querySelector("form.herd-form");
  if (!form) return;

  // A form sent back with errors: the focus goes to the first field named by one (it is
  // described by its error), not to the top of a page that looks as it did.
  const wrong = form.querySelector("[aria-invalid=true]");
  if (wrong) wrong.focus();

  form.addEventListener("submit", function (event) {
    if (form.dataset.sent) {
      event.preventDefault();
      return;
    }
    form.dataset.sent = "1";
    // After this event: a button disabled now would leave its name (confirm) out of
    // what is sent.
    setTimeout(function () {
      form.querySelectorAll("button[type=submit]").forEach(function (button) {
        button.disabled = true;
      });
    });
  });

  // Back to this page from the herd's: the form may be sent again (the server decides).
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) return;
    delete form.dataset.sent;
    form.querySelectorAll("button[type=submit]").forEach(function (button) {
      button.disabled = false;
    });
  });
})();
