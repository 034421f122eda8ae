// After a failed login the form comes back with the user name filled in: the cursor goes to the password,
// which is what has to be typed again (the user name field has Django's autofocus otherwise).
(function () {
  "use strict";
  const form = document.querySelector("form.login[data-failed]");
  if (!form) return;
  const name = form.querySelector("input[name=username]");
  const password = form.querySelector("input[type=password]");
  if (password && name && name.value) password.focus();
})();
