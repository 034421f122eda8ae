"""A cluster about to be torn down by its expiry says so first: an ``expiring`` event in the feed (and so to the
webhooks) ``CLUSTER_EXPIRY_WARNING`` before, once per expiry — again after an extension, nearer the new one."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from clusters import services, tasks
from clusters.models import ClusterEvent, EventKind, VirtualCluster
from clusters.tests.helpers import client_for, create_cluster
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def expiring(cluster_id: int) -> list[ClusterEvent]:
    return list(ClusterEvent.objects.filter(cluster_id=cluster_id, kind=EventKind.EXPIRING))


def test_an_expiring_event_once_per_expiry_in_the_feed(fabric, alice, settings):
    settings.CLUSTER_EXPIRY_WARNING = 3600
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    later = create_cluster(alice, "c2", "52:54:00:00:00:02")
    now = timezone.now()
    VirtualCluster.objects.filter(pk=cid).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=now + timedelta(minutes=30)
    )
    VirtualCluster.objects.filter(pk=later).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=now + timedelta(hours=5)
    )

    assert tasks.expire.apply().get() == []  # nothing torn down yet
    assert [e.state for e in expiring(cid)] == ["ready"] and expiring(later) == []
    tasks.expire.apply().get()
    assert len(expiring(cid)) == 1  # once for this expiry

    page = client_for(alice).get("/api/clusters/events/", {"cluster": cid}).data
    last = page["events"][-1]
    assert (last["kind"], last["state"], last["cluster"]) == ("expiring", "ready", cid)
    kinds = [e["kind"] for e in page["events"][:-1]]
    assert kinds == ["state"] * (len(kinds) - 1) + ["lifetime"]  # (the expiry moved near by hand above)

    # extended: warned again only when the new expiry comes near
    services.cluster_extend(cluster=VirtualCluster.objects.get(pk=cid), expires_at=now + timedelta(hours=3))
    services.clusters_warn_expiring()
    assert len(expiring(cid)) == 1
    VirtualCluster.objects.filter(pk=cid).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=now + timedelta(minutes=50)
    )
    services.clusters_warn_expiring()
    assert len(expiring(cid)) == 2


def test_a_cluster_shorter_than_twice_the_warning_is_warned_halfway_through_its_life(fabric, alice, settings):
    """A two-hour cluster (a batch job's) was within the day's warning from its creation: warned, and its owner
    mailed, within a minute of it, at every job. It is warned halfway through its lifetime instead."""
    settings.CLUSTER_EXPIRY_WARNING = 24 * 3600
    cid = create_cluster(alice, "job", "52:54:00:00:00:01")
    now = timezone.now()
    VirtualCluster.objects.filter(pk=cid).update(created_at=now, expires_at=now + timedelta(hours=2))
    assert services.clusters_warn_expiring() == [] and expiring(cid) == []
    VirtualCluster.objects.filter(pk=cid).update(created_at=now - timedelta(hours=2, minutes=1))  # past its half
    assert services.clusters_warn_expiring() == [cid] and len(expiring(cid)) == 1


def test_a_cluster_extended_while_the_warning_sweep_ran_is_not_warned_of_its_new_end(
    fabric, alice, settings, monkeypatch
):
    """Clusters are extended as their end nears: one extended between the sweep's read and its lock was warned (and
    its owner mailed) of an end a month away — and then never of that one. It is left for a later sweep."""
    import contextlib

    from django.db import transaction

    settings.CLUSTER_EXPIRY_WARNING = 3600
    cid = create_cluster(alice, "job", "52:54:00:00:00:01")
    now = timezone.now()
    VirtualCluster.objects.filter(pk=cid).update(
        created_at=now - timedelta(days=3), expires_at=now + timedelta(minutes=30)
    )
    atomic, extended = transaction.atomic, now + timedelta(days=30)

    @contextlib.contextmanager
    def extended_meanwhile(*args, **kwargs):  # (the owner's Extend commits just before the sweep's lock)
        monkeypatch.setattr(services.transaction, "atomic", atomic)
        VirtualCluster.objects.filter(pk=cid).update(expires_at=extended)
        with atomic(*args, **kwargs):
            yield

    monkeypatch.setattr(services.transaction, "atomic", extended_meanwhile)
    assert services.clusters_warn_expiring() == [] and expiring(cid) == []
    assert VirtualCluster.objects.get(pk=cid).expiry_warned_for is None


def test_a_sweep_that_fails_does_not_hold_back_the_others(fabric, alice, settings, monkeypatch, caplog):
    """The periodic task runs seven sweeps: one failing (a database hiccup, a bug) is logged and fails the task,
    after the others ran — a cluster past its lifetime is still torn down, a warning still goes out."""
    settings.CLUSTER_EXPIRY_WARNING = 3600
    gone = create_cluster(alice, "c1", "52:54:00:00:00:01")
    soon = create_cluster(alice, "c2", "52:54:00:00:00:02")
    now = timezone.now()
    VirtualCluster.objects.filter(pk=gone).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=now - timedelta(minutes=1)
    )
    VirtualCluster.objects.filter(pk=soon).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=now + timedelta(minutes=30)
    )
    ran = []

    def clusters_resume_requested():
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "clusters_resume_requested", clusters_resume_requested)
    monkeypatch.setattr(services, "clusters_retry_stuck_teardowns", lambda: ran.append("retry"))
    monkeypatch.setattr(services, "clusters_roll_back_abandoned_networks", lambda: ran.append("roll back"))
    with pytest.raises(RuntimeError, match="clusters_resume_requested failed"):
        tasks.expire.apply().get()
    assert ran == ["retry", "roll back"]
    assert VirtualCluster.objects.get(pk=gone).state in ("tearing_down", "torn_down")
    assert len(expiring(soon)) == 1
    assert "clusters.expire: clusters_resume_requested failed" in caplog.text and "database went away" in caplog.text


def test_no_warning_when_switched_off_or_for_a_cluster_that_ended(fabric, alice, settings):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    VirtualCluster.objects.filter(pk=cid).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=timezone.now() + timedelta(minutes=5)
    )
    settings.CLUSTER_EXPIRY_WARNING = 0
    assert services.clusters_warn_expiring() == []
    settings.CLUSTER_EXPIRY_WARNING = 3600
    assert client_for(alice).post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    assert services.clusters_warn_expiring() == []
    assert expiring(cid) == []


def test_a_nodes_attachment_carries_its_cores_mtu(fabric, alice):
    """A VXLAN core over a 1500-byte underlay: the VM manager gets the core's MTU with the node's attachment
    (and in the libvirt <interface>), read in the cluster's own query (no query per node)."""
    fabric.core.mtu = 1450
    fabric.core.save()
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    node = client_for(alice).get(f"/api/clusters/{cid}/").data["nodes"][0]
    assert node["attachment"]["mtu"] == 1450 and '<mtu size="1450" />' in node["attachment"]["libvirt"]
    fabric.core.mtu = None
    fabric.core.save()
    node = client_for(alice).get(f"/api/clusters/{cid}/").data["nodes"][0]
    assert node["attachment"]["mtu"] is None and "<mtu" not in node["attachment"]["libvirt"]


def test_the_warning_and_a_state_change_of_the_same_cluster_never_deadlock(fabric, alice, settings):
    """A state change holds the cluster's row from its UPDATE and takes the feed's lock at commit (the trigger);
    the warning takes them in the same order. The other order deadlocked: the sweep, holding the feed's lock,
    waited for the row while the change, holding the row, waited at commit for the feed's lock — PostgreSQL
    then aborted one of them (a teardown answered 500, a worker's READY failed)."""
    from django.db import connection, connections, transaction

    from clusters.models import ClusterState

    if connection.vendor != "postgresql":
        pytest.skip("concurrent transactions need PostgreSQL")
    settings.CLUSTER_EXPIRY_WARNING = 3600
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    VirtualCluster.objects.filter(pk=cid).update(
        created_at=timezone.now() - timedelta(days=3), expires_at=timezone.now() + timedelta(minutes=30)
    )
    changed, sweep_waits = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def change():  # as a teardown: the row changed, the commit a moment later
        try:
            with transaction.atomic():
                VirtualCluster.objects.filter(pk=cid).update(state=ClusterState.UPDATING)
                changed.set()
                sweep_waits.wait(5)
                time.sleep(0.3)  # the sweep is now blocked (on the row, or on the feed's lock)
            outcome["change"] = "committed"
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome["change"] = exc
        finally:
            connections.close_all()

    def sweep():
        try:
            assert changed.wait(5)
            sweep_waits.set()
            outcome["sweep"] = services.clusters_warn_expiring()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome["sweep"] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=change), threading.Thread(target=sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcome == {"change": "committed", "sweep": [cid]}
    kinds = list(ClusterEvent.objects.filter(cluster_id=cid).order_by("pk").values_list("kind", "state"))
    assert kinds[-2:] == [("state", "updating"), ("expiring", "updating")]  # the warning read the committed row
