"""The desired state of the network, computed from the database alone.

For every switch: the exact set of VLAN ids each owned port must carry —

- a host trunk: the VLANs of the segments that have the host behind it as a member;
- a core uplink: the VLANs of segments drawn from that core's pools that span more than one site, when
  the switch's site is one of them (the core carries the VLAN between the sites; a single-site segment
  never leaves its site);
- an access-gateway trunk: the VLANs of segments with ``gateway`` (closed clusters) whose core joins its site;
- a router trunk (toward the provider's router): the VLANs of segments without ``gateway`` (public clusters,
  routed by the provider) whose core joins its site.

For every host: the set of VLANs it needs a bridge for (segments it is a member of).

Only segments in ``Segment.DESIRED_STATES`` count: a segment being torn down or rolled back is left out,
which is how VLANs are removed. The same functions serve provisioning, teardown, compensation, dry-run
plans and the reconciler.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Exists, F, Max, OuterRef, Q, QuerySet

from network import vlanranges
from network.choices import PortRole
from network.models import (
    DeviceChange,
    DeviceKind,
    Drift,
    Host,
    Segment,
    SegmentMember,
    Switch,
    SwitchPort,
    VlanAllocation,
    VlanPool,
)

PortVlans = dict[str, frozenset[int]]


@dataclass(frozen=True)
class SegmentView:
    """What the desired state needs to know of one segment."""

    id: int
    owner_ref: str
    vid: int
    core_id: int
    gateway: bool
    hosts: frozenset[int]  # member host ids
    host_ports: frozenset[int]  # the host trunks (switch port ids) of the members
    sites: frozenset[int]  # member sites, plus the gateway sites (``gateway``) or router sites its core joins
    # the switches it is on: those of its members' host trunks, and those with a gateway (router) trunk at the
    # sites its core joins; more than one, and the core uplinks join them, even at a single site
    switches: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Footprint:
    """The devices a segment needs (or touched)."""

    switches: frozenset[int]
    hosts: frozenset[int]

    def __or__(self, other: Footprint) -> Footprint:
        return Footprint(self.switches | other.switches, self.hosts | other.hosts)


@dataclass(frozen=True)
class GatewayReach:
    """The sites with an access-gateway trunk on an enabled switch and which of them each core joins (``sites``,
    ``by_core``); the same for the trunks toward the provider's routers (``router_sites``, ``router_by_core``); the
    switches with such a trunk at each site (``switches_by_site``, ``router_switches_by_site``)."""

    sites: frozenset[int]
    by_core: dict[int, frozenset[int]]
    router_sites: frozenset[int] = frozenset()
    router_by_core: dict[int, frozenset[int]] = field(default_factory=dict)
    switches_by_site: dict[int, frozenset[int]] = field(default_factory=dict)
    router_switches_by_site: dict[int, frozenset[int]] = field(default_factory=dict)


def gateway_reach(*, enabled_only: bool = False) -> GatewayReach:
    """``GatewayReach`` now, in one query: of every switch's gateway and router trunks — where a segment's way in
    is, also at a gateway switch disabled for maintenance (it is back later, still forwarding meanwhile: the core
    uplinks toward its site keep the VLANs; a disabled switch itself is never touched, and a closed cluster made
    meanwhile on a core that joins no gateway site would have no way in then); with ``enabled_only`` of the
    enabled switches' only. The desired state took the enabled ones: disabling the gateway's switch took the
    closed clusters' VLANs off the other sites' uplinks (the reconciler removed them as stale)."""
    by_role: dict[str, tuple[set[int], dict[int, set[int]], dict[int, set[int]]]] = {
        PortRole.GATEWAY_TRUNK: (set(), defaultdict(set), defaultdict(set)),
        PortRole.ROUTER_TRUNK: (set(), defaultdict(set), defaultdict(set)),
    }
    trunks = SwitchPort.objects.filter(role__in=list(by_role))
    if enabled_only:
        trunks = trunks.filter(switch__enabled=True)
    for role, switch_id, site_id, core_id in trunks.values_list(
        "role", "switch_id", "switch__site_id", "switch__site__core_transports"
    ):
        sites, by_core, switches = by_role[role]
        sites.add(site_id)
        switches[site_id].add(switch_id)
        if core_id is not None:
            by_core[core_id].add(site_id)
    (gw_sites, gw_cores, gw_switches), (rt_sites, rt_cores, rt_switches) = (
        by_role[PortRole.GATEWAY_TRUNK],
        by_role[PortRole.ROUTER_TRUNK],
    )

    def frozen(mapping: dict[int, set[int]]) -> dict[int, frozenset[int]]:
        return {key: frozenset(found) for key, found in mapping.items()}

    return GatewayReach(
        sites=frozenset(gw_sites),
        by_core=frozen(gw_cores),
        router_sites=frozenset(rt_sites),
        router_by_core=frozen(rt_cores),
        switches_by_site=frozen(gw_switches),
        router_switches_by_site=frozen(rt_switches),
    )


def segment_views(segments, *, gateway: GatewayReach | None = None) -> list[SegmentView]:
    """Views of ``segments`` (a queryset) that hold a VLAN, whatever their state (``gateway``: the caller's
    ``gateway_reach()``, when it has it)."""
    rows = list(
        segments.filter(allocation__isnull=False).values_list(
            "id", "owner_ref", "allocation__vid", "allocation__pool__core_id", "gateway"
        )
    )
    if not rows:
        return []
    hosts: dict[int, set[int]] = defaultdict(set)
    ports: dict[int, set[int]] = defaultdict(set)
    sites: dict[int, set[int]] = defaultdict(set)
    switches: dict[int, set[int]] = defaultdict(set)
    for seg_id, host_id, site_id, port_id, switch_id in SegmentMember.objects.filter(
        segment_id__in=[r[0] for r in rows]
    ).values_list("segment_id", "host_id", "host__site_id", "host__switch_port_id", "host__switch_port__switch_id"):
        hosts[seg_id].add(host_id)
        ports[seg_id].add(port_id)
        sites[seg_id].add(site_id)
        switches[seg_id].add(switch_id)
    # A closed segment reaches the gateway sites its core joins, a public one the router sites: a trunk added
    # later at a site the core does not reach never gets the VLAN — the id may be another core's cluster there
    # (pools of cores without a common site may overlap), and the two would meet on that switch.
    reach = gateway or gateway_reach()
    views = []
    for seg_id, owner, vid, core_id, closed in rows:
        trunk_sites = (reach.by_core if closed else reach.router_by_core).get(core_id, frozenset())
        trunk_switches = reach.switches_by_site if closed else reach.router_switches_by_site
        views.append(
            SegmentView(
                id=seg_id,
                owner_ref=owner,
                vid=vid,
                core_id=core_id,
                gateway=closed,
                hosts=frozenset(hosts[seg_id]),
                host_ports=frozenset(ports[seg_id]),
                sites=frozenset(sites[seg_id]) | trunk_sites,
                switches=frozenset(switches[seg_id]).union(*(trunk_switches.get(site, ()) for site in trunk_sites)),
            )
        )
    return views


def desired_segments(
    *, switch_ids: Iterable[int] | None = None, host_ids: Iterable[int] | None = None
) -> list[SegmentView]:
    """The segments the devices must carry now: all of them, or, given ``switch_ids`` and/or ``host_ids``,
    only those that can reach these devices — the desired state of these devices is the same, and the work
    does not grow with the number of live clusters elsewhere. A switch is reached by a segment with a member
    behind one of its ports or at its site (host trunks, core uplink) and, when it is at a gateway site, by
    every closed segment (at a router site, every public one); a host by a segment it is a member of."""
    segments = Segment.objects.filter(state__in=Segment.DESIRED_STATES)
    if switch_ids is None and host_ids is None:
        return segment_views(segments)
    members = Q(pk__in=[])  # which memberships make a segment reach the devices
    closed = public = False  # whether every closed (public) segment does
    gateway = None
    if switch_ids:
        switch_ids = list(switch_ids)
        gateway_port = SwitchPort.objects.filter(switch=OuterRef("pk"), role=PortRole.GATEWAY_TRUNK)
        router_port = SwitchPort.objects.filter(switch=OuterRef("pk"), role=PortRole.ROUTER_TRUNK)
        rows = list(
            Switch.objects.filter(pk__in=switch_ids).values_list("site_id", Exists(gateway_port), Exists(router_port))
        )
        sites = {site for site, _has_gateway, _has_router in rows}
        members |= Q(host__switch_port__switch_id__in=switch_ids) | Q(host__site_id__in=sites)
        gateway = gateway_reach()
        closed = bool(sites & gateway.sites) or any(has_gateway for _site, has_gateway, _r in rows)
        public = bool(sites & gateway.router_sites) or any(has_router for _site, _g, has_router in rows)
    if host_ids:
        members |= Q(host_id__in=list(host_ids))
    reach = Q(pk__in=SegmentMember.objects.filter(members).values("segment_id"))
    if closed:
        reach |= Q(gateway=True)
    if public:
        reach |= Q(gateway=False)
    return segment_views(segments.filter(reach), gateway=gateway)


def switch_desired(
    switch_ids: Iterable[int] | None = None,
    *,
    segments: list[SegmentView] | None = None,
    static: bool = True,
    port_statics: dict[int, dict[str, frozenset[int]]] | None = None,
) -> dict[int, PortVlans]:
    """For each switch (all, or ``switch_ids``: ids, or a queryset of them, read as a subquery): owned port
    name → the VLANs it must carry (every owned port is listed, an empty set meaning "carry none of the
    portal's VLANs"): the clusters' and, unless ``static`` is False (only the clusters' VLANs: what a
    segment or a live cluster needs), the port's static VLANs. ``port_statics``, when given, is filled with
    switch id → port name → that port's static VLANs (what its ``SwitchSpec`` says, read in the same query)."""
    if segments is not None:
        views = segments
    else:
        views = desired_segments(switch_ids=None if switch_ids is None else list(switch_ids))
    ports = SwitchPort.objects.all()
    if isinstance(switch_ids, QuerySet):  # a subquery of switch ids: no list of its own
        ports, switch_ids = ports.filter(switch_id__in=switch_ids), None
    elif switch_ids is not None:
        switch_ids = list(switch_ids)
        ports = ports.filter(switch_id__in=switch_ids)
    by_host_port: dict[int, set[int]] = defaultdict(set)
    by_core_site: dict[tuple[int, int], set[int]] = defaultdict(set)
    gateway_by_site: dict[int, set[int]] = defaultdict(set)  # a closed segment's VLAN at the sites it reaches
    router_by_site: dict[int, set[int]] = defaultdict(set)  # a public segment's
    for view in views:
        for port_id in view.host_ports:
            by_host_port[port_id].add(view.vid)
        # the core joins the switches it is on: those at several sites, and two switches at one site (hosts
        # behind each, or its gateway trunk on another switch than its hosts) that meet only through their uplinks
        if len(view.sites) > 1 or len(view.switches) > 1:
            for site_id in view.sites:
                by_core_site[(view.core_id, site_id)].add(view.vid)
        for site_id in view.sites:
            (gateway_by_site if view.gateway else router_by_site)[site_id].add(view.vid)
    result: dict[int, PortVlans] = {pk: {} for pk in (switch_ids or ())}
    for port_id, switch_id, name, role, core_id, site_id, fixed in ports.values_list(
        "id", "switch_id", "name", "role", "core_id", "switch__site_id", "static_vlans"
    ):
        if role == PortRole.HOST_TRUNK:
            vids = by_host_port.get(port_id, set())
        elif role == PortRole.CORE_UPLINK:
            vids = by_core_site.get((core_id, site_id), set())
        elif role == PortRole.GATEWAY_TRUNK:
            vids = gateway_by_site.get(site_id, set())
        elif role == PortRole.ROUTER_TRUNK:
            vids = router_by_site.get(site_id, set())
        else:  # a role this code does not know: never put anything on it
            vids = set()
        if fixed:
            ids = frozenset(vlanranges.parse_static(fixed))
            if static:
                vids = vids | ids
            if port_statics is not None:
                port_statics.setdefault(switch_id, {})[name] = ids
        result.setdefault(switch_id, {})[name] = frozenset(vids)
    return result


def host_desired(
    host_ids: Iterable[int] | None = None, *, segments: list[SegmentView] | None = None
) -> dict[int, frozenset[int]]:
    """For each host (all, or ``host_ids``): the VLANs it needs a bridge for."""
    if segments is not None:
        views = segments
    else:
        views = desired_segments(host_ids=None if host_ids is None else list(host_ids))
    if host_ids is None:
        host_ids = Host.objects.values_list("pk", flat=True)
    wanted: dict[int, set[int]] = {pk: set() for pk in host_ids}
    for view in views:
        for host_id in view.hosts:
            if host_id in wanted:
                wanted[host_id].add(view.vid)
    return {pk: frozenset(vids) for pk, vids in wanted.items()}


def segment_footprint(segment: Segment) -> Footprint:
    """The devices whose desired state includes ``segment`` when it is wanted (whatever its state now)."""
    views = segment_views(Segment.objects.filter(pk=segment.pk))
    if not views:
        return Footprint(frozenset(), frozenset())
    # only the switches the segment can reach (at its sites, or behind its hosts), not the whole inventory
    reach = Switch.objects.filter(Q(site_id__in=views[0].sites) | Q(ports__in=views[0].host_ports))
    per_switch = switch_desired(reach.values_list("pk", flat=True), segments=views, static=False)
    return Footprint(
        switches=frozenset(pk for pk, ports in per_switch.items() if any(ports.values())),
        hosts=views[0].hosts,
    )


def touched_devices(segment: Segment) -> Footprint:
    """The devices any change for ``segment`` was recorded on (what a rollback must look at)."""
    rows = DeviceChange.objects.filter(segment=segment).values_list("kind", "switch_id", "host_id").distinct()
    switches = frozenset(s for kind, s, _h in rows if kind == DeviceKind.SWITCH and s)
    hosts = frozenset(h for kind, _s, h in rows if kind == DeviceKind.HOST and h)
    return Footprint(switches, hosts)


def left_untouched(segment_id: int) -> tuple[str, int] | None:
    """(device, change id) of a change of the PENDING segment ``segment_id`` that settled untouched (its device
    was disabled when the change ran) on a device the segment needs: that device never got the VLAN. One an
    earlier workflow left behind no longer counts once its device took a later change that settled (enabled
    again, converged since), or once the segment no longer needs the device (its node moved away, the device
    left the inventory). None when there is none (one query; the footprint's only when there is one)."""
    later = DeviceChange.objects.filter(
        Q(switch_id=OuterRef("switch_id")) | Q(host_id=OuterRef("host_id")),
        segment_id=segment_id,
        kind=OuterRef("kind"),
        pk__gt=OuterRef("pk"),
        status__in=(DeviceChange.Status.OK, DeviceChange.Status.NOOP),
    ).exclude(error=DeviceChange.NOT_TOUCHED)
    candidates = list(
        DeviceChange.objects.filter(
            segment_id=segment_id, error=DeviceChange.NOT_TOUCHED, segment__state=Segment.State.PENDING
        )
        .exclude(Exists(later))
        .order_by("device")
        .values_list("device", "pk", "kind", "switch_id", "host_id")
    )
    if not candidates:
        return None
    footprint = segment_footprint(Segment.objects.get(pk=segment_id))
    needed = {DeviceKind.SWITCH: footprint.switches, DeviceKind.HOST: footprint.hosts}
    for device, pk, kind, switch_id, host_id in candidates:
        if (switch_id if kind == DeviceKind.SWITCH else host_id) in needed[kind]:
            return device, pk
    return None


NOT_ROLLED_BACK = "; not rolled back (VLAN kept): "  # how a failed segment's error names what kept its VLAN


def segment_compensating(segment_id: int | None) -> bool:
    """Whether segment ``segment_id``'s rollback is running (claimed, its devices not all tried yet)."""
    return segment_id is not None and Segment.objects.filter(pk=segment_id, state=Segment.State.COMPENSATING).exists()


def rollback_kept(segment_id: int | None) -> str:
    """ "" when the rollback of segment ``segment_id`` gave its VLAN back (or there is none); otherwise what
    kept it, from the segment's error: "VLAN 203 kept: prague-h2: <its message>" (``retry_rollbacks``
    tries again until every device is clean)."""
    row = (
        Segment.objects.filter(pk=segment_id, state=Segment.State.FAILED)
        .values_list("vid", "error", "allocation__state", "allocation__owner", "owner_ref")
        .first()
    )
    if row is None:
        return ""
    vid, error, allocation_state, allocation_owner, owner = row
    if allocation_state != VlanAllocation.State.ALLOCATED or allocation_owner != owner:
        return ""
    return f"VLAN {vid} kept: {error.partition(NOT_ROLLED_BACK)[2] or 'a device may carry it'}"


def _may_have_applied() -> Q:
    """Device changes that may have left their segment's VLAN on the device: settled on it while it was enabled
    (it took the VLAN, or was converged while the segment was on it), failed in a way that may have applied part
    of it (all but a switch that refused it outright, and a change never started: abandoned with its workflow),
    or a session started that never finished."""
    status = DeviceChange.Status
    return (
        (Q(status__in=(status.OK, status.NOOP)) & ~Q(error=DeviceChange.NOT_TOUCHED))
        | Q(status=status.FAILED, refused=False, started_at__isnull=False)
        | Q(status__in=DeviceChange.OPEN, started_at__isnull=False)
    )


def teardown_cause(owner_ref: str) -> str:
    """The cause of a teardown's device changes (``workflows.teardown``)."""
    return f"teardown {owner_ref}"


def compensation_cause(owner_ref: str) -> str:
    """The cause of a rollback's device changes (``tasks.segment_compensate``)."""
    return f"compensate {owner_ref}"


def vlan_holders(segment: Segment) -> list[str]:
    """Disabled devices that may still carry ``segment``'s VLAN: a change for the segment settled on them
    while they were enabled (they took the VLAN, or were converged while the segment was on them), failed
    in a way that may have applied part of it (all but a switch that refused it outright), or had a session
    started that never finished (the device was disabled under it) — and a disabled device is never touched,
    so nothing took it away since. Not one the segment's teardown or rollback cleaned after that (a change of
    theirs that ended OK on the device itself, later than every change that may have left the VLAN): it was
    disabled once clean. While there is one, the id may go to no other owner (the two would share it on that
    device). ``["switch sw-x", "host h1"]``; a device that left the inventory holds nothing."""
    cleaning = (teardown_cause(segment.owner_ref), compensation_cause(segment.owner_ref))
    cleaned = Q(cause__in=cleaning, status__in=(DeviceChange.Status.OK, DeviceChange.Status.NOOP)) & ~Q(
        error=DeviceChange.NOT_TOUCHED
    )
    changes = DeviceChange.objects.filter(segment=segment)
    took, clean = changes.filter(_may_have_applied()).exclude(cleaned), changes.filter(cleaned)
    holders = []
    for label, model, column in (("switch", Switch, "switch_id"), ("host", Host, "host_id")):
        last_took = dict(
            took.filter(**{f"{column}__isnull": False})
            .values(column)
            .annotate(last=Max("pk"))
            .values_list(column, "last")
        )
        last_clean = dict(
            clean.filter(**{f"{column}__in": list(last_took)})
            .values(column)
            .annotate(last=Max("pk"))
            .values_list(column, "last")
        )
        disabled = model.objects.filter(enabled=False, pk__in=list(last_took)).order_by("name")
        holders += [
            f"{label} {name}"
            for pk, name in disabled.values_list("pk", "name")
            if last_clean.get(pk, 0) < last_took[pk]
        ]
    return holders


def vlan_not_cleaned(segment: Segment, cause: str, *, known: Iterable[tuple[str, int]] = ()) -> list[str]:
    """Enabled devices that may carry ``segment``'s VLAN (a change of the segment of another cause may have
    applied it, as ``vlan_holders`` counts) but that the workflow ``cause`` (its teardown, its rollback — every
    run of it shares the cause) did not clean: the device's latest change for the segment is not one of
    ``cause`` that ended OK on the device itself (not "disabled: not touched"). So: a device disabled when the
    workflow was built and enabled again before it ended (no change, or one settled untouched), or one an
    earlier run failed on and a later run left out. Not a disabled holder any more either; the VLAN stays with
    the segment (``retry_rollbacks`` runs the workflow again, which cleans them now). ``["switch sw-x", ...]``,
    without the ``known`` ones (("switch" | "host", pk): those the caller reports already)."""
    known = set(known)
    changes = DeviceChange.objects.filter(segment=segment)
    took = changes.filter(_may_have_applied()).exclude(cause=cause)
    settled = (DeviceChange.Status.OK, DeviceChange.Status.NOOP)
    left = []
    for label, model, column in (("switch", Switch, "switch_id"), ("host", Host, "host_id")):
        devices = model.objects.filter(enabled=True, pk__in=took.filter(**{f"{column}__isnull": False}).values(column))
        names = dict(devices.values_list("pk", "name"))
        latest: dict[int, tuple] = {}
        rows = changes.filter(**{f"{column}__in": list(names)}).order_by("pk")
        for device, change_cause, status, error in rows.values_list(column, "cause", "status", "error"):
            latest[device] = (change_cause, status, error)
        for pk, name in sorted(names.items(), key=lambda item: item[1]):
            if (label, pk) in known:
                continue
            change_cause, status, error = latest[pk]
            if not (change_cause == cause and status in settled and error != DeviceChange.NOT_TOUCHED):
                left.append(f"{label} {name}")
    return left


def segment_devices(segment: Segment) -> tuple[list[Switch], list[Host]]:
    """Enabled switches and hosts to converge for ``segment``: what it needs plus what it touched before
    (so that a host it left, or a switch at a site it left, is cleaned too)."""
    devices = segment_footprint(segment) | touched_devices(segment)
    # Only what a workflow records and routes by: the name, the worker queue and the site's, which ``queue``
    # falls back to (not the drivers' settings: a switch's password would be decrypted for nothing).
    switches = Switch.objects.filter(pk__in=devices.switches, enabled=True).only(
        "name", "worker_queue", "site__worker_queue"
    )
    hosts = Host.objects.filter(pk__in=devices.hosts, enabled=True).only("name", "agent_queue", "site__worker_queue")
    return list(switches.select_related("site").order_by("name")), list(hosts.select_related("site").order_by("name"))


def known_vids(vids: Iterable[int]) -> frozenset[int]:
    """Of ``vids``, those the portal ever gave a segment (to tell a stale VLAN from a foreign one). Asked only
    about the VLANs a device carries beyond its desired state (usually none), through the index on the segments'
    ids: segments are kept for good, and the reconciler asks for every device every interval."""
    vids = sorted(set(vids))
    if not vids:
        return frozenset()
    return frozenset(Segment.objects.filter(vid__in=vids).values_list("vid", flat=True).distinct())


def queue_name(device: Switch | Host) -> str:
    """The name of the queue ``device``'s operations go to: its ``queue``, or the central worker's."""
    return device.queue or settings.CELERY_TASK_DEFAULT_QUEUE


def device_queues() -> dict[str, list[str]]:
    """Every worker queue the enabled devices need (by name, the central worker's included): queue → the
    devices (``switch X``, ``host Y``) whose operations go there."""
    queues: dict[str, list[str]] = defaultdict(list)
    for kind, model in (("switch", Switch), ("host", Host)):
        for device in model.objects.filter(enabled=True).select_related("site").order_by("name"):
            queues[queue_name(device)].append(f"{kind} {device.name}")
    return dict(queues)


def core_site_users(core_id: int, sites: Iterable[int], vids: tuple[int, int] | None = None) -> list[str]:
    """Why core ``core_id`` must keep joining the sites it joins now but ``sites`` (the ids it would join)
    leaves out — core uplinks of switches there, and live segments of its pools that span them — and
    (``vids``: the range it would carry) keep carrying the VLANs of its pools' live segments."""
    keep = set(sites)
    users = [
        f"core uplink {port}"
        for port in SwitchPort.objects.filter(role=PortRole.CORE_UPLINK, core_id=core_id)
        .exclude(switch__site_id__in=keep)
        .select_related("switch__site")
    ]
    live = Segment.objects.filter(state__in=Segment.LIVE_STATES, allocation__pool__core_id=core_id)
    users += [
        f"live segment {view.owner_ref} (VLAN {view.vid})"
        for view in segment_views(live)
        if not view.sites <= keep or (vids is not None and not vids[0] <= view.vid <= vids[1])
    ]
    return users


def ports_carrying(port_ids: Iterable[int], *, leaving_switches: Iterable[int] = ()) -> dict[int, frozenset[int]]:
    """Of these ports, those that carry VLANs of live segments now (port id → the VLANs), counting segments
    being torn down or rolled back (their VLANs stay on the devices until that finishes): a port the portal
    forgets while it carries them would keep them on the device for ever (nothing converges it again). And a
    failed or closed segment that still holds its VLAN (its rollback or teardown could not clean a device:
    ``network.services.segments_keeping_vlan``/``segments_holding_vlan``) may still have it on any port of a
    switch where one of its changes may have applied: the next run cleans owned ports only, then releases the
    VLAN to the next cluster. But for the ports of ``leaving_switches`` (switch ids being deleted whole) that are
    disabled: deleting a dead switch is how such a VLAN is let go (``vlan_holders``: a device that left the
    inventory holds nothing)."""
    ports = list(SwitchPort.objects.filter(pk__in=list(port_ids)).values_list("pk", "switch_id", "name"))
    if not ports:
        return {}
    views = segment_views(Segment.objects.filter(state__in=Segment.LIVE_STATES))
    carried = switch_desired(list({switch for _pk, switch, _name in ports}), segments=views, static=False)
    found = {pk: set(carried.get(switch, {}).get(name, ())) for pk, switch, name in ports}
    applied = (
        DeviceChange.objects.filter(
            _may_have_applied(), segment__in=_ended_holding(), switch_id__in={switch for _pk, switch, _name in ports}
        )
        .exclude(switch_id__in=list(leaving_switches), switch__enabled=False)
        .values_list("switch_id", "segment__vid")
    )
    held: dict[int, set[int]] = defaultdict(set)
    for switch, vid in applied:
        held[switch].add(vid)
    for pk, switch, _name in ports:
        found[pk] |= held.get(switch, set())
    return {pk: frozenset(vids) for pk, vids in found.items() if vids}


def hosts_unavailable(host_ids: Iterable[int]) -> dict[int, str]:
    """Of these hosts, those the network cannot be brought to now, with why: disabled, or behind a disabled
    switch (convergence never touches a disabled device: a node there would be ready with no network). One
    query."""
    rows = Host.objects.filter(pk__in=set(host_ids)).values_list(
        "pk", "name", "enabled", "switch_port__switch__name", "switch_port__switch__enabled"
    )
    return {pk: why for pk, *row in rows if (why := host_unavailable_why(*row))}


def host_unavailable_why(name: str, enabled: bool, switch: str, switch_enabled: bool) -> str | None:
    """Why the network cannot be brought to host ``name`` (enabled or not, behind ``switch``), or None."""
    if not enabled:
        return f"host {name} is disabled"
    if not switch_enabled:
        return f"host {name}: its switch {switch} is disabled"
    return None


def _ended_holding() -> QuerySet[Segment]:
    """Failed or closed segments that still hold their VLAN (``network.services.segments_keeping_vlan`` and
    ``segments_holding_vlan``): a device one of their changes may have applied on may still carry it."""
    return Segment.objects.filter(
        state__in=(Segment.State.FAILED, Segment.State.CLOSED),
        allocation__state=VlanAllocation.State.ALLOCATED,
        allocation__owner=F("owner_ref"),
    )


def host_vlans_held(host_id: int) -> frozenset[int]:
    """The VLANs host ``host_id`` is in now: of live segments (its members' nodes), and of failed or closed ones
    that still hold their VLAN and may have left it there (a change of theirs that may have applied on it: the
    next run of their rollback or teardown converges the host as it is recorded)."""
    live = SegmentMember.objects.filter(host_id=host_id, segment__state__in=Segment.LIVE_STATES)
    left = DeviceChange.objects.filter(_may_have_applied(), segment__in=_ended_holding(), host_id=host_id)
    return frozenset(live.values_list("segment__vid", flat=True)).union(left.values_list("segment__vid", flat=True))


def pool_usage(pools: Iterable[VlanPool]) -> dict[int, dict[str, int]]:
    """VLAN ids of each pool now, by pool id: ``size`` (its ranges minus reserved), ``free`` (what an
    allocation may take now: the allocator's own rule, ``services.free_now``), ``allocated`` and
    ``quarantined`` (held back: the hold-down time, or an access gateway's state that may still map them) — of
    the ids inside its ranges (one a range no longer holds, still held until it is released, counts for none).
    One query, whatever the number of pools."""
    from django.utils import timezone

    from network.services import free_now, reuse_horizon

    pools = list(pools)
    now = timezone.now()
    held = (
        VlanAllocation.objects.filter(pool__in=[p.pk for p in pools])
        .exclude(free_now(now, reuse_horizon(now)))
        .values_list("pool_id", "vid", "state")
    )
    counts: dict[int, dict[str, int]] = {}
    valid = {p.pk: set(p.vlan_ids) for p in pools}
    for pool_id, vid, state in held:
        if vid in valid[pool_id]:
            kind = "allocated" if state == VlanAllocation.State.ALLOCATED else "quarantined"
            counts.setdefault(pool_id, {}).setdefault(kind, 0)
            counts[pool_id][kind] += 1
    usage = {}
    for pool in pools:
        allocated = counts.get(pool.pk, {}).get("allocated", 0)
        quarantined = counts.get(pool.pk, {}).get("quarantined", 0)
        size = len(valid[pool.pk])
        usage[pool.pk] = {
            "size": size,
            "free": size - allocated - quarantined,
            "allocated": allocated,
            "quarantined": quarantined,
        }
    return usage


@dataclass(frozen=True)
class DeviceStatus:
    """One device of a segment's network, as its owner follows it: whether the segment wants it now (or it only
    carried it before and is cleaned), its last change for the segment, and its open drift on the VLAN."""

    kind: str
    name: str
    site: str
    wanted: bool
    enabled: bool
    status: str  # the last change's status, or "none": no change recorded yet
    changed_at: object
    error: str
    drift: list


def segment_status(segment: Segment) -> list[DeviceStatus]:
    """The devices of ``segment``'s network — those its desired state includes now and those a change for it was
    recorded on — switches first, by name, each with its last change for the segment and the open drift that
    concerns its VLAN while the segment wants it (after, the id may be another segment's). A fixed number of
    queries, whatever the number of devices."""
    wanted = (
        segment_footprint(segment) if segment.state in Segment.DESIRED_STATES else Footprint(frozenset(), frozenset())
    )
    devices = wanted | touched_devices(segment)
    last: dict[tuple[str, int], DeviceChange] = {}
    changes = (
        DeviceChange.objects.filter(segment=segment)
        .order_by("id")
        .only("kind", "switch_id", "host_id", "status", "finished_at", "created_at", "error")
    )
    for change in changes:
        last[(change.kind, change.switch_id or change.host_id)] = change
    open_drift = Drift.objects.filter(repaired_at=None).filter(
        Q(switch_id__in=devices.switches) | Q(host_id__in=devices.hosts)
    )
    drift: dict[tuple[str, int], list[Drift]] = {}
    for row in open_drift.order_by("device", "port", "kind"):
        if (
            segment.vid is not None
            and segment.state in Segment.DESIRED_STATES
            and vlanranges.holds(row.vlans, segment.vid)
        ):
            drift.setdefault((row.device_kind, row.switch_id or row.host_id), []).append(row)
    out = []
    for kind, model, ids, wanted_ids in (
        (DeviceKind.SWITCH, Switch, devices.switches, wanted.switches),
        (DeviceKind.HOST, Host, devices.hosts, wanted.hosts),
    ):
        for device in (
            model.objects.filter(pk__in=ids)
            .select_related("site")
            .order_by("name")
            .only("name", "enabled", "site__name")
        ):
            change = last.get((kind, device.pk))
            out.append(
                DeviceStatus(
                    kind=kind,
                    name=device.name,
                    site=device.site.name,
                    wanted=device.pk in wanted_ids,
                    enabled=device.enabled,
                    status=change.status if change else "none",
                    changed_at=(change.finished_at or change.created_at) if change else None,
                    error=change.error if change else "",
                    drift=drift.get((kind, device.pk), []),
                )
            )
    return out
