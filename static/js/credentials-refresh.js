// A download form's answer is a file: the browser stays on the page, whose "My credentials" would still list
// what it did before. After such a form is sent, the page is fetched again a moment later and its #credentials
// section replaces this one (again a little later if the new credential is not there yet). Without JavaScript
// nothing changes: a reload shows it.
(function () {
  "use strict";
  const DELAYS = [1500, 3000, 6000]; // ms: making the download takes a moment
  const current = () => document.getElementById("credentials");
  if (!current()) return;

  async function refresh(before, attempt) {
    let html;
    try {
      const response = await fetch(current().dataset.source || window.location.pathname, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      if (!response.ok) return;
      html = await response.text();
    } catch (err) {
      return; // the page keeps what it shows
    }
    const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("credentials");
    if (!fresh) return;
    if (fresh.innerHTML !== before) {
      current().replaceWith(document.importNode(fresh, true));
    } else if (attempt + 1 < DELAYS.length) {
      setTimeout(() => refresh(before, attempt + 1), DELAYS[attempt + 1]);
    }
  }

  document.querySelectorAll("form[data-refreshes='credentials']").forEach((form) => {
    form.addEventListener("submit", () => {
      const before = current().innerHTML;
      setTimeout(() => refresh(before, 0), DELAYS[0]);
    });
  });
})();
