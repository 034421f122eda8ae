"""The clusters page acts on a cluster in the browser, as the API does: "Extend" on its row, "Tear down…" behind
a page that says what that does; only for whoever may act on it (the owner, an admin), POST with CSRF only."""
# ruff: noqa: F401, F811 (fixtures imported from other test modules)

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from access.tests.browser import browser_page, log_in
from access.tests.fixtures import make_cluster
from clusters.models import ClusterState, VirtualCluster
from clusters.tests.helpers import create_cluster, life_cycle_attempts
from network.tests.fakefabric import fabric_fixture
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def row(page: str, cluster) -> str:
    """The cluster's row on the clusters page."""
    return page.split(f'data-cluster="{cluster.pk}"')[1].split("</tr>")[0]


def utc(moment) -> str:
    return f"{moment.astimezone(timezone.get_fixed_timezone(0)):%Y-%m-%d %H:%M} UTC"


def audited(cluster) -> list[AuditEntry]:
    """The audit log's entries about ``cluster``, oldest first."""
    from django.contrib.contenttypes.models import ContentType

    kind = ContentType.objects.get_for_model(VirtualCluster)
    return list(AuditEntry.objects.filter(content_type=kind, object_id=str(cluster.pk)).order_by("pk"))


# --- Extend ---------------------------------------------------------------------------------------------------


def test_extend_moves_the_expiry_and_says_until_when(alice):
    cluster = make_cluster(alice, name="mpi")
    before, entries = cluster.expires_at, len(audited(cluster))
    client = logged_in(alice)
    page = client.get("/").content.decode()
    mine = row(page, cluster)
    # labelled for a screen reader by the cluster it extends; offers the lengths, one day by default
    assert f'<label for="extend-{cluster.pk}-by" class="visually-hidden">Extend mpi by</label>' in mine
    assert '<option value="1d" selected>+1 day</option>' in mine and '<option value="7d">+7 days</option>' in mine
    assert f'action="/clusters/{cluster.pk}/extend/"' in mine and 'aria-label="Extend mpi"' in mine

    response = client.post(f"/clusters/{cluster.pk}/extend/", {"by": "7d"}, follow=True)
    assert response.redirect_chain == [("/", 302)]
    cluster.refresh_from_db()
    assert cluster.expires_at == before + timedelta(days=7)
    text = response.content.decode()
    assert f"Extended mpi: it now expires {utc(cluster.expires_at)}." in text
    assert "downloaded before still end at the old expiry" in text  # (a closed cluster's credentials)
    assert f">{utc(cluster.expires_at)}</time>" in row(text, cluster)
    # audited once, by the service (the model's registration), as alice's change of expires_at
    new = audited(cluster)[entries:]
    assert [(e.actor, e.action, list(e.changes)) for e in new] == [("alice", "update", ["expires_at"])]


def test_extend_past_the_maximum_lifetime_is_refused_at_the_field(alice, settings):
    settings.CLUSTER_MAX_LIFETIME = 2 * 24 * 3600  # two days from creation; the cluster expires in one
    cluster = make_cluster(alice, name="mpi")
    before, entries = cluster.expires_at, len(audited(cluster))
    client = logged_in(alice)
    mine = row(client.get("/").content.decode(), cluster)
    assert '<option value="1d"' in mine and '<option value="7d"' not in mine  # only what the bounds allow

    response = client.post(f"/clusters/{cluster.pk}/extend/", {"by": "7d"})  # a page left open offered it
    assert response.status_code == 400
    mine = row(response.content.decode(), cluster)
    latest = utc(cluster.created_at + timedelta(days=2))
    assert f"The lifetime must be at most 2 days from creation: mpi may run until {latest} at most." in mine
    assert 'class="extend invalid"' in mine and 'aria-invalid="true"' in mine and "autofocus" in mine
    cluster.refresh_from_db()
    assert cluster.expires_at == before and len(audited(cluster)) == entries

    assert client.post(f"/clusters/{cluster.pk}/extend/", {"by": "1y"}).status_code == 400  # not a length offered
    cluster.refresh_from_db()
    assert cluster.expires_at == before


def test_a_refused_extend_of_a_cluster_not_on_the_page_says_why_in_a_message(alice, settings, monkeypatch):
    """The page lists the newest live clusters only: a refusal for one past them (a batch system made many more
    since the page was opened) came back as a 400 page with nothing that said why."""
    from clusters import views

    settings.CLUSTER_MAX_LIFETIME = 2 * 24 * 3600
    old = make_cluster(alice, name="old")
    make_cluster(alice, name="newer")
    monkeypatch.setattr(views, "HOME_LIVE_SHOWN", 1)
    client = logged_in(alice)
    response = client.post(f"/clusters/{old.pk}/extend/", {"by": "7d"})
    assert response.status_code == 400
    text = response.content.decode()
    assert f'data-cluster="{old.pk}"' not in text
    assert "old was not extended: The lifetime must be at most 2 days from creation" in text


def test_extend_adds_to_an_extension_saved_after_the_view_read_the_cluster(alice, monkeypatch):
    """The scheduler extends through the API between the view's read and its write: "+1 day" is added to that
    extension under the row lock, never written as the older expiry + 1 day (which would shorten the lifetime)."""
    from clusters import views

    cluster = make_cluster(alice, name="mpi")
    later = cluster.expires_at + timedelta(days=5)
    visible = views._visible

    def read_then_extended(request, pk):
        as_read = visible(request, pk)
        VirtualCluster.objects.filter(pk=pk).update(expires_at=later)  # the API's extension, meanwhile
        return as_read

    monkeypatch.setattr(views, "_visible", read_then_extended)
    response = logged_in(alice).post(f"/clusters/{cluster.pk}/extend/", {"by": "1d"}, follow=True)
    assert response.redirect_chain == [("/", 302)]
    cluster.refresh_from_db()
    assert cluster.expires_at == later + timedelta(days=1)
    assert f"Extended mpi: it now expires {utc(later + timedelta(days=1))}." in response.content.decode()


def test_a_cluster_at_its_longest_lifetime_offers_no_extension(alice, settings):
    settings.CLUSTER_MAX_LIFETIME = 24 * 3600 + 1800  # 30 min past its expiry: not even one hour more
    cluster = make_cluster(alice, name="mpi")
    mine = row(logged_in(alice).get("/").content.decode(), cluster)
    assert "Longest lifetime reached." in mine and "<select" not in mine and "Tear down…" in mine


def test_a_refused_extend_says_why_also_when_no_length_fits_any_more(alice, settings):
    """A page left open sends "+7 days" after another tab took the lifetime to its longest: no length is offered
    any more, and the refusal's reason is still there, under the row."""
    settings.CLUSTER_MAX_LIFETIME = 24 * 3600 + 1800  # 30 min past its expiry: not even one hour more
    cluster = make_cluster(alice, name="mpi")
    response = logged_in(alice).post(f"/clusters/{cluster.pk}/extend/", {"by": "7d"})
    assert response.status_code == 400
    mine = row(response.content.decode(), cluster)
    assert "Longest lifetime reached." in mine and "may run until" in mine


def test_a_steps_error_is_on_the_clusters_page(alice):
    """Why a step failed (a node change called off, a device that timed out) is on the cluster's page, as in the
    API."""
    from clusters.models import ClusterStep, StepStatus

    cluster = make_cluster(alice, name="mpi")
    ClusterStep.objects.create(
        cluster=cluster,
        name="update",
        status=StepStatus.FAILED,
        started_at=timezone.now(),
        finished_at=timezone.now(),
        error="called off by the teardown: job cancelled (by alice)",
    )
    page = logged_in(alice).get(f"/clusters/{cluster.pk}/").content.decode()
    assert "called off by the teardown: job cancelled (by alice)" in page.split('id="steps"')[1]


def test_extending_a_cluster_being_torn_down_is_refused_with_a_message(alice):
    cluster = make_cluster(alice, name="mpi")
    before = cluster.expires_at
    page = logged_in(alice).get("/").content.decode()
    assert f"/clusters/{cluster.pk}/extend/" in page
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.TEARING_DOWN)  # meanwhile
    response = logged_in(alice).post(f"/clusters/{cluster.pk}/extend/", {"by": "1d"}, follow=True)
    assert response.redirect_chain == [("/", 302)]
    text = response.content.decode()
    assert "Cluster mpi is tearing down and cannot be extended" in text
    assert f"/clusters/{cluster.pk}/extend/" not in text  # its row offers nothing any more
    cluster.refresh_from_db()
    assert cluster.expires_at == before


# --- Tear down ------------------------------------------------------------------------------------------------


def test_teardown_asks_first_saying_what_happens(alice, team):
    cluster = make_cluster(alice, name="mpi", group=team, nodes=("node1", "node2"))
    client = logged_in(alice)
    mine = row(client.get("/").content.decode(), cluster)
    assert f'<a href="/clusters/{cluster.pk}/teardown/" class="danger" aria-label="Tear down mpi…">' in mine

    response = client.get(f"/clusters/{cluster.pk}/teardown/")
    assert response.status_code == 200
    text = response.content.decode()
    assert "<h1>Tear down mpi?</h1>" in text
    what = text.split('<ul id="what-happens">')[1].split("</ul>")[0]
    assert f"Its VLAN {cluster.vlan_id} is removed from every host and every switch" in what
    assert "Its nodes (node1, node2) lose their network" in what
    assert "Every access credential for it" in what and "Members of group physics lose it too." in what
    assert f'<form method="post" action="/clusters/{cluster.pk}/teardown/">' in text
    assert '<button type="submit" class="danger">Tear down mpi</button>' in text
    assert "Cancel, keep it" in text and 'name="csrfmiddlewaretoken"' in text
    assert client.head(f"/clusters/{cluster.pk}/teardown/").status_code == 200
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY  # asking changed nothing


def test_teardown_post_starts_it_and_the_workflow_after_commit(alice, monkeypatch, django_capture_on_commit_callbacks):
    from clusters import workflows

    cluster = make_cluster(alice, name="mpi")
    started = []
    monkeypatch.setattr(workflows, "start_teardown", lambda *args: started.append(args))
    client = logged_in(alice)
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(f"/clusters/{cluster.pk}/teardown/")
    assert (response.status_code, response.url) == (302, "/")
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TEARING_DOWN
    assert cluster.state_reason == "requested in the browser (by alice)"
    assert started == []  # nothing is sent before the request's transaction commits
    for callback in callbacks:
        callback()
    assert started == [(cluster.pk, cluster.workflow_generation)]
    assert [e.message for e in audited(cluster) if e.action == "action"] == [
        "teardown: requested in the browser (by alice)"
    ]
    page = client.get("/").content.decode()
    assert "Tearing down mpi: its VLAN leaves every switch and host" in page
    assert f"/clusters/{cluster.pk}/teardown/" not in page  # a cluster being torn down offers no action

    # sent twice (a double click): harmless, said so
    again = client.post(f"/clusters/{cluster.pk}/teardown/", follow=True)
    assert "mpi is already being torn down." in again.content.decode()
    assert len([e for e in audited(cluster) if e.action == "action"]) == 1


@pytest.mark.django_db(transaction=True)
def test_a_teardown_from_the_browser_cleans_the_network_and_a_second_one_says_it_has_ended(fabric, alice):
    cid = create_cluster(alice, name="mpi")  # through the API, on the fake fabric: READY
    cluster = VirtualCluster.objects.get(pk=cid)
    client = logged_in(alice)
    response = client.post(f"/clusters/{cid}/teardown/", follow=True)  # (eager Celery: the whole workflow)
    assert response.status_code == 200
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TORN_DOWN
    for host in fabric.hosts:
        assert cluster.vlan_id not in fabric.host_vlans(host)
    ended = response.content.decode().split("<h3>Recently ended</h3>")[1]
    assert "mpi" in ended and "requested in the browser (by alice)" in ended

    # a page left open: the second teardown is told it has ended — no 500, nothing changes
    again = client.post(f"/clusters/{cid}/teardown/", follow=True)
    assert again.redirect_chain == [("/", 302)]
    assert "Cluster mpi has ended (torn down): nothing to tear down" in again.content.decode()
    late = client.post(f"/clusters/{cid}/extend/", {"by": "1d"}, follow=True)
    assert "Cluster mpi is torn down and cannot be extended" in late.content.decode()
    confirm = client.get(f"/clusters/{cid}/teardown/").content.decode()
    assert "<h1>mpi has ended</h1>" in confirm and "<button" not in confirm.split("<main>")[1]


# --- who may, and how -----------------------------------------------------------------------------------------


def test_someone_else_s_cluster_is_not_found(alice, charlie):
    cluster = make_cluster(alice, name="mpi")  # no group: charlie cannot see it
    client = logged_in(charlie)
    assert client.get(f"/clusters/{cluster.pk}/teardown/").status_code == 404
    assert client.post(f"/clusters/{cluster.pk}/teardown/").status_code == 404
    assert client.post(f"/clusters/{cluster.pk}/extend/", {"by": "1d"}).status_code == 404
    before = cluster.expires_at
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.READY, before)


def test_a_group_member_sees_the_cluster_but_may_not_act_on_it_and_an_admin_may(alice, bob, root, team):
    cluster = make_cluster(alice, name="mpi", group=team)
    before = cluster.expires_at
    client = logged_in(bob)
    mine = row(client.get("/").content.decode(), cluster)
    assert "mpi" in mine and "Extend" not in mine and "Tear down" not in mine
    for response in life_cycle_attempts(client, cluster):
        assert response.status_code == 403
        assert "Only alice, who owns mpi, or an administrator can extend it or tear it" in response.content.decode()
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.READY, before)

    admin = logged_in(root)
    assert 'aria-label="Extend mpi"' in row(admin.get("/").content.decode(), cluster)
    assert admin.post(f"/clusters/{cluster.pk}/extend/", {"by": "1h"}).status_code == 302
    cluster.refresh_from_db()
    assert cluster.expires_at == before + timedelta(hours=1)


def test_the_forms_addresses_take_only_their_methods(alice):
    cluster = make_cluster(alice, name="mpi")
    client = logged_in(alice)
    response = client.get(f"/clusters/{cluster.pk}/extend/")
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert 'href="/"' in response.content.decode()  # a page leading back, not a blank one
    assert client.put(f"/clusters/{cluster.pk}/teardown/").status_code == 405
    assert client.delete(f"/clusters/{cluster.pk}/teardown/").status_code == 405
    before = cluster.expires_at
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.READY, before)
    anonymous = Client().post(f"/clusters/{cluster.pk}/teardown/")
    assert (anonymous.status_code, anonymous.url) == (302, f"/login/?next=/clusters/{cluster.pk}/teardown/")


def test_the_forms_need_the_csrf_token(alice):
    cluster = make_cluster(alice, name="mpi")
    before = cluster.expires_at
    client = logged_in(alice, enforce_csrf_checks=True)
    assert client.post(f"/clusters/{cluster.pk}/extend/", {"by": "1d"}).status_code == 403
    assert client.post(f"/clusters/{cluster.pk}/teardown/").status_code == 403
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.READY, before)
    # with the token the page gives, the same requests go through
    page = client.get("/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', row(page, cluster)).group(1)
    extended = client.post(f"/clusters/{cluster.pk}/extend/", {"by": "1d", "csrfmiddlewaretoken": token})
    assert extended.status_code == 302
    torn = client.post(f"/clusters/{cluster.pk}/teardown/", {"csrfmiddlewaretoken": token})
    assert torn.status_code == 302
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TEARING_DOWN and cluster.expires_at == before + timedelta(days=1)


# --- "expires soon" -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "shown"),
    [
        (timedelta(hours=3, minutes=30), "in 3 h"),
        (timedelta(hours=23, minutes=59), "in 23 h"),
        (timedelta(minutes=20, seconds=30), "in 20 min"),
        (-timedelta(minutes=1), "past its expiry"),
        (timedelta(hours=24, minutes=5), None),
        (timedelta(days=7), None),
    ],
)
def test_a_cluster_expiring_within_a_day_says_so_beside_its_expiry(alice, bob, team, left, shown):
    cluster = make_cluster(alice, name="mpi", group=team)
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + left)
    for user in (alice, bob):  # a group member is warned too
        mine = row(logged_in(user).get("/").content.decode(), cluster)
        if shown is None:
            assert 'class="tag soon"' not in mine
        else:
            assert f'UTC</time> <strong class="tag soon">{shown}</strong>' in mine


def test_expires_soon_is_the_window_of_the_expiring_event(alice, settings):
    """The page warns when the feed does (``CLUSTER_EXPIRY_WARNING``): one setting, one notion of "soon"."""
    settings.CLUSTER_EXPIRY_WARNING = 3600
    cluster = make_cluster(alice, name="mpi")
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + timedelta(hours=3))
    assert 'class="tag soon"' not in row(logged_in(alice).get("/").content.decode(), cluster)
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + timedelta(minutes=50, seconds=30))
    assert '<strong class="tag soon">in 50 min</strong>' in row(logged_in(alice).get("/").content.decode(), cluster)


def test_a_cluster_being_torn_down_is_not_said_to_expire_soon(alice):
    cluster = make_cluster(alice, name="mpi", state=ClusterState.TEARING_DOWN)
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + timedelta(hours=2))
    assert 'class="tag soon"' not in row(logged_in(alice).get("/").content.decode(), cluster)


def test_the_page_with_actions_keeps_its_query_count(alice, team, django_assert_max_num_queries):
    for i in range(5):
        make_cluster(alice, name=f"mpi{i}", group=team, nodes=("node1", "node2"))
    client = logged_in(alice)
    with django_assert_max_num_queries(12):
        page = client.get("/").content.decode()
    assert page.count('aria-label="Extend mpi') == 5


# --- in a browser, on a phone ---------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_on_a_phone_a_cluster_is_extended_and_torn_down(browser_page, live_server, alice):
    cluster = make_cluster(alice, name="mpi-with-a-rather-long-name", nodes=("node1", "node2", "node3"))
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + timedelta(hours=3, minutes=30))
    page = browser_page
    page.set_viewport_size({"width": 390, "height": 800})
    log_in(page, live_server, "alice", "alice-password")
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    mine = f"tr[data-cluster='{cluster.pk}']"
    assert "in 3 h" in page.inner_text(f"{mine} td[data-label='Expires']")
    for control in (f"{mine} select", f"{mine} form.extend button", f"{mine} a.danger"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (control, box)

    page.get_by_label("Extend mpi-with-a-rather-long-name by").select_option("7d")
    page.get_by_role("button", name="Extend mpi-with-a-rather-long-name").click()
    page.wait_for_selector(".message.success")
    cluster.refresh_from_db()
    assert f"it now expires {utc(cluster.expires_at)}" in page.inner_text(".message.success")
    assert "in 3 h" not in page.inner_text(f"{mine} td[data-label='Expires']")

    page.get_by_role("link", name="Tear down mpi-with-a-rather-long-name…").click()
    page.wait_for_selector("h1:has-text('Tear down mpi-with-a-rather-long-name?')")
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    page.get_by_role("button", name="Tear down mpi-with-a-rather-long-name").click()
    page.wait_for_selector(".message.success")
    assert VirtualCluster.objects.get(pk=cluster.pk).state in (ClusterState.TEARING_DOWN, ClusterState.TORN_DOWN)
