"""``GET /api/clusters/events/``: the feed of cluster state changes, written by the database in the transaction
of each change (triggers), numbered in commit order, read with a cursor and an optional long poll."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.db.models import F
from django.utils import timezone

from clusters.models import ClusterEvent, ClusterState, VirtualCluster
from clusters.tests.helpers import client_for, create_cluster
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def feed(user, **query) -> dict:
    r = client_for(user).get("/api/clusters/events/", query)
    assert r.status_code == 200, r.content
    return r.data


def test_a_clusters_life_is_in_the_feed_in_order(fabric, alice):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    page = feed(alice)
    assert [(e["cluster"], e["state"]) for e in page["events"]] == [
        (cid, "requested"),
        (cid, "provisioning"),
        (cid, "ready"),
    ]
    ids = [e["id"] for e in page["events"]]
    assert ids == sorted(ids) and page["last"] == ids[-1]
    assert page["events"][0]["cluster_name"] == "c1"
    assert feed(alice, after=page["last"]) == {"events": [], "last": page["last"]}
    assert client_for(alice).post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    more = feed(alice, after=page["last"])
    assert [e["state"] for e in more["events"]] == ["tearing_down", "torn_down"]


def test_an_extension_is_a_lifetime_event_with_the_new_expiry(fabric, alice, root, client):
    """Extended through the API, the browser or the admin: one ``lifetime`` event each (the scheduler learns the new
    expiry from the feed or its webhook); a save that leaves the expiry as it was writes none."""
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    last = feed(alice)["last"]
    cluster = VirtualCluster.objects.get(pk=cid)
    later = cluster.expires_at + timedelta(hours=2)
    r = client_for(alice).patch(f"/api/clusters/{cid}/", {"expires_at": later.isoformat()}, format="json")
    assert r.status_code == 200, r.content
    client.force_login(alice)
    assert client.post(f"/clusters/{cid}/extend/", {"by": "1h"}).status_code == 302
    VirtualCluster.objects.filter(pk=cid).update(expires_at=F("expires_at"))  # the same value: nothing
    events = feed(alice, after=last)["events"]
    cluster.refresh_from_db()
    assert [(e["kind"], e["state"]) for e in events] == [("lifetime", "ready")] * 2
    assert events[-1]["expires_at"] == cluster.expires_at.isoformat().replace("+00:00", "Z")
    assert cluster.expires_at > later


def test_the_feed_shows_only_clusters_you_may_see(fabric, alice, bob, charlie, team):
    own = create_cluster(alice, "mine", "52:54:00:00:00:01")
    shared = create_cluster(alice, "ours", "52:54:00:00:00:02", group="physics")
    assert {e["cluster"] for e in feed(alice)["events"]} == {own, shared}
    assert {e["cluster"] for e in feed(bob)["events"]} == {shared}  # a group member
    assert feed(charlie)["events"] == []
    only = feed(alice, cluster=own, limit=2)
    assert [e["state"] for e in only["events"]] == ["requested", "provisioning"]
    rest = feed(alice, cluster=own, after=only["last"])
    assert [e["state"] for e in rest["events"]] == ["ready"]


def test_one_clusters_feed_of_a_cluster_you_may_not_see_is_404(fabric, alice, bob, charlie, team):
    """``cluster=`` naming a cluster that does not exist or that the caller may not see was an empty page —
    with ``timeout``, after waiting it out for an event that could never come. It is a 404 at once, as every
    other endpoint answers for such an id."""
    own = create_cluster(alice, "mine", "52:54:00:00:00:01")
    shared = create_cluster(alice, "ours", "52:54:00:00:00:02", group="physics")
    for user, cluster in ((bob, own), (charlie, own), (charlie, shared), (alice, own + shared + 1000)):
        started = time.monotonic()
        r = client_for(user).get("/api/clusters/events/", {"cluster": cluster, "timeout": 5})
        assert r.status_code == 404, (user, cluster, r.content)
        assert time.monotonic() - started < 2
    assert [e["state"] for e in feed(bob, cluster=shared)["events"]] == ["requested", "provisioning", "ready"]


@pytest.mark.parametrize(
    "query",
    ["after=-1", "after=x", "limit=0", "limit=1001", "cluster=0", "timeout=-1", "timeout=1000", "timeout=nan"],
)
def test_bad_queries_are_400(alice, query):
    r = client_for(alice).get(f"/api/clusters/events/?{query}")
    assert r.status_code == 400, r.content
    assert query.split("=")[0] in r.data


def test_a_change_rolled_back_leaves_no_event(fabric, alice):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    before = ClusterEvent.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        VirtualCluster.objects.filter(pk=cid).update(state=ClusterState.TEARING_DOWN)
        raise RuntimeError("rolled back")
    assert ClusterEvent.objects.count() == before


def test_ids_follow_commit_order_so_the_cursor_skips_nothing(fabric, alice):
    """A changes first but commits last; B changes and commits in between and is read. A's event must come
    after B's: a reader continuing from B's id still gets A's (with ids taken at change time it would not)."""
    if connection.vendor != "postgresql":
        pytest.skip("concurrent transactions need PostgreSQL")
    a = create_cluster(alice, "a", "52:54:00:00:00:01")
    b = create_cluster(alice, "b", "52:54:00:00:00:02")
    start = feed(alice)["last"]
    changed, release = threading.Event(), threading.Event()

    def slow_change():
        try:
            with transaction.atomic():
                VirtualCluster.objects.filter(pk=a).update(state=ClusterState.UPDATING)
                changed.set()
                assert release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=slow_change)
    thread.start()
    assert changed.wait(10)
    VirtualCluster.objects.filter(pk=b).update(state=ClusterState.UPDATING)  # commits at once
    seen = feed(alice, after=start)
    assert [(e["cluster"], e["state"]) for e in seen["events"]] == [(b, "updating")]
    release.set()
    thread.join()
    later = feed(alice, after=seen["last"])
    assert [(e["cluster"], e["state"]) for e in later["events"]] == [(a, "updating")]


def _waiting_feed(user, cid: int, **change) -> tuple[dict, float]:
    """A long poll of ``user``'s feed after its last event, while another connection updates cluster ``cid`` with
    ``change`` 0.3 s in: (the page, how long it waited)."""
    last = feed(user)["last"]

    def update():
        try:
            time.sleep(0.3)
            VirtualCluster.objects.filter(pk=cid).update(**change)
        finally:
            connections.close_all()

    thread = threading.Thread(target=update)
    thread.start()
    started = time.monotonic()
    page = feed(user, after=last, timeout=20)
    thread.join()
    return page, time.monotonic() - started


def test_an_empty_feed_waits_for_the_next_event(fabric, alice):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    page, waited = _waiting_feed(alice, cid, state=ClusterState.UPDATING)
    assert [e["state"] for e in page["events"]] == ["updating"]
    assert waited < 10  # woken by the change (polled on SQLite), not by the timeout
    started = time.monotonic()
    assert feed(alice, after=page["last"], timeout=0.3)["events"] == []
    assert time.monotonic() - started >= 0.3


def test_an_extension_wakes_a_waiting_feed(fabric, alice):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    page, waited = _waiting_feed(alice, cid, expires_at=F("expires_at") + timedelta(hours=1))
    assert [e["kind"] for e in page["events"]] == ["lifetime"]
    assert waited < 10  # woken by the trigger's NOTIFY, not by the timeout


def test_old_events_are_pruned(fabric, alice, settings):
    from clusters.tasks import prune_events

    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    settings.CLUSTER_EVENT_RETENTION = 30
    ClusterEvent.objects.filter(cluster_id=cid, state="requested").update(at=timezone.now() - timedelta(days=31))
    assert prune_events() == 1
    assert [e.state for e in ClusterEvent.objects.filter(cluster_id=cid)] == ["provisioning", "ready"]


def test_old_idempotency_keys_of_ended_clusters_are_pruned(fabric, alice, settings):
    from clusters import services
    from clusters.models import IdempotencyKey
    from clusters.tasks import prune_events

    settings.CLUSTER_EVENT_RETENTION = 30
    ended, live = create_cluster(alice, "c1", "52:54:00:00:00:01"), create_cluster(alice, "c2", "52:54:00:00:00:02")
    lately = create_cluster(alice, "c3", "52:54:00:00:00:03")
    for cid in (ended, lately):
        services.cluster_teardown(cluster=VirtualCluster.objects.get(pk=cid), reason="test")
    for cid, key in ((ended, "ended-long-ago"), (live, "live"), (lately, "ended-lately")):
        IdempotencyKey.objects.create(actor="pbs", key=key, request_hash="h", cluster_id=cid)
    long_ago = timezone.now() - timedelta(days=31)
    IdempotencyKey.objects.update(created_at=long_ago)  # all made long ago: a cluster may live for months
    VirtualCluster.objects.filter(pk=ended).update(ended_at=long_ago)
    prune_events()
    # by when the cluster ended, not when the key was made: a retry may come until then
    assert set(IdempotencyKey.objects.values_list("key", flat=True)) == {"live", "ended-lately"}


def test_the_steps_of_clusters_that_ended_long_ago_are_pruned(fabric, alice, settings):
    """A cluster's steps are its progress: once it ended HISTORY_RETENTION days ago nobody reads them (they were
    kept for good, a few rows per device and workflow); a live cluster's and a recently ended one's stay."""
    from clusters import services
    from clusters.models import ClusterStep
    from clusters.tasks import prune_events

    settings.HISTORY_RETENTION = 90
    old, recent, live = (create_cluster(alice, f"c{i}", f"52:54:00:00:00:0{i}") for i in (1, 2, 3))
    for cid in (old, recent):
        services.cluster_teardown(cluster=VirtualCluster.objects.get(pk=cid), reason="test")
    VirtualCluster.objects.filter(pk=old).update(ended_at=timezone.now() - timedelta(days=91))
    VirtualCluster.objects.filter(pk=live).update(ended_at=timezone.now() - timedelta(days=91))  # (never mind: live)
    steps = {cid: ClusterStep.objects.filter(cluster_id=cid).count() for cid in (old, recent, live)}
    assert all(steps.values())
    prune_events()
    assert {cid: ClusterStep.objects.filter(cluster_id=cid).count() for cid in (old, recent, live)} == {
        old: 0,
        recent: steps[recent],
        live: steps[live],
    }
