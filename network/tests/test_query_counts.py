"""Query counts of the convergence hot path, pinned (each device task of every workflow runs it): a new
query per task shows up here before it shows up in ``bench/converge.py`` and ``bench/provision.py``."""

from __future__ import annotations

import pytest
from django.db import connection

from network import convergence, selectors, services
from network.models import DeviceChange
from network.tests.fakefabric import fabric_fixture  # noqa: F401

# change+device, claim (returning the claimed rows), desired state (the switches' sites, gateway sites, the
# segments that reach them, their members, switch ports — which are also the spec's owned ports), settlement,
# final read; PostgreSQL adds the advisory lock and unlock
SWITCH_QUERIES = 9
# change+device, claim (returning the claimed rows), desired state (segments, members, gateway sites),
# settlement, final read
HOST_QUERIES = 7


def _locks() -> int:
    return 2 if connection.vendor == "postgresql" else 0


@pytest.fixture
def segment(fabric):
    return services.segment_create(
        owner="cluster:q", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=True
    )


def test_changes_are_recorded_in_one_query(segment, django_assert_num_queries):
    switches, hosts = selectors.segment_devices(segment)
    with django_assert_num_queries(1):
        ids = convergence.changes_create(devices=[*switches, *hosts], segment=segment, cause="provision q")
    rows = DeviceChange.objects.in_bulk(ids)
    assert [rows[i].device for i in ids] == [d.name for d in [*switches, *hosts]]
    assert all(rows[i].status == DeviceChange.Status.PENDING and rows[i].segment_id == segment.pk for i in ids)
    # each row names its device by kind and key, as one saved alone does
    alone = convergence.change_create(device=hosts[-1], segment=segment, cause="provision q")
    fields = ("kind", "switch_id", "host_id", "device", "segment_id", "cause", "status", "diff", "attempts", "error")
    assert [getattr(rows[ids[-1]], f) for f in fields] == [getattr(alone, f) for f in fields]
    assert [(rows[i].kind, rows[i].switch_id, rows[i].host_id) for i in ids] == [
        ("switch", d.pk, None) for d in switches
    ] + [("host", None, d.pk) for d in hosts]
    assert all(abs((rows[i].created_at - alone.created_at).total_seconds()) < 5 for i in ids)
    assert convergence.changes_create(devices=[], segment=segment, cause="nothing") == []


def test_switch_change_query_count(fabric, segment, django_assert_num_queries):
    (change_id,) = convergence.changes_create(devices=[fabric.switches["brno"]], segment=segment, cause="q")
    with django_assert_num_queries(SWITCH_QUERIES + _locks()):
        change = convergence.converge_change(change_id)
    assert change.status == DeviceChange.Status.OK
    segment.refresh_from_db()
    carried = fabric.switch_ports("sw-brno")
    assert {port for port, vids in carried.items() if segment.vid in vids}, carried  # really converged


def test_host_change_query_count(fabric, segment, django_assert_num_queries):
    (change_id,) = convergence.changes_create(devices=[fabric.hosts["brno1"]], segment=segment, cause="q")
    with django_assert_num_queries(HOST_QUERIES + _locks()):
        change = convergence.converge_change(change_id)
    assert change.status == DeviceChange.Status.OK
    assert fabric.host_vlans("brno1") == frozenset({segment.vid})


def test_a_change_settled_by_another_batch_opens_no_session(fabric, segment, django_assert_num_queries):
    """Two changes of one switch: the first task's batch applies both; the second task finds its change
    settled without taking the lock or opening a session."""
    first, second = convergence.changes_create(
        devices=[fabric.switches["brno"], fabric.switches["brno"]], segment=segment, cause="q"
    )
    convergence.converge_change(first)
    with django_assert_num_queries(1):
        assert convergence.converge_change(second).status == DeviceChange.Status.OK


def test_a_layer_costs_the_same_queries_for_one_device_or_many(fabric, django_assert_num_queries):
    """A workflow layer (``converge_changes``): locks, claim, desired state and settlement are a fixed
    number of queries whatever the number of devices; the sessions run side by side."""
    hosts = [fabric.hosts[name] for name in ("brno1", "brno2", "pilsen1", "pilsen2", "prague1", "prague2")]
    seg = services.segment_create(owner="cluster:layer", hosts=hosts, gateway=True)
    switches, members = selectors.segment_devices(seg)
    assert len(switches) == 3 and len(members) == 6
    ids = convergence.changes_create(devices=switches, segment=seg, cause="q")
    with django_assert_num_queries(SWITCH_QUERIES + _locks()):
        outcome = convergence.converge_changes(ids)
    assert [c.status for c in outcome.changes.values()] == [DeviceChange.Status.OK] * 3
    ids = convergence.changes_create(devices=members, segment=seg, cause="q")
    with django_assert_num_queries(HOST_QUERIES + _locks()):
        outcome = convergence.converge_changes(ids)
    assert [c.status for c in outcome.changes.values()] == [DeviceChange.Status.OK] * 6
    assert all(fabric.host_vlans(h.name) == frozenset({seg.vid}) for h in members)
    assert not outcome.failed and not outcome.temporary
