"""The clusters page in headless Chromium follows a cluster's state live (the long poll of
``GET /api/clusters/{id}/wait/`` from ``static/js/live-state.js``), without reloading."""
# ruff: noqa: F401, F811 (the browser fixture is imported from access.tests.browser)

from __future__ import annotations

import pytest

from access.tests.browser import browser_page, log_in
from access.tests.fixtures import make_cluster
from clusters.models import ClusterState, VirtualCluster

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_provisioning_cluster_turns_ready_on_the_page(browser_page, live_server, alice):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the page's long poll is woken by PostgreSQL notifications")
    from django.utils import timezone

    from clusters.models import ClusterStep, StepStatus

    cluster = make_cluster(alice, name="mpi", state=ClusterState.PROVISIONING)
    step = ClusterStep.objects.create(
        cluster=cluster, name="network", status=StepStatus.RUNNING, started_at=timezone.now()
    )
    page = browser_page
    log_in(page, live_server, "alice", "alice-password")
    row = f"tr[data-cluster='{cluster.pk}']"
    assert page.inner_text(f"{row} .state .tag") == "provisioning"
    assert "step network, 0 % done" in page.inner_text(f"{row} .state")
    page.wait_for_timeout(300)  # the script's long poll is waiting now

    step.status = StepStatus.OK
    step.save()
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.READY)
    page.wait_for_selector(f"{row}[data-state='ready']", timeout=10_000)
    assert page.inner_text(f"{row} .state .tag") == "ready"
    assert "state-ready" in page.get_attribute(f"{row} .state .tag", "class")
    assert page.inner_text(f"{row} .state .progress") == ""  # settled: no step shown

    # a settled row is not followed any more; a cluster that ends makes the page list it as ended
    other = make_cluster(alice, name="hpc", state=ClusterState.TEARING_DOWN)
    page.reload()
    page.wait_for_timeout(300)
    VirtualCluster.objects.filter(pk=other.pk).update(state=ClusterState.TORN_DOWN, state_reason="job done")
    page.wait_for_selector("h3:has-text('Recently ended')", timeout=10_000)
    assert "job done" in page.inner_text("body")


def test_a_cluster_ending_under_a_refused_extends_page_goes_home_without_sending_it_again(
    browser_page, live_server, alice
):
    """The page a refused Extend answers with is a POST's: when a followed cluster ends there, the script opens the
    home page afresh — reloading would send the Extend again (the browser asks, and a user says yes)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the page's long poll is woken by PostgreSQL notifications")
    kept = make_cluster(alice, name="mpi")
    ending = make_cluster(alice, name="hpc", state=ClusterState.TEARING_DOWN)
    page = browser_page
    log_in(page, live_server, "alice", "alice-password")
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.evaluate(  # a length no form offers (a page left open): refused, the page answered at the POST's address
        """([url, csrf]) => { const f = document.createElement("form"); f.method = "post"; f.action = url;
        for (const [k, v] of [["by", "1y"], ["csrfmiddlewaretoken", csrf]]) {
          const i = document.createElement("input"); i.name = k; i.value = v; f.appendChild(i); }
        document.body.appendChild(f); f.submit(); }""",
        [f"/clusters/{kept.pk}/extend/", page.input_value("input[name=csrfmiddlewaretoken]")],
    )
    page.wait_for_url(f"**/clusters/{kept.pk}/extend/")
    page.wait_for_timeout(300)  # the script follows the ending cluster now
    VirtualCluster.objects.filter(pk=ending.pk).update(state=ClusterState.TORN_DOWN, state_reason="job done")
    page.wait_for_url(f"{live_server.url}/", timeout=10_000)
    page.wait_for_selector("h3:has-text('Recently ended')")
    assert len([url for url in posts if "/extend/" in url]) == 1


def test_the_page_backs_off_when_its_long_polls_are_answered_at_once(browser_page, live_server, alice, settings):
    """With more clusters changing than long-poll slots free for this user, a wait is answered at once with
    ``Retry-After``: the page asks again after that pause, not in a tight loop that ties up the web server."""
    settings.LONG_POLL_SLOTS = 1  # one slot: the second row's wait is answered at once, every time
    for name in ("mpi", "hpc"):
        make_cluster(alice, name=name, state=ClusterState.PROVISIONING)
    page = browser_page
    waits = []
    page.on("request", lambda request: waits.append(request.url) if "/wait/" in request.url else None)
    log_in(page, live_server, "alice", "alice-password")
    page.wait_for_timeout(3000)
    # one wait holds the slot for 25 s; the other is asked again about once a second (hundreds without a pause)
    assert 2 <= len(waits) <= 8, len(waits)


def test_a_user_registers_and_deletes_an_image_on_a_phone(browser_page, live_server, alice, team):
    """At 390 px: the images page fits the screen (a long source URL wraps), registering shares the image with
    the group chosen, and its row offers Delete."""
    from clusters.models import Image

    page = browser_page
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, live_server, "alice", "alice-password", next_url="/clusters/images/")
    page.fill("#id_name", "my-stack")
    page.fill("#id_source", "https://images.example.org/" + "very-long-path-segment/" * 6 + "stack.qcow2")
    page.select_option("#id_group", label="physics")
    page.click("#image-form button[type=submit]")
    page.wait_for_selector("tr[data-image='my-stack']")
    assert "Registered my-stack, shared with physics" in page.inner_text(".messages")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    image = Image.objects.get(name="my-stack")
    assert (image.owner, image.group, image.approved) == (alice, team, False)
    page.click("tr[data-image='my-stack'] a.danger")  # asks first
    page.wait_for_selector("#what-happens")
    assert "its name is free again" in page.inner_text("#what-happens")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.click("button.danger")
    page.wait_for_selector("#image-form")
    assert page.query_selector("tr[data-image='my-stack']") is None
    assert "Deleted my-stack." in page.inner_text(".messages")
