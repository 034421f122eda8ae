"""Writes of the VLAN life-cycle service: VLAN allocation and segments.

A *segment* is a VLAN plus the hosts (and, for a closed cluster, the access-gateway trunks) that need it,
owned by an opaque reference. These services only change the database — the desired state. Devices are
made to match it by the workflows in ``network.workflows`` (Celery), which the owner composes and starts
after its transaction commits.

Allocation is race-free the way Neutron does it: one row per (pool, id); a request picks a free row from a
random start and takes it. On PostgreSQL that is one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP
LOCKED)`` (two requests never wait for or get the same row); elsewhere a read followed by a conditional
``UPDATE … WHERE free`` with a bounded number of attempts. Rows are created lazily, the first time a pool
looks exhausted. No lock wider than one row is ever taken. A pool or inventory edit that lets another pool, a
port's static VLANs or a switch have some ids locks those ids' rows first (``VlanPool.held_ids``): it waits for an
allocation of one of them in flight, and allocations skip them until it commits; it drops the rows of ids a pool
no longer hands out in the same transaction (``vlan_pool_sync``).
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from time import monotonic

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string

from network import selectors
from network.errors import (
    HostUnavailable,
    NetworkError,
    NoCoreForSites,
    PoolExhausted,
    SegmentClosed,
    SegmentExists,
)
from network.models import DeviceChange, Drift, Host, Segment, SegmentMember, Site, VlanAllocation, VlanPool
from portal import audit
from portal.pruning import delete_in_batches

ALLOCATE_ATTEMPTS = 20
Free = VlanAllocation.State


class AllocationContention(NetworkError):
    """Free ids exist but every attempt lost the race (only without SKIP LOCKED, e.g. on SQLite)."""

    status = 409


# --- VLAN allocation -----------------------------------------------------------------------------------------


@functools.cache
def _horizon_sources(paths: tuple[str, ...]) -> list[Callable[[datetime], datetime | None]]:
    return [import_string(path) for path in paths]


_horizon_cache: tuple[float, datetime] | None = None  # (good until, on monotonic(); the horizon then)
_horizon_lock = threading.Lock()


def reuse_horizon(now: datetime) -> datetime:
    """Ids released after the returned time may still be mapped to their old owner somewhere outside the
    portal's reach (an access gateway whose installed state predates the release): they stay in quarantine
    past its hold-down time. The earliest of what the ``VLAN_REUSE_HORIZONS`` callables say (``now``: none).

    A source must never move backwards in time; then an answer a process computed up to
    ``VLAN_REUSE_HORIZON_TTL`` seconds ago is still safe (it holds ids back a little longer, never hands one
    out early), and a burst of allocations asks once instead of once each."""
    global _horizon_cache
    ttl = settings.VLAN_REUSE_HORIZON_TTL
    if ttl <= 0:
        return _ask_horizon(now)
    with _horizon_lock:  # a burst of threads: one asks, the others take its answer
        cached = _horizon_cache
        if cached is None or monotonic() >= cached[0]:
            cached = _horizon_cache = (monotonic() + ttl, _ask_horizon(now))
    return min(cached[1], now)


def _ask_horizon(now: datetime) -> datetime:
    horizon = now
    for source in _horizon_sources(tuple(settings.VLAN_REUSE_HORIZONS)):
        bound = source(now)
        if bound is not None:
            horizon = min(horizon, bound)
    return horizon


def free_now(now, horizon=None) -> Q:
    """Rows that may be handed out: free, or quarantined with the hold-down time over and — if a segment on
    the gateway trunks held it — released before ``horizon`` (``reuse_horizon``; default ``now``)."""
    forgotten = Q(gateway_mapped=False) | Q(released_at__lte=now if horizon is None else horizon)
    return Q(state=Free.FREE) | (Q(state=Free.QUARANTINED, quarantine_until__lte=now) & forgotten)


def vlan_pool_sync(*, pool: VlanPool) -> int:
    """Make the pool's rows match its ranges minus reserved: add missing ids, drop ids no longer handed out
    (only free or expired-quarantine ones; held ids stay until released). Returns the number added. The ranges
    are read afresh: an allocation that loaded the pool before an edit committed must not make rows again for
    ids the edit gave to another pool."""
    pool.refresh_from_db(fields=["ranges", "reserved"])
    valid = set(pool.vlan_ids)
    existing = set(VlanAllocation.objects.filter(pool=pool).values_list("vid", flat=True))
    missing = sorted(valid - existing)
    # Sorted inserts: concurrent first allocations on a fresh pool wait for each other instead of deadlocking.
    VlanAllocation.objects.bulk_create(
        [VlanAllocation(pool=pool, vid=vid) for vid in missing], ignore_conflicts=True, batch_size=1000
    )
    gone = existing - valid
    if gone:
        now = timezone.now()
        _drop_rows(VlanAllocation.objects.filter(free_now(now, reuse_horizon(now)), pool=pool, vid__in=gone))
    return len(missing)


@transaction.atomic
def _drop_rows(rows: QuerySet[VlanAllocation]) -> None:
    """Delete allocation rows no longer handed out (reserved, or out of the ranges). Segments that ended
    with one of them (closed, or failed and released) keep its id in ``vid`` and let go of the row. The rows are
    locked first, skipping any an allocation holds now (``_take``'s SKIP LOCKED the other way round): one taken
    meanwhile is never deleted under its new segment (the deferred foreign key failed the commit: a 500)."""
    locked = list(rows.select_for_update(skip_locked=True, of=("self",)).values_list("pk", flat=True))
    rows = VlanAllocation.objects.filter(pk__in=locked)
    Segment.objects.filter(allocation__in=rows, state__in=(Segment.State.CLOSED, Segment.State.FAILED)).exclude(
        allocation__state=Free.ALLOCATED
    ).update(allocation=None)
    rows.delete()


_TAKE_SQL = """
WITH taken AS (
    UPDATE {table} SET state = %s, owner = %s, allocated_at = %s, released_at = NULL, quarantine_until = NULL,
        gateway_mapped = FALSE
    WHERE id = (
        SELECT id FROM {table}
        WHERE pool_id = %s AND {range}
          AND (state = %s OR (state = %s AND quarantine_until <= %s AND (NOT gateway_mapped OR released_at <= %s)))
        ORDER BY vid LIMIT 1 FOR UPDATE SKIP LOCKED
    )
    RETURNING id, vid
), logged AS ({audit})
SELECT id, vid FROM taken
"""
_ALLOCATED_CHANGES = {"state": [Free.FREE, Free.ALLOCATED]}


def _take_skip_locked(pool: VlanPool, start: int, owner: str, now, horizon) -> VlanAllocation | None:
    """PostgreSQL: pick, take and audit a free row in ONE statement (the job-queue idiom): the sub-select
    skips rows other transactions hold, the UPDATE takes the one found, the audit entry is written from
    its result. One round trip, no transaction around it: the row lock lasts one statement. Returns the
    row taken or None."""
    table = connection.ops.quote_name(VlanAllocation._meta.db_table)
    audit_sql, audit_params = audit.insert_for_rows(
        "taken",
        VlanAllocation,
        action="action",
        changes={**_ALLOCATED_CHANGES, "owner": [None, owner]},
        message="allocated",
        repr_sql="%s || CAST(taken.vid AS varchar(12))",
        repr_params=[f"{pool.name}:"],
    )
    with connection.cursor() as cursor:
        for bound in ("vid >= %s", "vid < %s"):
            cursor.execute(
                _TAKE_SQL.format(table=table, range=bound, audit=audit_sql),
                [Free.ALLOCATED, owner, now, pool.pk, start, Free.FREE, Free.QUARANTINED, now, horizon, *audit_params],
            )
            row = cursor.fetchone()
            if row:
                return VlanAllocation(
                    pk=row[0], pool=pool, vid=row[1], state=Free.ALLOCATED, owner=owner, allocated_at=now
                )
    return None


def _take_conditional(pool: VlanPool, start: int, owner: str, now, horizon) -> VlanAllocation | int | None:
    """Any database: read a free candidate, then take it with a conditional UPDATE (0 rows: lost a race)
    and audit it, the take and its audit entry in one transaction."""
    candidates = VlanAllocation.objects.filter(free_now(now, horizon), pool=pool).order_by("vid")
    row = candidates.filter(vid__gte=start).first() or candidates.filter(vid__lt=start).first()
    if row is None:
        return None
    fields = {
        "state": Free.ALLOCATED,
        "owner": owner,
        "allocated_at": now,
        "released_at": None,
        "quarantine_until": None,
        "gateway_mapped": False,
    }
    with transaction.atomic():
        if not VlanAllocation.objects.filter(free_now(now, horizon), pk=row.pk).update(**fields):
            return 0
        for name, value in fields.items():
            setattr(row, name, value)
        audit.record(row, "action", {**_ALLOCATED_CHANGES, "owner": [None, owner]}, "allocated")
    return row


def vlan_allocate(*, pool: VlanPool, owner: str) -> VlanAllocation:
    """Take a free VLAN id of ``pool`` for ``owner``. Raises ``PoolExhausted`` (409) when none is left.

    Each take writes its own audit entry, atomically (on PostgreSQL in the same statement), so no
    transaction is opened around the attempts: inside a caller's transaction the id is held until it
    commits; alone, each allocation is one round trip."""
    if not owner:
        raise ValueError("an allocation needs an owner reference")
    valid = frozenset(pool.vlan_ids)
    if not valid:
        raise PoolExhausted(f"pool {pool.name} has no VLAN ids to hand out")
    lo, hi = min(valid), max(valid)
    take = _take_skip_locked if connection.features.has_select_for_update_skip_locked else _take_conditional
    synced = False
    horizon = reuse_horizon(timezone.now())
    for _attempt in range(ALLOCATE_ATTEMPTS):
        now = timezone.now()
        # A random start spreads concurrent requests over the pool and avoids handing out the same low ids
        # again and again (Neutron's lesson).
        taken = take(pool, random.randint(lo, hi), owner, now, horizon)
        if taken is None:  # nothing free
            if synced:
                break
            vlan_pool_sync(pool=pool)  # (the pool read afresh: its ids as they are now)
            valid, synced = frozenset(pool.vlan_ids), True
            continue
        if not taken:  # lost a race for the row: try another
            continue
        row = taken
        if row.vid not in valid:  # reserved or removed from the ranges since the rows were made
            with transaction.atomic():
                VlanAllocation.objects.filter(pk=row.pk).update(state=Free.FREE)  # taken by nobody now
                _drop_rows(VlanAllocation.objects.filter(pk=row.pk))
            if not synced:  # drop all such rows at once: one by one, they could use up every attempt
                vlan_pool_sync(pool=pool)
                valid, synced = frozenset(pool.vlan_ids), True
            continue
        return row
    else:
        raise AllocationContention(f"pool {pool.name}: could not take a free VLAN id; try again")
    now = timezone.now()
    held = VlanAllocation.objects.filter(pool=pool).exclude(free_now(now, horizon)).count()
    waiting = VlanAllocation.objects.filter(
        free_now(now), pool=pool, state=Free.QUARANTINED, gateway_mapped=True
    ).count()
    raise PoolExhausted(
        f"pool {pool.name} is exhausted: all {len(valid)} VLAN ids are in use or in quarantine ({held})"
        + (
            f"; {waiting} of them only wait for an access gateway to pull a state without their old cluster"
            if waiting
            else ""
        )
    )


def vlan_map_to_gateways(*, allocation_id: int) -> None:
    """The id may be in the access gateways' VLAN maps from now on (a closed segment became active, or a
    segment became closed): once released it also waits until no gateway can still map it
    (``reuse_horizon``) — even if the segment is public again by then. A closed cluster whose provisioning
    failed never got here: its id waits for its quarantine only."""
    VlanAllocation.objects.filter(pk=allocation_id, state=Free.ALLOCATED, gateway_mapped=False).update(
        gateway_mapped=True
    )


@transaction.atomic
def vlan_release(*, allocation: VlanAllocation) -> bool:
    """Put the id into quarantine for the pool's hold-down time. Harmless when already released (also when
    the id was since handed to someone else: the release is bound to this owner and allocation time)."""
    now = timezone.now()
    pool = allocation.pool
    released = VlanAllocation.objects.filter(
        pk=allocation.pk, state=Free.ALLOCATED, owner=allocation.owner, allocated_at=allocation.allocated_at
    ).update(state=Free.QUARANTINED, released_at=now, quarantine_until=now + timedelta(seconds=pool.quarantine_seconds))
    allocation.refresh_from_db()
    if released:
        changes = {
            "state": [Free.ALLOCATED, Free.QUARANTINED],
            "quarantine_until": [None, str(allocation.quarantine_until)],
        }
        audit.record(allocation, "action", changes, "released into quarantine")
    return bool(released)


def pools_for_sites(sites: Iterable[Site | int]) -> QuerySet[VlanPool]:
    """Pools whose core transport joins every one of ``sites`` (all pools for no sites), the pools of the
    widest cores first (the most sites joined, then by name): a cluster that starts at one site may later
    grow or migrate to others only within its core, so a core that reaches only the sites of today is the
    last choice, not the first."""
    site_ids = {s if isinstance(s, int) else s.pk for s in sites}
    pools = VlanPool.objects.select_related("core").annotate(_span=Count("core__sites", distinct=True))
    if site_ids:
        pools = pools.annotate(_joined=Count("core__sites", filter=Q(core__sites__in=site_ids), distinct=True)).filter(
            _joined=len(site_ids)
        )
    return pools.order_by("-_span", "name")


# --- Segments ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    pk: int
    site_id: int


def _checked_hosts(hosts: Iterable[Host], *, members: Iterable[int] = ()) -> list[_Member]:
    """The hosts (id and site; one query, no models: a 16-site cluster checks 16); a disabled one (or behind a
    disabled switch) is refused unless it is one of ``members`` already (a host under maintenance keeps its
    segments, and they may still change elsewhere)."""
    rows = Host.objects.filter(pk__in={h.pk for h in hosts}).values_list(
        "pk", "name", "enabled", "site_id", "switch_port__switch__name", "switch_port__switch__enabled"
    )
    already = set(members)
    checked = []
    for pk, name, enabled, site_id, switch, switch_enabled in rows:
        why = None if pk in already else selectors.host_unavailable_why(name, enabled, switch, switch_enabled)
        if why:
            raise HostUnavailable(why)
        checked.append(_Member(pk, site_id))
    return checked


def _site_names(site_ids: Iterable[int]) -> str:
    return ", ".join(Site.objects.filter(pk__in=set(site_ids)).order_by("name").values_list("name", flat=True))


def _needs(sites: Iterable[int], reach: selectors.GatewayReach, *, gateway: bool) -> str:
    """What a segment's core must join, in words: its hosts' sites, and a gateway site for a closed one (a
    router site for a public one) when there are any."""
    text = f"sites {_site_names(sites)}"
    if gateway and reach.sites:
        text += f" and a site with an access gateway ({_site_names(reach.sites)})"
    elif not gateway and reach.router_sites:
        text += f" and a site with a router trunk ({_site_names(reach.router_sites)})"
    return text


@transaction.atomic
def segment_create(*, owner: str, hosts: list[Host], gateway: bool, pool: VlanPool | None = None) -> Segment:
    """A new segment for ``owner`` on ``hosts`` with a VLAN from a pool whose core joins the hosts' sites
    and, when ``gateway`` (a closed cluster) and access gateways exist, at least one site with a gateway
    (the way in; the segment reaches the gateway sites its core joins, see ``selectors.segment_views``) —
    without ``gateway`` (a public cluster) and when router trunks exist, at least one router site.
    Candidates in ``pools_for_sites``' order (the widest cores first). Nothing is configured yet: start
    ``network.workflows.provision(segment.id)`` after commit.

    Raises ``NoCoreForSites`` (422), ``PoolExhausted`` (409), ``SegmentExists`` (409), ``HostUnavailable``
    (422)."""
    members = _checked_hosts(hosts)
    sites = {h.site_id for h in members}
    if Segment.objects.filter(owner_ref=owner, state__in=Segment.LIVE_STATES).exists():
        raise SegmentExists(f"{owner} already has a network segment")
    candidates = list(pools_for_sites(sites))
    reach = selectors.gateway_reach()  # (a gateway switch disabled now is back later)
    way_in, by_core = (reach.sites, reach.by_core) if gateway else (reach.router_sites, reach.router_by_core)
    if way_in:
        candidates = [p for p in candidates if by_core.get(p.core_id)]
    if pool is not None:
        if pool.pk not in {p.pk for p in candidates}:
            raise NoCoreForSites(
                f"pool {pool.name}: core {pool.core.name} does not join {_needs(sites, reach, gateway=gateway)}"
            )
        candidates = [pool]
    if not candidates:
        raise NoCoreForSites(f"no core transport with a VLAN pool joins {_needs(sites, reach, gateway=gateway)}")
    allocation = None
    for candidate in candidates:
        try:
            allocation = vlan_allocate(pool=candidate, owner=owner)
            break
        except PoolExhausted:
            continue
    if allocation is None:
        names = ", ".join(p.name for p in candidates)
        raise PoolExhausted(f"no free VLAN id for {owner}: pools {names} are exhausted")
    try:
        with transaction.atomic():
            segment = Segment.objects.create(
                owner_ref=owner, allocation=allocation, vid=allocation.vid, gateway=gateway
            )
    except IntegrityError:
        raise SegmentExists(f"{owner} already has a network segment") from None
    audit.create_rows(
        SegmentMember,
        [SegmentMember(segment=segment, host_id=h.pk) for h in members],
        related=SegmentMember.TEXT_RELATED,
    )
    return segment


@transaction.atomic
def segment_set_hosts(*, segment: Segment, hosts: list[Host]) -> Segment:
    """The new set of hosts that need the segment (add, remove, VM migration). The segment goes back to
    PENDING; start ``network.workflows.provision(segment.id)`` after commit to converge the devices
    (the ones it leaves included). Raises ``NoCoreForSites`` when a new site is outside the segment's
    core (the gateway sites it reaches stay what they are: they do not depend on the hosts),
    ``SegmentClosed`` when it is going away."""
    seg = Segment.objects.select_for_update(of=("self",)).select_related("allocation__pool__core").get(pk=segment.pk)
    if seg.state not in Segment.DESIRED_STATES:
        raise SegmentClosed(f"segment of {seg.owner_ref} is {seg.get_state_display()}; its hosts cannot change")
    members = _checked_hosts(hosts, members=SegmentMember.objects.filter(segment=seg).values_list("host_id", flat=True))
    sites = {h.site_id for h in members}
    core = seg.allocation.pool.core
    outside = set(sites) - set(core.sites.values_list("pk", flat=True))
    if outside:
        raise NoCoreForSites(
            f"segment of {seg.owner_ref} (VLAN {seg.vid}): core {core.name} does not reach sites {_site_names(outside)}"
        )
    wanted = {h.pk for h in members}
    left = SegmentMember.objects.filter(segment=seg).exclude(host_id__in=wanted)
    audit.delete_rows(left, related=SegmentMember.TEXT_RELATED)
    have = set(SegmentMember.objects.filter(segment=seg).values_list("host_id", flat=True))
    joined = [SegmentMember(segment=seg, host_id=pk) for pk in sorted(wanted - have)]
    audit.create_rows(SegmentMember, joined, related=SegmentMember.TEXT_RELATED)
    seg.state = Segment.State.PENDING
    seg.revision += 1  # (the row is locked: a provisioning of the revision before does not mark it active)
    seg.save(update_fields=["state", "revision", "updated_at"])
    segment.refresh_from_db()
    return seg


@transaction.atomic
def segment_set_gateway(*, segment: Segment, gateway: bool) -> Segment:
    """Put the segment on the access-gateway trunks (a closed cluster) or take it off them, onto the router
    trunks (public). Like ``segment_set_hosts``: back to PENDING, run ``network.workflows.provision(segment.id)``
    after commit. Raises ``NoCoreForSites`` when there are access gateways (router trunks) and the segment's
    core reaches none of their sites (it reaches those its core joins, as a new segment's does)."""
    seg = Segment.objects.select_for_update(of=("self",)).select_related("allocation__pool__core").get(pk=segment.pk)
    if seg.state not in Segment.DESIRED_STATES:
        raise SegmentClosed(f"segment of {seg.owner_ref} is {seg.get_state_display()}; it cannot change")
    reach = selectors.gateway_reach()  # (as a new segment's way in)
    core = seg.allocation.pool.core
    if gateway and reach.sites and not reach.by_core.get(core.pk):
        raise NoCoreForSites(
            f"segment of {seg.owner_ref} (VLAN {seg.vid}): core {core.name} reaches no site with an access "
            f"gateway ({_site_names(reach.sites)})"
        )
    if not gateway and reach.router_sites and not reach.router_by_core.get(core.pk):
        raise NoCoreForSites(
            f"segment of {seg.owner_ref} (VLAN {seg.vid}): core {core.name} reaches no site with a router "
            f"trunk ({_site_names(reach.router_sites)})"
        )
    if seg.gateway != gateway:
        seg.gateway = gateway
        seg.state = Segment.State.PENDING
        seg.revision += 1
        seg.save(update_fields=["gateway", "state", "revision", "updated_at"])
        if gateway:  # (the owner is in the gateways' maps as soon as its cluster is closed and live)
            vlan_map_to_gateways(allocation_id=seg.allocation_id)
    segment.refresh_from_db()
    return seg


def segments_keeping_vlan() -> QuerySet[Segment]:
    """FAILED segments that still hold the VLAN they were given: their rollback could not clean a device
    that took it (``network.tasks.segment_compensated``), so the id may not go to anyone else yet."""
    return _owning_their_vlan(Segment.State.FAILED)


def segments_holding_vlan() -> QuerySet[Segment]:
    """CLOSED segments that still hold their VLAN: their teardown found a device that may carry it disabled
    (``selectors.vlan_holders``; a disabled device is never touched), so the id may not go to anyone else
    until that device is enabled again and cleaned. And DELETING ones whose teardown stalled (no progress for
    longer than a rollback may take: its worker died, or its chain ended with nobody to hear of it): torn
    down again as well, or they would hold their VLAN for good."""
    stalled = _owning_their_vlan(Segment.State.DELETING).filter(
        updated_at__lt=timezone.now() - rollback_stalled_after()
    )
    return _owning_their_vlan(Segment.State.CLOSED) | stalled


def _owning_their_vlan(*states: str) -> QuerySet[Segment]:
    """Segments in one of ``states`` whose VLAN is still allocated to them."""
    return Segment.objects.filter(state__in=states, allocation__state=Free.ALLOCATED, allocation__owner=F("owner_ref"))


def segment_release_again(*, segment_id: int) -> bool:
    """Claim the teardown of a segment ``segments_holding_vlan`` lists, to run it again (conditionally: of
    two runs, one claims it). Whether this one did."""
    with transaction.atomic():
        return bool(
            segments_holding_vlan()
            .filter(pk=segment_id)
            .update(state=Segment.State.DELETING, updated_at=timezone.now())
        )


def segment_release_undo(*, segment_id: int, reason: str = "") -> None:
    """Undo ``segment_release_again`` when its teardown could not be sent, or failed (``reason``): closed (and
    holding its VLAN) again, for the next run to claim."""
    changes = {"state": Segment.State.CLOSED, "updated_at": timezone.now()}
    if reason:
        changes["error"] = reason[:5000]
    Segment.objects.filter(pk=segment_id, state=Segment.State.DELETING).update(**changes)


def rollback_stalled_after() -> timedelta:
    """How long a rollback may make no progress before it counts as stalled: both of its layers using every
    retry up to the task time limit."""
    return timedelta(seconds=2 * settings.CELERY_TASK_TIME_LIMIT * (settings.DEVICE_RETRY_MAX + 1))


def segments_to_roll_back_again() -> QuerySet[Segment]:
    """Segments whose rollback is to be run again: it kept the VLAN, or it stalled (still rolling back
    long after it started: the worker died before it could hand the work on)."""
    stalled = Segment.objects.filter(
        state=Segment.State.COMPENSATING, updated_at__lt=timezone.now() - rollback_stalled_after()
    )
    return (segments_keeping_vlan() | stalled).order_by("pk")


def segment_rollback_again(*, segment_id: int) -> bool:
    """Claim the rollback of a segment ``segments_to_roll_back_again`` lists (conditionally: of two runs,
    one claims it). Whether this one did (not when its owner has a live segment again: the owner reference
    is unique among those)."""
    try:
        with transaction.atomic():
            claimed = (
                segments_to_roll_back_again()
                .filter(pk=segment_id)
                .update(state=Segment.State.COMPENSATING, updated_at=timezone.now())
            )
    except IntegrityError:
        return False
    return bool(claimed)


@transaction.atomic
def segment_delete(*, segment: Segment) -> Segment:
    """Mark the segment as going away: it leaves the desired state at once. Start
    ``network.workflows.teardown(segment.id)`` after commit to clean the devices and release the VLAN.
    Deleting twice is harmless."""
    seg = Segment.objects.select_for_update(of=("self",)).select_related("allocation").get(pk=segment.pk)
    if seg.state == Segment.State.FAILED and (
        seg.allocation is None or seg.allocation.state != Free.ALLOCATED or seg.allocation.owner != seg.owner_ref
    ):
        # Compensation already cleaned the devices and released the VLAN: nothing left to tear down.
        seg.state = Segment.State.CLOSED
        seg.save(update_fields=["state", "updated_at"])
        audit.delete_rows(SegmentMember.objects.filter(segment=seg), related=SegmentMember.TEXT_RELATED)
    elif seg.state in Segment.DESIRED_STATES + (Segment.State.COMPENSATING, Segment.State.FAILED):
        seg.state = Segment.State.DELETING
        seg.save(update_fields=["state", "updated_at"])
    segment.refresh_from_db()
    return seg


# --- history ----------------------------------------------------------------------------------------------------


def history_prune(*, now: datetime | None = None) -> dict[str, int]:
    """Delete the device history older than ``HISTORY_RETENTION`` days that nothing reads any more: settled
    device changes of no segment (repairs) or of a segment that ended (rolled back or closed) that long ago and
    holds no VLAN (a segment that kept its VLAN still counts its changes: ``selectors.vlan_holders``), and drift
    repaired that long ago. Unfinished work and open drift are never pruned. In batches
    (``portal.pruning``). Returns how many of each went."""
    horizon = (now or timezone.now()) - timedelta(days=settings.HISTORY_RETENTION)
    final = (Segment.State.FAILED, Segment.State.CLOSED)
    ended = (
        Segment.objects.filter(state__in=final, updated_at__lt=horizon)
        .exclude(pk__in=_owning_their_vlan(*final).values("pk"))
        .values("pk")
    )
    changes = DeviceChange.objects.filter(status__in=DeviceChange.FINAL, created_at__lt=horizon).filter(
        Q(segment__isnull=True) | Q(segment__in=ended)
    )
    drift = Drift.objects.filter(repaired_at__lt=horizon)
    return {"device changes": delete_in_batches(changes), "drift": delete_in_batches(drift)}
