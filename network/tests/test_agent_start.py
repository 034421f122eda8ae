"""A hypervisor that rebooted lost its Linux bridges (netlink's do not persist): its agent reconciles its hosts as
it starts, so the VMs brought back find their bridges at once, not a ``RECONCILE_INTERVAL`` later. A real agent
worker on Redis and PostgreSQL, on the fake fabric."""

from __future__ import annotations

import pytest

from network import services, workflows
from network.models import Drift, Host
from network.tests import fakes
from network.tests.fakefabric import build_fabric

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_agent_reconciles_its_hosts_when_it_starts(celery_worker, tmp_path, settings):
    from portal.testing_celery import WorkerProcess, wait_for

    fabric = build_fabric(tmp_path / "devices")
    Host.objects.filter(name="brno1").update(
        agent_queue="host.brno1", driver_args={**fabric.args, "reachable_from": "agent-brno1"}
    )
    env = {**celery_worker.env, "VIRTCLOUD_WORKER": "agent-brno1"}
    log = tmp_path / "agent.log"
    agent = WorkerProcess(env, log, queues=["host.brno1"], concurrency=2, name="agent-brno1")
    agent.start()
    try:
        hosts = [fabric.hosts["brno1"], fabric.hosts["pilsen1"]]
        seg = services.segment_create(owner="cluster:rebooted", hosts=hosts, gateway=False)
        assert workflows.provision(seg.pk).delay().get(timeout=60)["state"] == "active"
        assert fabric.host_vlans("brno1") == {seg.vid}
        assert "reconciling this agent's hosts at start: brno1" in log.read_text()
    finally:
        agent.stop()
    # The hypervisor reboots: its bridges are gone; the agent comes back with it. (Its first reconcile at start may
    # have found drift while the provisioning ran: the bridge coming back is what says this one ran.)
    state = fakes.load(fabric.args, "host", "brno1")
    fakes.save(fabric.args, "host", "brno1", {**state, "vlans": []})
    assert fabric.host_vlans("brno1") == frozenset()
    agent.start()
    try:
        wait_for(lambda: fabric.host_vlans("brno1") == {seg.vid}, 30, what="the agent's reconcile at start")
        repaired = Drift.objects.filter(device="brno1", kind=Drift.Kind.MISSING, repaired_at__isnull=False)
        wait_for(repaired.exists, 10, what="the repair recorded")
        assert Drift.objects.filter(device="pilsen1").count() == 0  # not this agent's host: untouched
    finally:
        agent.stop()


def test_the_reconcile_at_start_waits_for_the_database(monkeypatch, db):
    """A hypervisor boots before its network reaches the database: the task asks again instead of giving up until
    the next periodic reconcile."""
    from django.db import OperationalError

    from network import tasks

    calls = []

    def flaky(queues):
        calls.append(sorted(queues))
        if len(calls) < 3:
            raise OperationalError("could not connect to server")
        return ["brno1"]

    monkeypatch.setattr(tasks, "reconcile_agent_hosts", flaky)
    from celery.exceptions import Retry

    with pytest.raises(Retry, match="Retry in 2s"):
        tasks.reconcile_agent_hosts_at_start.apply(args=(["host.brno1"],))
    with pytest.raises(Retry, match="Retry in 4s"):
        tasks.reconcile_agent_hosts_at_start.apply(args=(["host.brno1"],), retries=1)
    assert tasks.reconcile_agent_hosts_at_start.apply(args=(["host.brno1"],), retries=2).get() == ["brno1"]
    assert calls == [["host.brno1"]] * 3
