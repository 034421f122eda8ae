"""Node changes that go wrong or overlap: a failed add, a failed migration, a host under maintenance, two
removals at once."""
# ruff: noqa: F811 (pytest fixtures imported from test_api are parameters here)

from __future__ import annotations

import threading

import pytest
from django.db import connection

from clusters import services
from clusters.models import ClusterState, Node, NodeState, VirtualCluster
from clusters.tests.test_api import api, body, errbacks_run, images  # noqa: F401 - fixtures
from network.models import Host
from network.tests.fakefabric import fabric_fixture  # noqa: F401


def _cluster(api, alice) -> int:
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(), format="json")
    assert r.status_code == 201, r.content
    return r.data["id"]


def _fail(fabric, host: str) -> None:
    Host.objects.filter(name=host).update(driver_args={**fabric.args, "fail_commit": "permanent"})


@pytest.mark.django_db(transaction=True)
def test_a_node_whose_network_could_not_be_made_stays_pending(fabric, images, api, alice, errbacks_run):
    cid = _cluster(api, alice)
    _fail(fabric, "prague1")
    node = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:33"}
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    assert cluster.nodes.get(name="n3").state == NodeState.PENDING  # it was reported "ready"
    assert cluster.steps.get(name="nodes.add").status == "failed"

    # asked for again as it is, once the host works: not added twice, the network converges for it this time
    Host.objects.filter(name="prague1").update(driver_args=fabric.args)
    other = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:34"}  # (another MAC: another node)
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [other]}, format="json")
    assert r.status_code == 400 and "n3 already exists" in str(r.data)
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json")
    assert r.status_code == 202, r.content
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY and cluster.nodes.filter(name="n3").count() == 1
    assert cluster.nodes.get(name="n3").state == NodeState.READY
    assert cluster.vlan_id in fabric.host_vlans("prague1")
    assert [s.detail for s in cluster.steps.filter(name="nodes.add").order_by("pk")][-1] == "n3@prague1 (again)"


@pytest.mark.django_db(transaction=True)
def test_a_node_change_the_deadline_ended_that_converges_late_makes_its_nodes_ready(fabric, images, api, alice):
    """A node change slower than ``CLUSTER_PROVISION_TIMEOUT`` (an agent's queue lagging) is failed by the
    deadline: the cluster READY, the new node PENDING. When its convergence then succeeds after all, the node's
    network is there: it becomes READY (the step stays failed, with why); a later change's generation is not
    touched by an older one's late success."""
    from datetime import timedelta

    from celery.canvas import _chain
    from django.utils import timezone

    from clusters import tasks

    cid = _cluster(api, alice)
    sent = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_chain, "apply_async", lambda self, *a, **k: sent.append(self))
        node = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:33"}
        assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    generation = VirtualCluster.objects.get(pk=cid).workflow_generation
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(hours=1))
    services.clusters_end_stalled_workflows()
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY and cluster.nodes.get(name="n3").state == NodeState.PENDING
    step = cluster.steps.get(name="nodes.add")
    assert step.status == "failed"

    sent[0].apply()  # the lagging queue gets to it at last: it converges, and says so
    assert cluster.nodes.get(name="n3").state == NodeState.READY
    assert cluster.steps.get(pk=step.pk).status == "failed"

    # an older change's late success leaves a newer change's pending node alone
    Node.objects.filter(cluster_id=cid, name="n3").update(state=NodeState.PENDING)
    VirtualCluster.objects.filter(pk=cid).update(workflow_generation=generation + 1)
    tasks.update_done(cid, generation, step.pk)
    assert cluster.nodes.get(name="n3").state == NodeState.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_migration_whose_preparation_failed_is_given_up(fabric, images, api, alice, errbacks_run):
    """The node stays where it runs (READY, no target: it may migrate again), and the target leaves the
    cluster's network: its site switch no longer carries the VLAN."""
    from clusters.models import ClusterEvent

    cid = _cluster(api, alice)
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    _fail(fabric, "prague1")
    n2 = Node.objects.get(cluster_id=cid, name="n2")
    before = ClusterEvent.objects.filter(cluster_id=cid).order_by("-id").values_list("id", flat=True).first()
    r = api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague1"}, format="json")
    assert r.status_code == 202, r.content
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    # the feed: updating until the target has left, then ready once — never a "ready" between the failed
    # preparation and the abort (a scheduler moved the VM on it)
    states = list(
        ClusterEvent.objects.filter(cluster_id=cid, id__gt=before).order_by("id").values_list("state", flat=True)
    )
    assert states.count("ready") == 1 and states[-1] == "ready", states
    n2.refresh_from_db()
    assert (n2.state, n2.target_host_id, n2.host.name) == (NodeState.READY, None, "pilsen1")
    steps = dict(cluster.steps.values_list("name", "status"))
    # prague1 refused the VLAN: taking it off again changes nothing there (and fails nothing)
    assert steps["migrate.prepare"] == "failed" and steps["migrate.abort"] == "ok"
    assert vid not in fabric.switch_ports("sw-prague")["h1"] and vid not in fabric.switch_ports("sw-prague")["uplink"]
    Host.objects.filter(name="prague1").update(driver_args=fabric.args)  # repaired: it may migrate again
    r = api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague1"}, format="json")
    assert r.status_code == 202 and Node.objects.get(pk=n2.pk).state == NodeState.MIGRATING


@pytest.mark.django_db(transaction=True)
def test_a_host_under_maintenance_keeps_its_nodes_and_they_can_leave(fabric, images, api, alice):
    """A disabled host refused every change of a cluster with a node there — evacuating it too."""
    cid = _cluster(api, alice)
    Host.objects.filter(name="pilsen1").update(enabled=False)
    node = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:33"}
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    n2 = Node.objects.get(cluster_id=cid, name="n2")
    r = api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague2"}, format="json")
    assert r.status_code == 202, r.content
    assert api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrated/", {}, format="json").status_code == 202
    assert Node.objects.get(pk=n2.pk).host.name == "prague2"
    node = {"name": "n4", "host": "pilsen2", "mac": "52:54:00:00:00:34"}  # a new node on it is still refused?
    Host.objects.filter(name="pilsen2").update(enabled=False)
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json")
    assert r.status_code == 422 and "pilsen2 is disabled" in str(r.data)


@pytest.mark.django_db(transaction=True)
def test_two_removals_at_once_never_leave_a_cluster_without_nodes(fabric, images, api, alice, monkeypatch):
    """Removal B counted two live nodes, then waited; removal A ran whole. B must not go on to remove the
    last node: the cluster row is locked from the check to the claim, so A waits for B instead, and then
    finds the last node."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    cid = _cluster(api, alice)
    n1, n2 = Node.objects.get(cluster_id=cid, name="n1"), Node.objects.get(cluster_id=cid, name="n2")
    checked, a_done = threading.Event(), threading.Event()
    real = services._reconverge
    outcome = {}

    def reconverge(cluster, step, detail):
        if threading.current_thread().name == "B":
            checked.set()
            a_done.wait(1.5)  # A would run whole here without the lock
        return real(cluster, step, detail)

    def remove_b():
        try:
            services.cluster_node_remove(cluster=VirtualCluster.objects.get(pk=cid), node=Node.objects.get(pk=n2.pk))
            outcome["b"] = "removed"
        except services.Conflict as exc:
            outcome["b"] = str(exc)
        finally:
            connection.close()

    monkeypatch.setattr(services, "_reconverge", reconverge)
    b = threading.Thread(target=remove_b, name="B")
    b.start()
    assert checked.wait(10)
    r = api.delete(f"/api/clusters/{cid}/nodes/{n1.pk}/")
    a_done.set()
    b.join(20)
    live = list(Node.objects.filter(cluster_id=cid).exclude(state=NodeState.REMOVED).values_list("name", flat=True))
    assert len(live) == 1, (r.status_code, outcome, live)
    assert sorted([r.status_code, 202 if outcome["b"] == "removed" else 409]) == [202, 409]


@pytest.mark.django_db(transaction=True)
def test_public_subnets_never_overlap_and_every_prefix_is_used(fabric, images, api, alice):
    """Free means overlapping no live cluster's subnet from any prefix: a prefix whose subnet length was
    changed, or a second prefix over the first, handed out a subnet containing another cluster's; and a
    full first prefix made every public cluster a 409 while the next had room."""
    from clusters.models import PublicPrefix

    def public(name: str, mac: str) -> str:
        r = api.post("/api/clusters/", body(name=name, image="debian-12", nodes=[("m", "brno2", mac)]), format="json")
        assert r.status_code == 201, r.content
        return r.data["public_subnet"]

    api.force_authenticate(alice)
    prefix = PublicPrefix.objects.create(name="b-provider", prefix="198.19.0.0/26", subnet_length=28)
    assert public("c1", "52:54:00:00:07:01") == "198.19.0.0/28"
    PublicPrefix.objects.filter(pk=prefix.pk).update(subnet_length=27)  # edited while c1 lives
    assert public("c2", "52:54:00:00:07:02") == "198.19.0.32/27"  # not 198.19.0.0/27, which holds c1's
    PublicPrefix.objects.create(name="a-overlap", prefix="198.19.0.0/25", subnet_length=28)  # sorts first
    assert public("c3", "52:54:00:00:07:03") == "198.19.0.16/28"  # not c1's again
    PublicPrefix.objects.filter(name="a-overlap").update(prefix="198.19.0.0/28")  # full (c1)
    PublicPrefix.objects.create(name="c-more", prefix="198.19.1.0/28", subnet_length=28)
    assert public("c4", "52:54:00:00:07:04") == "198.19.1.0/28"  # the next prefix with room
    c5 = body(name="c5", image="debian-12", nodes=[("m", "brno2", "52:54:00:00:07:05")])
    r = api.post("/api/clusters/", c5, format="json")
    assert r.status_code == 409 and "no free subnet left" in str(r.data)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("disabled", ["host", "switch"])
def test_a_pending_node_on_a_host_disabled_since_is_neither_made_ready_nor_retried(
    fabric, images, api, alice, errbacks_run, disabled
):
    """n3's add failed on prague1 (PENDING); prague1, or the switch in front of it, is then disabled for repair.
    An unrelated change of the cluster that converges made n3 READY with it (a disabled device is never touched:
    n3 had no network), and n3 asked for again was a 202 that did the same: now n3 stays PENDING, and asking for
    it again is a 422 until the device is enabled (then it converges)."""
    from network.models import Switch

    cid = _cluster(api, alice)
    _fail(fabric, "prague1")
    n3 = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:33"}
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n3]}, format="json").status_code == 202
    switch = Host.objects.get(name="prague1").switch_port.switch
    device = Switch.objects.filter(pk=switch.pk) if disabled == "switch" else Host.objects.filter(name="prague1")
    Host.objects.filter(name="prague1").update(driver_args=fabric.args)
    device.update(enabled=False)
    n4 = {"name": "n4", "host": "brno2", "mac": "52:54:00:00:00:34"}
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n4]}, format="json").status_code == 202
    states = dict(Node.objects.filter(cluster_id=cid).values_list("name", "state"))
    assert (states["n3"], states["n4"]) == (NodeState.PENDING, NodeState.READY)
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n3]}, format="json")
    refusal = "prague1 is disabled" if disabled == "host" else f"prague1: its switch {switch.name} is disabled"
    assert r.status_code == 422 and refusal in str(r.data["nodes"]), r.data
    device.update(enabled=True)
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n3]}, format="json").status_code == 202
    assert Node.objects.get(cluster_id=cid, name="n3").state == NodeState.READY
    assert VirtualCluster.objects.get(pk=cid).vlan_id in fabric.host_vlans("prague1")


@pytest.mark.django_db(transaction=True)
def test_a_migrating_node_is_not_removed_and_an_expired_cluster_takes_no_change(fabric, images, api, alice):
    """Removing a node whose VM may be on its way took the network from both hosts under it: a 409 until its
    migration is completed or cancelled. A cluster past its expiry (the sweep tears it down within a minute)
    takes no node change: a 409, not a 202 whose work the teardown undoes."""
    from datetime import timedelta

    from django.utils import timezone

    cid = _cluster(api, alice)
    n2 = Node.objects.get(cluster_id=cid, name="n2")
    # (a migration the network refuses — a site its core does not join — names the request's field, target_host)
    fabric.core.sites.remove(fabric.sites["prague"])
    migrate = f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/"
    r = api.post(migrate, {"target_host": "prague2"}, format="json")
    assert r.status_code == 422 and "target_host" in r.data and "nodes" not in r.data, r.data
    fabric.core.sites.add(fabric.sites["prague"])
    assert api.post(migrate, {"target_host": "prague2"}, format="json").status_code == 202
    r = api.delete(f"/api/clusters/{cid}/nodes/{n2.pk}/")
    assert r.status_code == 409 and "n2 is migrating" in r.data["detail"]
    assert Node.objects.get(pk=n2.pk).state == NodeState.MIGRATING
    assert api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrated/", {}, format="json").status_code == 202
    assert api.delete(f"/api/clusters/{cid}/nodes/{n2.pk}/").status_code in (202, 204)

    VirtualCluster.objects.filter(pk=cid).update(expires_at=timezone.now() - timedelta(seconds=1))
    n5 = {"name": "n5", "host": "brno2", "mac": "52:54:00:00:00:35"}
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [n5]}, format="json")
    assert r.status_code == 409 and "has expired" in r.data["detail"]
    assert not Node.objects.filter(cluster_id=cid, name="n5").exists()


@pytest.mark.django_db(transaction=True)
def test_a_duplicate_rollback_message_leaves_the_cluster_to_the_rollback_that_runs(fabric, images, api, alice):
    """A rollback's message redelivered after the rollback was sent (or an errback Celery called twice) finds it
    running and hands on at once: its follow-up ended the cluster then — FAILED, compensate "ok", nothing said of
    a VLAN the rollback would keep — and the real rollback's own follow-up found it ended. Now the follow-up
    leaves a cluster whose rollback runs; the rollback's own ends it, with what it kept."""
    from clusters import tasks
    from network.models import Segment

    cid = _cluster(api, alice)
    cluster = VirtualCluster.objects.get(pk=cid)
    Segment.objects.filter(pk=cluster.segment_id).update(state=Segment.State.COMPENSATING)
    tasks.failed(cid, cluster.workflow_generation, "prague1: refused")
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    Segment.objects.filter(pk=cluster.segment_id).update(state=Segment.State.FAILED, error="x")
    tasks.failed(cid, cluster.workflow_generation, "prague1: refused")
    ended = VirtualCluster.objects.get(pk=cid)
    assert ended.state == ClusterState.FAILED and ended.state_reason.startswith("prague1: refused; rollback incomplete")
