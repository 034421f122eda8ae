"""VLAN allocation and segments: race-free ids, quarantine, pools by site, the segment services."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from network import services
from network.errors import HostUnavailable, NoCoreForSites, PoolExhausted, SegmentClosed, SegmentExists
from network.models import Segment, VlanAllocation
from network.tests.factories import CoreTransportFactory, HostFactory, SiteFactory, VlanPoolFactory
from network.tests.fakefabric import fabric_fixture  # noqa: F401


@pytest.fixture
def pool(db):
    return VlanPoolFactory(name="p", ranges="100-104", reserved="102", quarantine_seconds=300)


def test_allocate_gives_ids_of_the_pool_minus_reserved_then_exhausts(pool):
    got = {services.vlan_allocate(pool=pool, owner=f"o{i}").vid for i in range(4)}
    assert got == {100, 101, 103, 104}
    with pytest.raises(PoolExhausted, match="pool p is exhausted") as exc:
        services.vlan_allocate(pool=pool, owner="late")
    assert exc.value.status == 409


def test_release_quarantines_and_twice_is_harmless(pool):
    alloc = services.vlan_allocate(pool=pool, owner="cluster:1")
    assert services.vlan_release(allocation=alloc) is True
    assert alloc.state == VlanAllocation.State.QUARANTINED
    assert alloc.quarantine_until > timezone.now() + timedelta(seconds=290)
    assert services.vlan_release(allocation=alloc) is False
    assert alloc.state == VlanAllocation.State.QUARANTINED


def test_quarantined_id_comes_back_only_after_hold_down(pool):
    allocs = [services.vlan_allocate(pool=pool, owner=f"o{i}") for i in range(4)]
    services.vlan_release(allocation=allocs[0])
    with pytest.raises(PoolExhausted):
        services.vlan_allocate(pool=pool, owner="next")
    VlanAllocation.objects.filter(pk=allocs[0].pk).update(quarantine_until=timezone.now() - timedelta(seconds=1))
    again = services.vlan_allocate(pool=pool, owner="next")
    assert again.vid == allocs[0].vid and again.owner == "next"


def test_stale_release_does_not_free_the_next_owners_id(pool):
    old = services.vlan_allocate(pool=pool, owner="a")
    stale = VlanAllocation.objects.get(pk=old.pk)  # a copy held by a slow caller
    services.vlan_release(allocation=old)
    VlanAllocation.objects.filter(pk=old.pk).update(quarantine_until=timezone.now() - timedelta(seconds=1))
    for i in range(4):  # drain the pool so the old id is reused
        services.vlan_allocate(pool=pool, owner=f"b{i}")
    assert services.vlan_release(allocation=stale) is False
    assert VlanAllocation.objects.get(pk=old.pk).state == VlanAllocation.State.ALLOCATED


def test_newly_reserved_id_is_never_handed_out(pool):
    warm = services.vlan_allocate(pool=pool, owner="warm")  # rows exist now
    left = sorted({100, 101, 103, 104} - {warm.vid})
    pool.reserved = ",".join(str(v) for v in [102, *left[:-1]])
    pool.save()
    assert services.vlan_allocate(pool=pool, owner="x").vid == left[-1]
    with pytest.raises(PoolExhausted):
        services.vlan_allocate(pool=pool, owner="y")


def test_pools_for_sites(db):
    a, b, c = SiteFactory(name="a"), SiteFactory(name="b"), SiteFactory(name="c")
    ab = VlanPoolFactory(name="ab", core=CoreTransportFactory(name="core-ab", sites=[a, b]))
    abc = VlanPoolFactory(name="abc", core=CoreTransportFactory(name="core-abc", sites=[a, b, c]), ranges="200-299")
    assert list(services.pools_for_sites([a, b])) == [ab, abc]
    assert list(services.pools_for_sites([a, c])) == [abc]
    assert list(services.pools_for_sites([a.pk, b.pk, c.pk])) == [abc]


def test_segment_create_takes_a_vlan_from_a_pool_joining_all_sites(fabric):
    hosts = [fabric.hosts["brno1"], fabric.hosts["prague2"]]
    seg = services.segment_create(owner="cluster:1", hosts=hosts, gateway=True)
    assert seg.state == Segment.State.PENDING
    assert 100 <= seg.vid <= 199 and seg.allocation.owner == "cluster:1"
    assert {m.host.name for m in seg.members.all()} == {"brno1", "prague2"}
    with pytest.raises(SegmentExists) as exc:
        services.segment_create(owner="cluster:1", hosts=hosts, gateway=False)
    assert exc.value.status == 409


def test_segment_create_refuses_a_site_no_core_reaches(fabric):
    elsewhere = HostFactory(name="ostrava1", site=SiteFactory(name="ostrava"))
    with pytest.raises(NoCoreForSites, match="ostrava") as exc:
        services.segment_create(owner="cluster:2", hosts=[fabric.hosts["brno1"], elsewhere], gateway=False)
    assert exc.value.status == 422
    assert not VlanAllocation.objects.filter(state=VlanAllocation.State.ALLOCATED).exists()


def test_segment_create_falls_back_to_another_pool_then_409(fabric):
    small = VlanPoolFactory(name="a-small", core=fabric.core, ranges="300")
    first = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"]], gateway=False)
    assert first.allocation.pool == small
    VlanAllocation.objects.filter(pool=fabric.pool).delete()
    fabric.pool.ranges = "200"
    fabric.pool.save()
    second = services.segment_create(owner="c2", hosts=[fabric.hosts["brno1"]], gateway=False)
    assert second.allocation.pool == fabric.pool
    with pytest.raises(PoolExhausted, match="a-small, wan"):
        services.segment_create(owner="c3", hosts=[fabric.hosts["brno1"]], gateway=False)


def test_segment_create_refuses_disabled_host(fabric):
    host = fabric.hosts["pilsen1"]
    host.enabled = False
    host.save()
    with pytest.raises(HostUnavailable, match="pilsen1"):
        services.segment_create(owner="c", hosts=[host], gateway=False)


def test_set_hosts_outside_the_core_and_after_delete(fabric):
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    seg = services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno2"], fabric.hosts["pilsen1"]])
    assert {m.host.name for m in seg.members.all()} == {"brno2", "pilsen1"}
    elsewhere = HostFactory(name="ostrava1", site=SiteFactory(name="ostrava"))
    with pytest.raises(NoCoreForSites, match="core cesnet does not reach sites ostrava"):
        services.segment_set_hosts(segment=seg, hosts=[elsewhere])
    services.segment_delete(segment=seg)
    services.segment_delete(segment=seg)  # harmless
    assert seg.state == Segment.State.DELETING
    with pytest.raises(SegmentClosed):
        services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["brno1"]])


# --- concurrency on PostgreSQL -------------------------------------------------------------------------------------


def _connections_available() -> int:
    """How many connections this test may open: the server's limit minus what is in use, minus a margin
    for the other test runs sharing the server."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW max_connections")
        limit = int(cursor.fetchone()[0])
        cursor.execute("SELECT count(*) FROM pg_stat_activity")
        used = int(cursor.fetchone()[0])
    return max(2, min(200, limit - used - 30))


def _allocate_concurrently(pool, requests: int) -> tuple[list[int], list[Exception]]:
    """``requests`` allocations, each on a connection of its own, as many at once as the server allows."""
    workers = min(requests, _connections_available())
    start = threading.Barrier(workers)
    gate = threading.Semaphore(workers)

    def one(i: int):
        with gate:
            try:
                with connections["default"].cursor() as cursor:  # open this request's own connection first
                    cursor.execute("SELECT 1")
                if i < workers:
                    start.wait(timeout=60)
                return services.vlan_allocate(pool=pool, owner=f"req:{i}").vid
            except Exception as exc:  # noqa: BLE001 - collected and asserted on
                return exc
            finally:
                connections["default"].close()

    with ThreadPoolExecutor(max_workers=workers) as pool_exec:
        results = list(pool_exec.map(one, range(requests)))
    return [r for r in results if isinstance(r, int)], [r for r in results if not isinstance(r, int)]


@pytest.mark.django_db(transaction=True)
def test_200_concurrent_allocations_get_200_distinct_ids():
    if connection.vendor != "postgresql":
        pytest.skip("the concurrency test needs PostgreSQL (DATABASE_URL=postgres://...)")
    pool = VlanPoolFactory(name="big", ranges="100-399")
    vids, errors = _allocate_concurrently(pool, 200)
    assert errors == []
    assert len(vids) == 200 and len(set(vids)) == 200
    assert VlanAllocation.objects.filter(pool=pool, state="allocated").count() == 200


@pytest.mark.django_db(transaction=True)
def test_concurrent_allocations_beyond_the_pool_get_409_and_no_duplicates():
    if connection.vendor != "postgresql":
        pytest.skip("the concurrency test needs PostgreSQL (DATABASE_URL=postgres://...)")
    pool = VlanPoolFactory(name="small", ranges="100-249")  # 150 ids for 200 requests
    vids, errors = _allocate_concurrently(pool, 200)
    assert len(vids) == 150 and len(set(vids)) == 150
    assert len(errors) == 50 and all(isinstance(e, PoolExhausted) and e.status == 409 for e in errors), errors[:3]
