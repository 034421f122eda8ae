"""``GET /api/clusters/{id}/wait/``: a long poll that answers when the cluster reaches a state. On PostgreSQL
it is woken by the state-change notification (trigger + LISTEN), elsewhere it polls (``portal.notify``).
The real-worker test (create → wait → READY) is in test_workflow_worker.py."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from clusters.models import ClusterState, VirtualCluster
from clusters.tests.helpers import client_for, create_cluster
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal import notify

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(fabric, alice):
    """A READY cluster (provisioned eagerly on the fake fabric)."""
    c = VirtualCluster.objects.get(pk=create_cluster(alice))
    assert c.state == ClusterState.READY, c.state_reason
    return c


@pytest.fixture
def api(alice):
    return client_for(alice)


def _set_state_later(cluster_id: int, state: str, delay: float) -> threading.Thread:
    """Another connection changes the state after ``delay`` s and commits (as a worker would)."""

    def run():
        try:
            time.sleep(delay)
            VirtualCluster.objects.filter(pk=cluster_id).update(state=state)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _state_checks(queries) -> int:
    return sum(1 for q in queries if q["sql"].startswith('SELECT "clusters_virtualcluster"."state"'))


def test_a_settled_cluster_answers_at_once(cluster, api):
    r = api.get(f"/api/clusters/{cluster.pk}/wait/")
    assert r.status_code == 200
    assert r.data["state"] == "ready" and r.data["id"] == cluster.pk


def test_the_state_change_wakes_the_waiter(cluster, api):
    if connection.vendor != "postgresql":
        pytest.skip("notifications need PostgreSQL")
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.PROVISIONING)
    other = VirtualCluster.objects.create(
        name="other", owner=cluster.owner, image=cluster.image, expires_at=cluster.expires_at
    )
    changer = _set_state_later(cluster.pk, ClusterState.READY, 0.3)
    noise = _set_state_later(other.pk, ClusterState.FAILED, 0.1)  # another cluster's change: not ours
    started = time.monotonic()
    with CaptureQueriesContext(connection) as ctx:
        r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=ready&timeout=20")
    waited = time.monotonic() - started
    changer.join()
    noise.join()
    assert r.status_code == 200 and r.data["state"] == "ready"
    assert waited < 10, f"woken by the timeout ({waited:.1f} s), not by the notification"
    # one check before sleeping, one after our cluster's notification (the other cluster's did not query);
    # the final read of the answer is the serializer's own query
    assert _state_checks(ctx.captured_queries) == 2, [q["sql"] for q in ctx.captured_queries]
    assert any(q["sql"].startswith("LISTEN") for q in ctx.captured_queries)
    assert any(q["sql"].startswith("UNLISTEN") for q in ctx.captured_queries)


def test_the_timeout_answers_with_the_current_state(cluster, api):
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.PROVISIONING)
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=ready,failed&timeout=0.3")
    assert time.monotonic() - started >= 0.3
    assert r.status_code == 200 and r.data["state"] == "provisioning"
    # the connection no longer listens: a later state change is not queued for whoever uses it next
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_listening_channels()")
            assert cursor.fetchone()[0] == 0


def test_a_cluster_deleted_while_waiting_is_404(cluster, api):
    """An admin deletes the cluster (Django admin) while a scheduler waits: a clear 404, not a 500."""
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.PROVISIONING)
    from clusters.models import ClusterStep, IdempotencyKey, Node

    def delete_later():
        try:
            time.sleep(0.3)
            IdempotencyKey.objects.filter(cluster_id=cluster.pk).delete()
            ClusterStep.objects.filter(cluster_id=cluster.pk).delete()
            Node.objects.filter(cluster_id=cluster.pk).delete()
            VirtualCluster.objects.filter(pk=cluster.pk).delete()
        finally:
            connections.close_all()

    thread = threading.Thread(target=delete_later)
    thread.start()
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=ready&timeout=20")
    thread.join()
    assert r.status_code == 404, r.content
    if connection.vendor == "postgresql":
        assert time.monotonic() - started < 10  # woken by the deletion's notification, not the timeout


def test_waiting_for_a_state_it_has_answers_at_once(cluster, api):
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=failed, ready&timeout=20")
    assert r.status_code == 200 and r.data["state"] == "ready"


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("until=bogus", "until", "unknown state bogus"),
        ("until=ready,nope", "until", "unknown state nope"),
        ("until=,", "until", "(none given)"),
        ("timeout=-1", "timeout", "greater than or equal to 0"),
        ("timeout=1000", "timeout", "less than or equal to"),
        ("timeout=soon", "timeout", "valid number"),
        ("timeout=nan", "timeout", "valid number"),
    ],
)
def test_bad_queries_are_400_with_the_field(cluster, api, query, field, message):
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?{query}")
    assert r.status_code == 400, r.content
    assert message in str(r.data[field]), r.data
    assert time.monotonic() - started < 5  # refused before any waiting


def test_someone_elses_cluster_is_404(cluster, charlie):
    api = APIClient()
    api.force_authenticate(charlie)
    assert api.get(f"/api/clusters/{cluster.pk}/wait/?timeout=0").status_code == 404
    assert api.get("/api/clusters/999999/wait/?timeout=0").status_code == 404
    assert APIClient().get(f"/api/clusters/{cluster.pk}/wait/").status_code in (401, 403)


@pytest.mark.django_db(transaction=False)
def test_inside_a_transaction_it_polls():
    """A LISTEN takes effect only at commit: inside a transaction (and on SQLite) the check is polled."""
    assert connection.in_atomic_block
    answers = iter([None, None, "ready"])
    calls = []

    def check():
        calls.append(time.monotonic())
        return next(answers)

    assert notify.wait_for(check, channel="c", payload="1", timeout=10) == "ready"
    assert len(calls) == 3
    assert all(b - a >= notify.POLL_INTERVAL * 0.9 for a, b in zip(calls, calls[1:], strict=False))
    started = time.monotonic()
    assert notify.wait_for(lambda: None, channel="c", payload="1", timeout=0.25) is None
    assert time.monotonic() - started >= 0.25


def test_a_member_who_leaves_the_group_while_waiting_gets_a_404(fabric, alice, bob, team):
    """bob (alice's group) waits for her cluster; the directory takes him out of the group meanwhile: the
    answer is the 404 he would get now, not a 500."""
    cluster = VirtualCluster.objects.get(pk=create_cluster(alice, group=team.name))
    leave = threading.Timer(0.3, lambda: (bob.groups.remove(team), connections.close_all()))
    leave.start()
    r = client_for(bob).get(f"/api/clusters/{cluster.pk}/wait/?until=torn_down&timeout=1.5")
    leave.join()
    assert r.status_code == 404, r.content


def test_long_polls_past_the_process_slots_answer_at_once(cluster, alice, bob, settings):
    """LONG_POLL_SLOTS=3: each waiting long poll holds a thread and a database connection. Alice's first two
    wait; her third — a wait or the event feed — answers at once with what there is now and Retry-After: 1, for
    the last free slot is kept for a caller that waits nowhere else yet: Bob's long poll gets it. So one caller
    with many long polls open never takes every thread of a web process (a create or a teardown always finds
    one), nor every slot; once a slot is free again, Alice's long poll waits again."""
    settings.LONG_POLL_SLOTS = 3
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.PROVISIONING)
    answers = []

    def hold():
        try:
            answers.append(client_for(alice).get(f"/api/clusters/{cluster.pk}/wait/?until=ready&timeout=20").data)
        finally:
            connections.close_all()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 10
    while notify.slots_in_use() < 2 and time.monotonic() < deadline:  # both hold their slot
        time.sleep(0.02)
    api = client_for(alice)
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=ready&timeout=20")
    assert r.status_code == 200 and r.data["state"] == "provisioning"
    assert r["Retry-After"] == "1"  # ask again in a second, not at once
    last = api.get("/api/clusters/events/", {"after": 0}).data["last"]
    page = api.get("/api/clusters/events/", {"after": last, "timeout": 20})
    assert page.status_code == 200 and page.data["events"] == [] and page["Retry-After"] == "1"
    assert time.monotonic() - started < 5  # both at once, not after their 20 s

    started = time.monotonic()
    page = client_for(bob).get("/api/clusters/events/", {"after": last, "timeout": 0.5})  # the last slot: Bob's
    assert page.status_code == 200 and "Retry-After" not in page and time.monotonic() - started >= 0.5

    _set_state_later(cluster.pk, ClusterState.READY, 0.2).join()
    for t in holders:
        t.join(20)
    assert [a["state"] for a in answers] == ["ready", "ready"]  # the holders were woken by the change
    assert notify.slots_in_use() == 0
    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.PROVISIONING)
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cluster.pk}/wait/?until=ready&timeout=0.5")
    assert r.data["state"] == "provisioning" and "Retry-After" not in r
    assert time.monotonic() - started >= 0.5  # a slot is free again: it waited
