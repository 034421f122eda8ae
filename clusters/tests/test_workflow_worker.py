"""Cluster workflows through a real Celery worker on Redis (not eager): create, teardown, expiry,
failure + compensation, migration. Devices are the fake fabric (state files shared with the worker)."""
# ruff: noqa: F401, F811 (the pytest fixture fabric is imported from clusters.tests.helpers)

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from clusters.models import ClusterState, Node, VirtualCluster
from clusters.tests.helpers import fabric, wait_state
from network.models import VlanAllocation

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def api(alice):
    client = APIClient()
    client.force_authenticate(alice)
    return client


def create(api, name="c1", nodes=(("n1", "brno1", "52:54:00:00:00:01"), ("n2", "prague1", "52:54:00:00:00:02"))):
    r = api.post(
        "/api/clusters/",
        {
            "name": name,
            "image": "my-own",
            "lifetime": 3600,
            "nodes": [{"name": n, "host": h, "mac": m} for n, h, m in nodes],
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    return r.data["id"]


def test_create_and_teardown(fabric, celery_worker, api):
    started = time.monotonic()
    cid = create(api)
    cluster = wait_state(cid, ClusterState.READY, ClusterState.FAILED)
    elapsed = time.monotonic() - started
    assert cluster.state == ClusterState.READY, cluster.state_reason
    vid = cluster.vlan_id
    assert vid in fabric.host_vlans("brno1") and vid in fabric.host_vlans("prague1")
    assert vid in fabric.switch_ports("sw-prague")["uplink"]
    assert elapsed < 30

    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    wait_state(cid, ClusterState.TORN_DOWN)
    assert all(vid not in fabric.host_vlans(h) for h in fabric.hosts)
    assert all(vid not in v for s in fabric.switches for v in fabric.switch_ports(f"sw-{s}").values())
    assert VlanAllocation.objects.get(vid=vid).state == "quarantined"


def test_a_scheduler_waits_with_one_request_per_transition(fabric, celery_worker, api):
    """POST, then one long poll that answers when the worker has made the cluster READY (woken by the state
    notification the worker's commit sends); the same for the teardown."""
    cid = create(api)
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cid}/wait/?until=ready,failed&timeout=20")
    assert r.status_code == 200 and r.data["state"] == "ready", r.data
    assert time.monotonic() - started < 10  # woken by the worker's commit, not by the timeout
    assert r.data["progress"] == {"percent": 100, "current": None}  # READY and its last step: one commit
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    started = time.monotonic()
    r = api.get(f"/api/clusters/{cid}/wait/?timeout=20")  # default: until settled
    assert r.status_code == 200 and r.data["state"] == "torn_down", r.data
    assert time.monotonic() - started < 10


def test_expiry_found_by_the_periodic_task(fabric, celery_worker, api):
    from clusters.tasks import expire

    cid = create(api)
    wait_state(cid, ClusterState.READY)
    VirtualCluster.objects.filter(pk=cid).update(expires_at=timezone.now() - timedelta(seconds=1))
    expire.delay().get(timeout=60)
    cluster = wait_state(cid, ClusterState.TORN_DOWN)
    assert "expired" in cluster.state_reason
    from portal.models import PeriodicRun  # the worker recorded the run (its age is a metric)

    deadline = time.monotonic() + 10  # (recorded just after the result is stored)
    while not PeriodicRun.objects.filter(task="clusters.expire", last_success_at__isnull=False).exists():
        assert time.monotonic() < deadline, "the worker did not record the periodic run"
        time.sleep(0.05)


@pytest.mark.parametrize("failing", ["sw-brno", "sw-prague", "brno1"])
def test_failure_compensates_every_device_and_releases_the_vlan(fabric, celery_worker, api, failing):
    before = {s: fabric.switch_ports(f"sw-{s}") for s in fabric.switches}
    if failing.startswith("sw-"):
        fabric.set_switch_args(failing, fail_commit="permanent")
    else:
        from network.models import Host

        Host.objects.filter(name=failing).update(
            driver_args={"state_dir": fabric.state_dir, "fail_commit": "permanent"}
        )
    cid = create(api)
    cluster = wait_state(cid, ClusterState.FAILED, ClusterState.READY)
    assert cluster.state == ClusterState.FAILED
    # the device and the device's own message, not a wrapper's repr (a chord's ChordError)
    message = "ip link add br-v: Operation not permitted" if failing == "brno1" else "commit_config: % Invalid"
    assert cluster.state_reason.startswith(f"{failing}: {message}"), cluster.state_reason
    network_step = cluster.steps.get(name="network")
    assert network_step.error.startswith(f"{failing}: "), network_step.error
    assert not VlanAllocation.objects.filter(state="allocated").exists()
    for site, ports in before.items():
        now = fabric.switch_ports(f"sw-{site}")
        assert {p: v for p, v in now.items() if v} == {p: v for p, v in ports.items() if v}
    assert all(cluster.vlan_id not in fabric.host_vlans(h) for h in fabric.hosts if h != failing)
    steps = {s.name: s for s in cluster.steps.all()}
    assert steps["compensate"].status == "ok"


def test_a_rollback_that_keeps_the_vlan_says_so(fabric, celery_worker, api):
    """A device that took the VLAN and cannot be converged back (here: disabled meanwhile, so never touched)
    keeps it allocated: the compensate step fails with what kept it, and the cluster's reason says so — not
    "ok" beside a VLAN that is still allocated."""
    from network.models import DeviceChange, Host, Switch

    Host.objects.filter(name="prague1").update(
        driver_args={"state_dir": fabric.state_dir, "fail_commit": "permanent", "delay": 2}
    )
    cid = create(api)
    deadline = time.monotonic() + 20
    while not DeviceChange.objects.filter(switch__name="sw-brno", status="ok").exists():
        assert time.monotonic() < deadline, "sw-brno never took the VLAN"
        time.sleep(0.02)
    Switch.objects.filter(name="sw-brno").update(enabled=False)  # while prague1 is still failing
    cluster = wait_state(cid, ClusterState.FAILED, ClusterState.READY)
    assert cluster.state == ClusterState.FAILED
    kept = f"rollback incomplete, VLAN {cluster.vlan_id} kept: switch sw-brno: disabled, not touched"
    assert cluster.state_reason.startswith("prague1: ip link add br-v: Operation not permitted; " + kept)
    compensate = cluster.steps.get(name="compensate")
    assert compensate.status == "failed" and compensate.error.startswith(kept)
    assert VlanAllocation.objects.get(vid=cluster.vlan_id).state == "allocated"


def _prepared_migration(fabric, api) -> tuple[int, int, Node]:
    """A ready cluster whose node n2 (on prague1) is prepared to move to pilsen2: (cluster id, VLAN, node)."""
    cid = create(api)
    vid = wait_state(cid, ClusterState.READY).vlan_id
    node = Node.objects.get(cluster_id=cid, name="n2")
    r = api.post(f"/api/clusters/{cid}/nodes/{node.pk}/migrate/", {"target_host": "pilsen2"}, format="json")
    assert r.status_code == 202
    wait_state(cid, ClusterState.READY)
    assert vid in fabric.host_vlans("pilsen2") and vid in fabric.host_vlans("prague1")
    return cid, vid, node


def _wait_vlan_gone(fabric, host: str, vid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while vid in fabric.host_vlans(host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vid not in fabric.host_vlans(host)


def test_migration_prepares_target_then_cleans_source(fabric, celery_worker, api):
    cid, vid, node = _prepared_migration(fabric, api)
    assert api.post(f"/api/clusters/{cid}/nodes/{node.pk}/migrated/", {}, format="json").status_code == 202
    wait_state(cid, ClusterState.READY)
    _wait_vlan_gone(fabric, "prague1", vid)
    assert vid in fabric.host_vlans("pilsen2")


def test_a_migration_called_off_cleans_the_target(fabric, celery_worker, api):
    cid, vid, node = _prepared_migration(fabric, api)
    r = api.post(f"/api/clusters/{cid}/nodes/{node.pk}/migrate/cancel/", {}, format="json")
    assert r.status_code == 202, r.content
    wait_state(cid, ClusterState.READY)
    _wait_vlan_gone(fabric, "pilsen2", vid)
    assert vid in fabric.host_vlans("prague1")
    node.refresh_from_db()
    assert (node.host.name, node.target_host, node.state) == ("prague1", None, "ready")


def test_worker_killed_mid_provisioning_finishes_after_restart(fabric, celery_worker, api):
    # slow devices so that the kill lands while convergence runs
    for name in fabric.switches:
        fabric.set_switch_args(f"sw-{name}", delay=1.0)
    cid = create(api)
    time.sleep(0.6)
    celery_worker.kill()
    assert VirtualCluster.objects.get(pk=cid).state != ClusterState.READY
    celery_worker.start()
    try:
        cluster = wait_state(cid, ClusterState.READY, ClusterState.FAILED, timeout=60)
    except AssertionError:
        print(celery_worker.log())
        raise
    assert cluster.state == ClusterState.READY, cluster.state_reason
    assert cluster.vlan_id in fabric.host_vlans("brno1")
