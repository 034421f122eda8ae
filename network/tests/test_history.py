"""The device history is pruned after ``HISTORY_RETENTION`` days — only what nothing reads any more: settled
changes of repairs and of networks that ended and hold no VLAN, repaired drift. (Segments and device changes
are written for every cluster; they grew for good.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from network import services, tasks, workflows
from network.models import DeviceChange, Drift, Segment, VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal import pruning

pytestmark = pytest.mark.django_db(transaction=True)


def provisioned(fabric, owner: str) -> Segment:
    seg = services.segment_create(owner=owner, hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    workflows.provision(seg.pk).apply().get()
    return Segment.objects.get(pk=seg.pk)


def torn_down(fabric, owner: str) -> Segment:
    seg = provisioned(fabric, owner)
    services.segment_delete(segment=seg)
    workflows.teardown(seg.pk).apply().get()
    return Segment.objects.get(pk=seg.pk)


def test_only_history_nothing_reads_any_more_is_pruned(fabric, settings):
    settings.HISTORY_RETENTION = 30
    old = timezone.now() - timedelta(days=31)
    gone = torn_down(fabric, "gone")  # ended long ago, its VLAN back in the pool: its changes may go
    recent = torn_down(fabric, "recent")  # ended yesterday: kept
    live = provisioned(fabric, "live")  # still up: its changes are kept however old
    holding = provisioned(fabric, "holding")  # closed but still holding its VLAN (a device was disabled): kept
    assert gone.state == recent.state == Segment.State.CLOSED
    Segment.objects.filter(pk__in=[gone.pk, holding.pk]).update(updated_at=old)
    Segment.objects.filter(pk=holding.pk).update(state=Segment.State.CLOSED)
    assert VlanAllocation.objects.get(owner=holding.owner_ref).state == VlanAllocation.State.ALLOCATED
    Segment.objects.filter(pk=recent.pk).update(updated_at=timezone.now() - timedelta(days=1))
    repair = DeviceChange.objects.create(
        kind="switch", switch=fabric.switches["brno"], device="sw-brno", cause="reconcile: x", status="ok"
    )
    stuck = DeviceChange.objects.create(
        kind="switch", switch=fabric.switches["brno"], device="sw-brno", cause="reconcile: y", status="pending"
    )
    fixed = Drift.objects.create(device_kind="switch", device="sw-brno", port="h1", kind="stale", repaired_at=old)
    still = Drift.objects.create(device_kind="switch", device="sw-brno", port="h2", kind="foreign")
    DeviceChange.objects.update(created_at=old)
    count = DeviceChange.objects.filter
    before = {s.pk: count(segment=s).count() for s in (gone, recent, live, holding)}
    assert all(before.values())

    assert tasks.prune_history.apply().get() == {"device changes": before[gone.pk] + 1, "drift": 1}
    assert count(segment=gone).count() == 0 and not count(pk=repair.pk).exists()
    assert {s.pk: count(segment=s).count() for s in (recent, live, holding)} == {
        s.pk: before[s.pk] for s in (recent, live, holding)
    }
    assert count(pk=stuck.pk).exists()  # unfinished work is never pruned
    assert not Drift.objects.filter(pk=fixed.pk).exists() and Drift.objects.filter(pk=still.pk).exists()
    assert tasks.prune_history.apply().get() == {"device changes": 0, "drift": 0}


def test_pruning_goes_in_batches(fabric, settings, monkeypatch):
    settings.HISTORY_RETENTION = 1
    monkeypatch.setattr(pruning, "BATCH", 2)
    switch = fabric.switches["brno"]
    for i in range(5):
        DeviceChange.objects.create(kind="switch", switch=switch, device="sw-brno", cause=f"r{i}", status="noop")
    DeviceChange.objects.update(created_at=timezone.now() - timedelta(days=2))
    assert services.history_prune()["device changes"] == 5 and not DeviceChange.objects.exists()
