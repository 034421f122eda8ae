"""VLAN allocation and segments: race-free ids, quarantine, pools by site, the segment services."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from network import services, tasks
from network.choices import PortRole
from network.errors import HostUnavailable, NoCoreForSites, PoolExhausted, SegmentClosed, SegmentExists
from network.models import Segment, Switch, VlanAllocation
from network.tests.factories import (
    CoreTransportFactory,
    HostFactory,
    SiteFactory,
    SwitchFactory,
    SwitchPortFactory,
    VlanPoolFactory,
)
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


def test_each_allocation_is_audited_with_actor_and_owner(pool, alice):
    from django.contrib.contenttypes.models import ContentType

    from portal.audit import audit_actor
    from portal.models import AuditEntry

    before = timezone.now()
    with audit_actor("pbs-token", user=alice, request_id="req-42"):
        alloc = services.vlan_allocate(pool=pool, owner="cluster:7")
    entry = AuditEntry.objects.get(message="allocated", object_id=str(alloc.pk))
    assert entry.content_type == ContentType.objects.get_for_model(VlanAllocation)
    assert (entry.actor, entry.user, entry.request_id, entry.action) == ("pbs-token", alice, "req-42", "action")
    assert entry.object_repr == f"p:{alloc.vid}" == str(VlanAllocation.objects.get(pk=alloc.pk))
    assert entry.changes == {"state": ["free", "allocated"], "owner": [None, "cluster:7"]}
    assert before <= entry.timestamp <= timezone.now()


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


HORIZON: list = []


def horizon(now):
    """A VLAN_REUSE_HORIZONS source for the test below: what HORIZON holds (or no constraint)."""
    return HORIZON[0] if HORIZON else None


@pytest.mark.parametrize("take", ["skip locked", "conditional"])
def test_a_quarantined_id_also_waits_for_the_reuse_horizon(pool, settings, monkeypatch, take):
    """Past its hold-down time an id released after the horizon (someone outside may still map it to its
    old owner: an access gateway's state) stays held, on both ways of taking a row."""
    if take == "conditional":  # the way without SKIP LOCKED (SQLite)
        monkeypatch.setattr(services.connection.features, "has_select_for_update_skip_locked", False)
    settings.VLAN_REUSE_HORIZONS = ["network.tests.test_allocation.horizon"]
    allocs = [services.vlan_allocate(pool=pool, owner=f"o{i}") for i in range(4)]
    services.vlan_map_to_gateways(allocation_id=allocs[0].pk)  # (a closed cluster's: the gateways map it)
    services.vlan_release(allocation=allocs[0])
    long_ago = timezone.now() - timedelta(hours=1)
    VlanAllocation.objects.filter(pk=allocs[0].pk).update(quarantine_until=long_ago)
    HORIZON[:] = [long_ago]
    try:
        with pytest.raises(PoolExhausted, match="1 of them only wait for an access gateway"):
            services.vlan_allocate(pool=pool, owner="next")
        HORIZON[:] = [timezone.now()]
        again = services.vlan_allocate(pool=pool, owner="next")
    finally:
        HORIZON.clear()
    assert again.vid == allocs[0].vid


def test_only_a_closed_segments_id_waits_for_the_gateways_even_if_it_turned_public(fabric, settings):
    """A closed segment marks its id once it is active (its owner may be in the gateways' maps from then on),
    a segment that becomes closed at once; once released, only a marked id waits for the reuse horizon — a
    public segment's, or a closed one's whose provisioning failed, never reached a gateway's map."""
    settings.VLAN_REUSE_HORIZONS = ["network.tests.test_allocation.horizon"]
    hosts = [fabric.hosts["brno1"]]
    public = services.segment_create(owner="cluster:pub", hosts=hosts, gateway=False)
    closed = services.segment_create(owner="cluster:closed", hosts=hosts, gateway=True)
    failed = services.segment_create(owner="cluster:failed", hosts=hosts, gateway=True)
    turned = services.segment_create(owner="cluster:turned", hosts=hosts, gateway=False)
    for seg in (public, closed, turned):
        tasks.segment_provisioned(seg.pk)
    services.segment_set_gateway(segment=turned, gateway=True)
    services.segment_set_gateway(segment=turned, gateway=False)  # public again: a gateway may still map it
    everyone = (public, closed, failed, turned)
    mapped = {seg.owner_ref: VlanAllocation.objects.get(pk=seg.allocation_id).gateway_mapped for seg in everyone}
    assert mapped == {"cluster:pub": False, "cluster:closed": True, "cluster:failed": False, "cluster:turned": True}
    long_ago = timezone.now() - timedelta(hours=1)
    for seg in everyone:
        services.vlan_release(allocation=VlanAllocation.objects.get(pk=seg.allocation_id))
    VlanAllocation.objects.filter(state=VlanAllocation.State.QUARANTINED).update(quarantine_until=long_ago)
    HORIZON[:] = [long_ago]  # no gateway has caught up with these releases
    try:
        free = VlanAllocation.objects.filter(services.free_now(timezone.now(), services.reuse_horizon(timezone.now())))
        back = set(free.filter(state=VlanAllocation.State.QUARANTINED).values_list("owner", flat=True))
    finally:
        HORIZON.clear()
    assert back == {"cluster:pub", "cluster:failed"}
    taken = services.vlan_allocate(pool=public.allocation.pool, owner="cluster:new")  # (ids reused: unmarked)
    assert taken.gateway_mapped is False
    assert VlanAllocation.objects.get(pk=taken.pk).gateway_mapped is False


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


def test_many_ids_reserved_after_the_rows_were_made_never_block_an_allocation(fabric, monkeypatch):
    """30 ids reserved after the pool's rows were made (free rows out of the pool now), the only valid free
    ids below them: the first out-of-pool row the allocator meets drops all of them at once — one by one
    they used up every attempt (a 409 "try again" that no retry cured: inside a caller's transaction the
    drops were rolled back with it)."""
    import random

    pool = fabric.pool  # 100-199
    services.vlan_pool_sync(pool=pool)
    pool.reserved = "100-129"
    pool.save()
    VlanAllocation.objects.filter(pool=pool, vid__gte=140).update(state="allocated", owner="other")
    monkeypatch.setattr(random, "randint", lambda lo, hi: hi)  # every take starts above the free valid ids
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    assert 130 <= seg.vid <= 139
    assert not VlanAllocation.objects.filter(pool=pool, vid__lt=130).exists()


def test_saving_a_pool_in_the_admin_syncs_its_rows(fabric, admin_client):
    pool = fabric.pool
    services.vlan_pool_sync(pool=pool)
    r = admin_client.post(
        f"/admin/network/vlanpool/{pool.pk}/change/",
        {"name": pool.name, "core": pool.core_id, "ranges": "100-209", "reserved": "100-109", "quarantine_seconds": 60},
    )
    assert r.status_code == 302, r.content.decode()[:2000]
    vids = set(VlanAllocation.objects.filter(pool=pool).values_list("vid", flat=True))
    assert vids == set(range(110, 210))


@pytest.mark.parametrize("how", ["reserved", "out of the ranges"])
def test_an_id_an_ended_segment_used_can_be_reserved_or_dropped(fabric, how):
    """A torn-down segment keeps its allocation row (for the record); reserving that id, or shrinking the
    ranges past it, then dropping the row must not fail allocations (a 500 on POST /api/clusters/)."""
    pool = fabric.pool
    pool.ranges, pool.quarantine_seconds = "100-102", 0
    pool.save()
    used = services.segment_create(owner="old", hosts=[fabric.hosts["brno1"]], gateway=False)
    vid = used.vid
    services.segment_delete(segment=used)
    tasks.segment_released(used.pk)  # (no device carried it: nothing was provisioned)
    if how == "reserved":
        pool.reserved = str(vid)
    else:
        pool.ranges = ",".join(str(v) for v in (100, 101, 102) if v != vid)
    pool.save()
    got = {services.vlan_allocate(pool=pool, owner=f"n{i}").vid for i in range(2)}
    assert vid not in got and len(got) == 2
    with pytest.raises(PoolExhausted):
        services.vlan_allocate(pool=pool, owner="late")
    used.refresh_from_db()
    assert (used.state, used.vid, used.allocation) == (Segment.State.CLOSED, vid, None)
    assert not VlanAllocation.objects.filter(pool=pool, vid=vid).exists()


def test_pools_for_sites(db):
    a, b, c = SiteFactory(name="a"), SiteFactory(name="b"), SiteFactory(name="c")
    ab = VlanPoolFactory(name="ab", core=CoreTransportFactory(name="core-ab", sites=[a, b]))
    abc = VlanPoolFactory(name="abc", core=CoreTransportFactory(name="core-abc", sites=[a, b, c]), ranges="200-299")
    a2 = VlanPoolFactory(name="a2", core=CoreTransportFactory(name="core-a", sites=[a]), ranges="300-399")
    # the widest cores first (a cluster may grow or migrate within its core only), then by name
    assert list(services.pools_for_sites([a, b])) == [abc, ab]
    assert list(services.pools_for_sites([a])) == [abc, ab, a2]
    assert list(services.pools_for_sites([a, c])) == [abc]
    assert list(services.pools_for_sites([a.pk, b.pk, c.pk])) == [abc]
    assert list(services.pools_for_sites([])) == [abc, ab, a2]


def test_a_cluster_at_one_site_gets_a_vlan_it_can_migrate_with(fabric):
    """A pool whose core reaches only today's site (and sorts first by name) is not taken while a wider one
    has ids: the cluster can then grow to, or migrate to, another site of the wider core."""
    local = VlanPoolFactory(name="a-brno", core=CoreTransportFactory(name="brno-local", sites=[fabric.sites["brno"]]))
    seg = services.segment_create(owner="c", hosts=[fabric.hosts["brno1"]], gateway=False)
    assert seg.allocation.pool == fabric.pool
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["prague1"]])  # the migration's new site
    fabric.pool.ranges = str(seg.vid)  # the wide pool runs out: the local one is the fallback
    fabric.pool.save()
    assert services.segment_create(owner="d", hosts=[fabric.hosts["brno2"]], gateway=False).allocation.pool == local


def test_a_closed_segment_needs_a_way_in_while_every_gateway_switch_is_disabled(fabric):
    """Every access-gateway switch disabled (maintenance) is not "no gateway at all": a closed segment still gets
    a core that joins a gateway site (its VLAN reaches the gateway when the switch is back), never any pool."""
    kosice = SiteFactory(name="kosice")
    VlanPoolFactory(name="kos", core=CoreTransportFactory(name="kos-local", sites=[kosice]), ranges="100-199")
    on_kosice = HostFactory(
        name="kosice1", site=kosice, switch_port=SwitchPortFactory(switch=SwitchFactory(site=kosice))
    )
    Switch.objects.filter(ports__role=PortRole.GATEWAY_TRUNK).update(enabled=False)
    with pytest.raises(NoCoreForSites, match="and a site with an access gateway"):
        services.segment_create(owner="c1", hosts=[on_kosice], gateway=True)
    kos_public = services.segment_create(owner="c2", hosts=[on_kosice], gateway=False)
    with pytest.raises(NoCoreForSites, match="core kos-local reaches no site with an access gateway"):
        services.segment_set_gateway(segment=kos_public, gateway=True)
    closed = services.segment_create(owner="c3", hosts=[fabric.hosts["prague1"]], gateway=True)
    assert closed.allocation.pool == fabric.pool  # (its core joins brno, where the gateway is)


def test_a_closed_segment_needs_a_gateway_its_core_reaches_not_every_gateway(fabric):
    """A gateway trunk at a site another core serves must not stop closed clusters elsewhere: a closed segment
    needs its hosts' sites and at least one gateway site on its core (it reaches the gateway sites its core
    joins). A core that reaches no gateway cannot carry a closed cluster (there would be no way in)."""
    ostrava, kosice = SiteFactory(name="ostrava"), SiteFactory(name="kosice")
    VlanPoolFactory(name="ost", core=CoreTransportFactory(name="ost-local", sites=[ostrava]), ranges="100-199")
    VlanPoolFactory(name="kos", core=CoreTransportFactory(name="kos-local", sites=[kosice]), ranges="100-199")
    gw = SwitchPortFactory(
        switch=SwitchFactory(name="sw-ostrava", site=ostrava), name="gw", role=PortRole.GATEWAY_TRUNK
    )
    on_ostrava = HostFactory(name="ostrava1", site=ostrava, switch_port=SwitchPortFactory(switch=gw.switch))
    on_kosice = HostFactory(
        name="kosice1", site=kosice, switch_port=SwitchPortFactory(switch=SwitchFactory(site=kosice))
    )

    closed = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"]], gateway=True)
    assert closed.allocation.pool == fabric.pool
    services.segment_set_hosts(segment=closed, hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]])
    public = services.segment_create(owner="c2", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    services.segment_set_gateway(segment=public, gateway=True)  # turned closed: cesnet reaches brno's gateway
    assert services.segment_create(owner="c3", hosts=[on_ostrava], gateway=True).allocation.pool.name == "ost"

    with pytest.raises(NoCoreForSites) as exc:
        services.segment_create(owner="c4", hosts=[on_kosice], gateway=True)
    assert str(exc.value) == (
        "no core transport with a VLAN pool joins sites kosice and a site with an access gateway (brno, ostrava)"
    )
    kos_public = services.segment_create(owner="c5", hosts=[on_kosice], gateway=False)
    with pytest.raises(
        NoCoreForSites, match=r"core kos-local reaches no site with an access gateway \(brno, ostrava\)"
    ):
        services.segment_set_gateway(segment=kos_public, gateway=True)
    assert not Segment.objects.filter(owner_ref="c4").exists()
    assert set(VlanAllocation.objects.filter(state=VlanAllocation.State.ALLOCATED).values_list("owner", flat=True)) == {
        "c1",
        "c2",
        "c3",
        "c5",
    }


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


def test_200_allocations_from_200_connections_at_once():
    """200 requests, each on a PostgreSQL connection of its own, released at once (the machine's server
    allows 100 connections, so a throwaway server with room for 260 is started for this): 200 distinct
    ids from a pool of 300; from a pool of 150, exactly 150 distinct ids and 50 clear 409s, no other
    error, nothing allocated beyond what was granted."""
    import json
    import subprocess
    import sys

    from portal.testing_pg import server_bin, throwaway_postgres

    if server_bin() is None:
        pytest.skip("needs PostgreSQL's server programs (/usr/lib/postgresql/*/bin) for a throwaway server")
    with throwaway_postgres(max_connections=260) as url:
        env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "portal.settings_test"}
        done = subprocess.run(
            [sys.executable, "-m", "network.tests.allocation_race", "--requests", "200", "--pool-sizes", "300,150"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    roomy, tight = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert roomy["backends"] == 200  # really 200 separate connections
    assert roomy["errors"] == [] and len(roomy["vids"]) == 200 and len(set(roomy["vids"])) == 200
    assert roomy["allocated_rows"] == 200
    assert tight["backends"] == 200
    assert len(tight["vids"]) == 150 and len(set(tight["vids"])) == 150 and tight["allocated_rows"] == 150
    assert len(tight["errors"]) == 50
    assert all(e["type"] == "PoolExhausted" and e["status"] == 409 for e in tight["errors"]), tight["errors"][:3]


@pytest.mark.django_db(transaction=True)
def test_shrinking_a_pool_never_drops_a_row_an_allocation_is_taking():
    """A pool's rows are synced (its ranges shrunk) while an allocation holds a row it found free, not yet
    committed: the sync skips that row (it is locked) instead of deleting it under the allocation once it commits
    (with a segment pointing at it, the commit failed: a 500; the id lost from the pool either way)."""
    from django.db import connection

    from portal.tests.helpers import held_in_another_connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    pool = VlanPoolFactory(name="shrinking", ranges="100-101")
    services.vlan_pool_sync(pool=pool)

    def allocate_101():  # as ``_take`` does: the row locked, taken, not committed yet
        row = VlanAllocation.objects.select_for_update().get(pool=pool, vid=101)
        VlanAllocation.objects.filter(pk=row.pk).update(state="allocated", owner="c1", allocated_at=timezone.now())

    with held_in_another_connection(allocate_101):
        pool.ranges = "100"
        pool.save(update_fields=["ranges"])
        services.vlan_pool_sync(pool=pool)
    assert VlanAllocation.objects.get(pool=pool, vid=101).state == "allocated"  # kept while it is held


@pytest.mark.django_db(transaction=True)
def test_an_id_given_to_another_pool_while_an_allocation_takes_it_is_refused():
    """Pool p1 gives id 150 to pool p2 on the same core (one topology file, or the admin) while a cluster's
    allocation takes 150 from p1, not committed yet: p2's check read 150 as free (a plain read does not see a take
    in flight), both committed, and both pools handed 150 out on one core — two clusters on one VLAN. The check
    now waits for the allocation, and refuses."""
    from django.core.exceptions import ValidationError
    from django.db import connection, transaction

    from network.models import VlanPool
    from portal.tests.helpers import held_in_another_connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL for concurrent writers")
    core = CoreTransportFactory(name="backbone")
    p1 = VlanPoolFactory(name="p1", core=core, ranges="150")
    p2 = VlanPoolFactory(name="p2", core=core, ranges="160")
    services.vlan_pool_sync(pool=p1)

    def allocate_150():
        assert services.vlan_allocate(pool=VlanPool.objects.get(pk=p1.pk), owner="c1").vid == 150

    with held_in_another_connection(allocate_150, hold=0.5), transaction.atomic():
        p1.ranges = "151"
        p1.full_clean()
        p1.save()
        p2.ranges = "150,160"
        with pytest.raises(ValidationError, match="ids 150 overlap pool p1"):
            p2.full_clean()
    assert VlanAllocation.objects.get(pool=p1, vid=150).owner == "c1"


@pytest.mark.django_db(transaction=True)
def test_an_allocation_that_read_a_pool_before_an_edit_never_takes_an_id_the_edit_gave_away():
    """The other way round: the edit commits first (p1's 150 goes to p2), and an allocation that loaded p1 before
    it allocates after: p1's row of 150 is gone with the edit, and p1 makes no new one from what it read."""
    from django.db import transaction

    from network.models import VlanPool

    core = CoreTransportFactory(name="backbone")
    p1 = VlanPoolFactory(name="p1", core=core, ranges="150-151")
    p2 = VlanPoolFactory(name="p2", core=core, ranges="160")
    services.vlan_pool_sync(pool=p1)
    stale = VlanPool.objects.get(pk=p1.pk)  # (a cluster's request read it: 150-151)
    with transaction.atomic():  # as a topology import does
        p1.ranges = "151"
        p1.full_clean()
        p1.save()
        services.vlan_pool_sync(pool=p1)
        p2.ranges = "150,160"
        p2.full_clean()
        p2.save()
        services.vlan_pool_sync(pool=p2)
    taken = {services.vlan_allocate(pool=stale, owner="c1").vid}
    with pytest.raises(PoolExhausted):
        services.vlan_allocate(pool=stale, owner="c2")
    assert taken == {151}
    assert services.vlan_allocate(pool=p2, owner="c3").vid in (150, 160)
    assert not VlanAllocation.objects.filter(pool=p1, vid=150).exists()
