// Clusters in a transitional state (requested, provisioning, updating, tearing down) follow their state
// live: each such row waits with one long poll (GET /api/clusters/{id}/wait/) for any other state and
// updates in place, with the step it is at (at least every 25 s, when a wait runs out); a cluster that ends
// (torn down, failed) reloads the page, which then lists it as ended.
(function () {
  "use strict";
  const table = document.querySelector("table[data-states]");
  if (!table) return;
  const states = table.dataset.states.split(",");
  const live = table.dataset.live.split(",");
  const transitional = table.dataset.transitional.split(",");
  const labels = JSON.parse(document.getElementById("state-labels").textContent);

  // the step the cluster is at, while it is in a transitional state (a device that keeps failing shows here)
  function showProgress(row, cluster) {
    const progress = row.querySelector(".state .progress");
    if (!progress) return;
    const at = cluster.progress && cluster.progress.current;
    progress.textContent =
      transitional.includes(cluster.state) && at ? ` step ${at}, ${cluster.progress.percent} % done` : "";
  }

  async function follow(row) {
    let state = row.dataset.state;
    let failures = 0;
    while (transitional.includes(state)) {
      const until = states.filter((s) => s !== state).join(",");
      let cluster;
      let pause = 0;
      const asked = Date.now();
      try {
        const response = await fetch(`/api/clusters/${row.dataset.cluster}/wait/?until=${until}&timeout=25`, {
          credentials: "same-origin",
          headers: { Accept: "application/json" },
        });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        cluster = await response.json();
        failures = 0;
        // a wait answered at once (the portal's long-poll slots for this caller are taken: Retry-After) is
        // asked again only after a pause, never in a tight loop
        const retryAfter = Number(response.headers.get("Retry-After"));
        pause = retryAfter > 0 ? retryAfter * 1000 : Math.max(0, 1000 - (Date.now() - asked));
      } catch (err) {
        failures += 1;
        if (failures > 5) return; // the page still shows the last state it knew
        await new Promise((resolve) => setTimeout(resolve, 1000 * failures));
        continue;
      }
      showProgress(row, cluster);
      if (cluster.state === state) {
        // the wait ran out: ask again (after the pause the answer asked for, if it came early)
        if (pause) await new Promise((resolve) => setTimeout(resolve, pause));
        continue;
      }
      if (!live.includes(cluster.state)) {
        // the home page afresh, never reload(): a page answered to a refused Extend or Tear down is a POST's,
        // and reloading it would send that POST again
        window.location.assign(table.dataset.home);
        return;
      }
      state = cluster.state;
      row.dataset.state = state;
      const tag = row.querySelector(".state .tag");
      tag.className = `tag state-${state}`;
      tag.textContent = labels[state] || state;
      const reason = row.querySelector(".state small");
      if (reason) reason.textContent = cluster.state_reason || "";
    }
  }

  table.querySelectorAll("tr[data-cluster]").forEach((row) => {
    if (transitional.includes(row.dataset.state)) follow(row);
  });
})();
