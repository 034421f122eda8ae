"""Reads of clusters: who may see what, with the related rows each list needs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import Group
from django.db.models import Exists, F, OuterRef, Prefetch, Q, QuerySet

from clusters.errors import EventsPruned
from clusters.models import (
    ACTIVE_STATES,
    LIVE_STATES,
    SETTLED_STATES,
    STATE_CHANNEL,
    ClusterEvent,
    ClusterState,
    ClusterStep,
    Connectivity,
    EventHorizon,
    Image,
    Node,
    NodeState,
    PublicSubnetLease,
    Quota,
    StepStatus,
    VirtualCluster,
    address_key,
)
from portal.models import ApiToken, TokenScope
from portal.notify import wait_for
from portal.tokens import staff_may  # noqa: F401 (the clusters' callers name it here)

# --- who acts as an administrator: what the Django admin grants, and the middleware -------------------------------

#: the models a token with ``clusters:manage`` (the middleware) sees and changes for every user, whoever holds it;
#: on any other (credentials) it is as strong as its user's permissions
MIDDLEWARE_MODELS = (VirtualCluster, Image)


def _as_admin(request, action: str, model) -> bool:
    token = getattr(request, "auth", None)
    if isinstance(token, ApiToken):  # an admin's token is only as strong as its scopes
        if not token.has_scope(TokenScope.CLUSTERS_MANAGE):
            return False
        if model in MIDDLEWARE_MODELS:
            return True
    return staff_may(request.user, action, model)


def sees_all(request, model=VirtualCluster) -> bool:
    """Whether the caller sees every user's rows of ``model``: middleware (a token with ``clusters:manage``:
    clusters and images), or a user the admin lets view them (``staff_may``) — in the browser, or through a
    token with ``clusters:manage``. Through a token with ``clusters:read`` or ``clusters:write`` an admin sees
    their own, like anyone."""
    return _as_admin(request, "view", model)


def acts_on_all(request, model=VirtualCluster) -> bool:
    """Whether the caller changes every user's rows of ``model`` (tears clusters down, changes their lifetime
    and nodes, overrides the policy, certifies their nodes; revokes credentials): as ``sees_all``, with the
    model's ``change`` permission — what the admin's actions ask for. A staff member who may only view sees
    others' clusters but changes only their own."""
    return _as_admin(request, "change", model)


def owner_in_group(prefix: str = "") -> Exists:
    """Whether a cluster's owner is a member of its group (``prefix``: the path to the cluster, "cluster__")."""
    from django.contrib.auth import get_user_model

    return Exists(
        get_user_model().groups.through.objects.filter(
            user_id=OuterRef(f"{prefix}owner_id"), group_id=OuterRef(f"{prefix}group_id")
        )
    )


def shared_with(user, prefix: str = "") -> Q:
    """Clusters shared with ``user`` through a group (``prefix``: the path to the cluster, "cluster__"): the
    cluster's group is one of theirs, and its owner is still a member of it — an owner who leaves the group
    takes the share along (as for images), and the group's people lose the cluster as a member who leaves does."""
    return Q(**{f"{prefix}group__in": user.groups.values("pk")}) & Q(owner_in_group(prefix))


def clusters_visible(request) -> QuerySet[VirtualCluster]:
    """Middleware tokens (clusters:manage) and admins who may view clusters see every cluster (``sees_all``); a
    user sees their own clusters and their groups' clusters (``shared_with``)."""
    qs = (
        VirtualCluster.objects.select_related("owner", "group", "image", "segment")
        # the MTU of the VLAN's core, for the nodes' attachments (one join, no query per node)
        .annotate(core_mtu=F("segment__allocation__pool__core__mtu"))
    ).prefetch_related(
        Prefetch("nodes", queryset=Node.objects.exclude(state=NodeState.REMOVED).select_related("host", "target_host")),
        Prefetch("steps", queryset=ClusterStep.objects.order_by("started_at", "id")),
    )
    user = request.user
    if sees_all(request, VirtualCluster):
        return qs
    return qs.filter(Q(owner=user) | shared_with(user))


def images_usable(user) -> QuerySet[Image]:
    """The images ``user`` may boot clusters from: the provider's catalogue (no owner), their own, and those
    shared with one of their groups — while their owner is still a member of it (one who left takes the share
    along, as leaving a group ends access to its clusters); not retired."""
    shared = Q(group__in=user.groups.all(), owner__groups=F("group"))
    return Image.objects.filter(Q(owner__isnull=True) | Q(owner=user) | shared, retired_at__isnull=True).distinct()


def images_visible(request) -> QuerySet[Image]:
    """Images the caller sees: every one that is not retired for middleware and admins who may view images
    (``sees_all``: they name images for any owner), ``images_usable`` for anyone else."""
    everyone = sees_all(request, Image)
    qs = Image.objects.filter(retired_at__isnull=True) if everyone else images_usable(request.user)
    return qs.select_related("owner", "group")


def image_may_change(request, image: Image) -> bool:
    """Owners change and delete their own images, middleware and admins who may change images (``acts_on_all``)
    any user-provided one; the provider's catalogue is changed in the admin only."""
    if image.owner_id is None:
        return False
    return image.owner_id == request.user.pk or acts_on_all(request, Image)


def public_networks(*, site: str | None = None) -> list[dict]:
    """What the provider's router needs for every public cluster whose network is set up or being set up
    (``ACTIVE_STATES``): its VLAN, subnet and the router's address in it (``public_gateway``, with the subnet's
    prefix length), and its nodes' names, MACs and addresses (for the router's DHCP and DNS), by VLAN. With
    ``site`` (a site's name): only clusters whose core joins that site — the router trunk there carries their
    VLANs, and the same ids may be other cores' clusters elsewhere. Two queries."""
    qs = VirtualCluster.objects.filter(
        connectivity=Connectivity.PUBLIC, state__in=ACTIVE_STATES, vlan_id__isnull=False
    ).exclude(public_subnet="")
    if site is not None:
        qs = qs.filter(segment__allocation__pool__core__sites__name=site)
    rows = (
        qs.distinct()
        .order_by("vlan_id", "pk")
        .values("pk", "name", "owner__username", "state", "vlan_id", "public_subnet")
    )
    rows = list(rows)
    hosts: dict[int, list[dict]] = {}
    nodes = (
        Node.objects.filter(cluster__in=[row["pk"] for row in rows], address__isnull=False)
        .exclude(state=NodeState.REMOVED)
        .order_by("cluster", "name")
        .values_list("cluster", "name", "mac", "address")
    )
    for cluster_id, name, mac, address in nodes:
        hosts.setdefault(cluster_id, []).append({"name": name, "mac": mac, "address": address})
    out = []
    for row in rows:
        subnet = ipaddress.ip_network(row["public_subnet"])
        out.append(
            {
                "cluster": row["pk"],
                "name": row["name"],
                "state": row["state"],
                "vlan_id": row["vlan_id"],
                "subnet": str(subnet),
                "router_address": f"{next(subnet.hosts())}/{subnet.prefixlen}",
                "hosts": hosts.get(row["pk"], []),
            }
        )
    return out


def moment(text: str):
    """An ISO 8601 time as an abuse report gives it (``2026-12-01T10:00Z``; UTC unless it says otherwise); None
    for anything else."""
    from datetime import UTC

    from django.utils.dateparse import parse_datetime

    try:
        at = parse_datetime(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if at is None:
        return None
    try:  # in UTC: a time at the calendar's ends that has none there (year 0 or 10000) is no time
        return at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    except OverflowError:
        return None


def public_address_holders(address: str, *, at=None) -> QuerySet[PublicSubnetLease]:
    """Who held the public subnet that ``address`` is in (at the time ``at``; every time when None), newest
    first: the answer to an abuse report. ``ValueError`` for a string that is not an IP address."""
    ip = ipaddress.ip_address(address.strip())
    key = address_key(ip)
    leases = PublicSubnetLease.objects.filter(version=ip.version, first__lte=key, last__gte=key)
    if at is not None:
        leases = leases.filter(started_at__lte=at).filter(Q(ended_at=None) | Q(ended_at__gt=at))
    return leases.order_by("-started_at", "-id")


def may_act_on(request, cluster: VirtualCluster) -> bool:
    """Owners, middleware and admins who may change clusters (``acts_on_all``) act on a cluster; group members
    and admins who may only view clusters only see it."""
    return cluster.owner_id == request.user.pk or acts_on_all(request, VirtualCluster)


def cluster_wait(cluster_id: int, states: list[str], timeout: float, *, holder: str = "") -> str | None:
    """Wait until the cluster is in one of ``states`` or ``timeout`` seconds passed; its state then (None:
    the cluster was deleted meanwhile). Woken by the state-change notification on PostgreSQL (no query while
    nothing happens), polling elsewhere."""
    current = VirtualCluster.objects.values_list("state", flat=True)

    def settled() -> tuple[str | None] | None:  # (state,) once in ``states`` or gone (None): the wait ends
        state = current.filter(pk=cluster_id).first()
        return (state,) if state is None or state in states else None

    found = wait_for(settled, channel=STATE_CHANNEL, payload=str(cluster_id), timeout=timeout, holder=holder)
    return found[0] if found else current.filter(pk=cluster_id).first()


# --- quotas ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaLimit:
    """One quota that applies: a user's (``user``) or a group's (``group``); None means no limit."""

    user: object | None
    group: Group | None
    max_clusters: int | None
    max_nodes: int | None

    @property
    def scope(self) -> str:
        return f"user {self.user.get_username()}" if self.user is not None else f"group {self.group.name}"

    def usage(self) -> tuple[int, int]:
        return quota_usage(user=self.user, group=self.group)


def quota_limits(*, owner, groups) -> list[QuotaLimit]:
    """The quotas that apply to clusters of ``owner`` (and of ``groups``, those with a quota): the owner's
    own quota, or the settings' defaults; none for an admin who may change every cluster (``staff_may``: a
    staff member without that permission is limited like anyone)."""
    if staff_may(owner, "change", VirtualCluster):
        return []
    own = Quota.objects.filter(user=owner).first()
    limits = [
        QuotaLimit(
            user=owner,
            group=None,
            max_clusters=_or_default(own and own.max_clusters, settings.CLUSTER_QUOTA_CLUSTERS),
            max_nodes=_or_default(own and own.max_nodes, settings.CLUSTER_QUOTA_NODES),
        )
    ]
    if groups:
        for q in Quota.objects.filter(group__in=groups).select_related("group").order_by("group__name"):
            limits.append(QuotaLimit(user=None, group=q.group, max_clusters=q.max_clusters, max_nodes=q.max_nodes))
    return limits


def _or_default(value: int | None, default: int) -> int | None:
    """A user's limit: their own when set (0 allows none), else the default (0 there: no limit)."""
    if value is not None:
        return value
    return default or None


def quota_usage(*, user=None, group: Group | None = None) -> tuple[int, int]:
    """(live clusters, their live nodes) of ``user``, or of ``group``'s clusters."""
    live = VirtualCluster.objects.filter(Q(owner=user) if user is not None else Q(group=group), state__in=LIVE_STATES)
    return live.count(), Node.objects.filter(cluster__in=live).exclude(state=NodeState.REMOVED).count()


def quotas_with_usage(quotas: QuerySet) -> QuerySet:
    """``quotas`` with ``live_clusters`` and ``live_nodes`` (what ``quota_usage`` counts for each) and their user
    and group, in ONE query however many rows (the admin's list)."""
    from django.db.models import Count, IntegerField, OuterRef, Subquery, Value
    from django.db.models.functions import Coalesce

    def count(rows: QuerySet, key: str) -> Coalesce:
        counted = rows.order_by().values(key).annotate(n=Count("pk")).values("n")
        return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))

    live = VirtualCluster.objects.filter(state__in=LIVE_STATES)
    nodes = Node.objects.filter(cluster__state__in=LIVE_STATES).exclude(state=NodeState.REMOVED)
    return quotas.select_related("user", "group").annotate(  # a quota is a user's or a group's: one term is 0
        live_clusters=count(live.filter(owner=OuterRef("user")), "owner")
        + count(live.filter(group=OuterRef("group")), "group"),
        live_nodes=count(nodes.filter(cluster__owner=OuterRef("user")), "cluster__owner")
        + count(nodes.filter(cluster__group=OuterRef("group")), "cluster__group"),
    )


def quota_report(owner) -> list[dict]:
    """Every quota that applies to ``owner``'s clusters — their own, and each of their groups' that has one —
    with what is in use now."""
    report = []
    for limit in quota_limits(owner=owner, groups=owner.groups.all()):
        clusters, nodes = limit.usage()
        report.append(
            {
                "scope": limit.scope,
                "max_clusters": limit.max_clusters,
                "max_nodes": limit.max_nodes,
                "clusters": clusters,
                "nodes": nodes,
            }
        )
    return report


# --- the event feed -------------------------------------------------------------------------------------------


def cluster_events(
    request, *, after: int, cluster_id: int | None, limit: int, timeout: float
) -> tuple[list[ClusterEvent], int]:
    """Events after id ``after`` of the clusters the caller may see (one cluster's with ``cluster_id``), at
    most ``limit``, oldest first, and the id to go on after: the last one's — or, with fewer than ``limit``,
    the newest id of the whole feed when it was read (every event up to it the caller may see is in the
    answer), so that a reader whose clusters are quiet moves along with the feed and is never left behind
    pruning. None yet: wait up to ``timeout`` seconds for the next (woken by the state-change notification on
    PostgreSQL). ``after`` behind events pruning deleted (``EventHorizon``): ``EventsPruned``."""
    _check_horizon(after)  # (before waiting for what would not tell)
    visible = clusters_visible(request).order_by().values("pk")
    events = ClusterEvent.objects.filter(id__gt=after, cluster__in=visible).select_related("cluster")
    if cluster_id is not None:
        events = events.filter(cluster_id=cluster_id)
    seen = {"newest": after}

    def found() -> list[ClusterEvent] | None:
        # the newest id first: an event committed between the two reads has a higher id (ids follow commits)
        # and is left for the next call instead of skipped
        newest = ClusterEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
        seen["newest"] = max(after, newest)
        rows = list(events.filter(id__lte=newest).order_by("id")[:limit])
        return rows or None

    payload = None if cluster_id is None else str(cluster_id)
    holder = f"user:{request.user.pk}"  # (the long-poll slots: one caller never takes them all)
    rows = wait_for(found, channel=STATE_CHANNEL, payload=payload, timeout=timeout, holder=holder) or []
    # again after the rows: a prune that committed after the check above deleted some the rows skip (it
    # records its horizon in the same transaction, so a read after the rows sees it)
    _check_horizon(after)
    return rows, (rows[-1].id if len(rows) == limit else seen["newest"])


def _check_horizon(after: int) -> None:
    through = EventHorizon.through()
    if 0 < after < through:
        raise EventsPruned(
            f"events after {after} were deleted (events are kept {settings.CLUSTER_EVENT_RETENTION} days): some of "
            f"them may be missing. Read the clusters again (GET /api/clusters/) and go on with after={through}",
            resume_after=through,
        )


STEP_ORDER = ("allocate", "network", "gateway", "ready")  # the provisioning's


def cluster_progress(cluster: VirtualCluster) -> dict:
    """How far the workflow the cluster's state names is: the share of its steps done (``percent``) and the
    step running now (``current``, None when none is). The provisioning while REQUESTED or PROVISIONING
    (``STEP_ORDER``); a node change while UPDATING and the teardown while TEARING_DOWN are one step each (0
    until it ends, and the state with it); a settled state (READY, FAILED, TORN_DOWN) runs nothing: 100. What
    the API's ``progress`` and the clusters page show. Reads ``cluster.steps`` (prefetched by
    ``clusters_visible``)."""
    if cluster.state in SETTLED_STATES:
        return {"percent": 100, "current": None}
    steps = list(cluster.steps.all())
    running = next((s.name for s in reversed(steps) if s.status == StepStatus.RUNNING), None)
    if cluster.state not in (ClusterState.REQUESTED, ClusterState.PROVISIONING):
        return {"percent": 0, "current": running}
    done = {s.name for s in steps if s.status == StepStatus.OK}
    return {"percent": round(100 * sum(1 for n in STEP_ORDER if n in done) / len(STEP_ORDER)), "current": running}


def public_subnets_taken() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The public subnets no cluster may get now, as (IP version, first, last address as integers): the live
    clusters' (whatever prefix they came from), and the resting ones — given back less than
    ``PUBLIC_SUBNET_HOLD_DOWN`` s ago and not live again (the provider's router may still route them to their old
    network). The allocator's rule, and the usage's."""
    from datetime import timedelta

    from django.utils import timezone

    def ranges(subnets):
        return [
            (n.version, int(n.network_address), int(n.broadcast_address)) for n in map(ipaddress.ip_network, subnets)
        ]

    live = ranges(
        VirtualCluster.objects.filter(state__in=LIVE_STATES)
        .exclude(public_subnet="")
        .values_list("public_subnet", flat=True)
    )
    since = timezone.now() - timedelta(seconds=settings.PUBLIC_SUBNET_HOLD_DOWN)
    held = ranges(PublicSubnetLease.objects.filter(ended_at__gt=since).values_list("subnet", flat=True))
    return live, held


def public_prefix_usage(prefixes) -> dict[int, dict[str, int]]:
    """Subnets of each public prefix now, by prefix id: ``size``, ``free`` (what a new public cluster may get:
    the allocator's rule), ``allocated`` (overlapping a live cluster's subnet) and ``resting`` (only a subnet
    given back within ``PUBLIC_SUBNET_HOLD_DOWN``). Prefixes may overlap, and a prefix's subnet length may have
    changed: a subnet counts as taken when any taken range overlaps it. Two queries, whatever the number."""
    live, held = public_subnets_taken()
    usage = {}
    for prefix in prefixes:
        net = ipaddress.ip_network(prefix.prefix, strict=False)
        first, last = int(net.network_address), int(net.broadcast_address)
        bits = net.max_prefixlen - prefix.subnet_length

        def covered(ranges, net=net, first=first, last=last, bits=bits) -> set[tuple[int, int]]:
            # the runs of subnet indexes each range overlaps (few ranges; a prefix may hold 2**32 subnets)
            return {
                ((max(lo, first) - first) >> bits, (min(hi, last) - first) >> bits)
                for version, lo, hi in ranges
                if version == net.version and lo <= last and hi >= first
            }

        allocated = _count_union(covered(live))
        taken = _count_union(covered(live) | covered(held))
        size = 1 << (prefix.subnet_length - net.prefixlen)
        usage[prefix.pk] = {"size": size, "free": size - taken, "allocated": allocated, "resting": taken - allocated}
    return usage


def _count_union(runs: set[tuple[int, int]]) -> int:
    """How many integers the inclusive runs (a, b) cover together."""
    count, reach = 0, -1
    for a, b in sorted(runs):
        if b > reach:
            count += b - max(a, reach + 1) + 1
            reach = b
    return count


#: what a device's own message becomes for whom may not read the device history (``sees_device_messages``)
DEVICE_MESSAGE = "(the device's message: ask an operator)"


def sees_device_messages(request) -> bool:
    """Whether the caller reads the devices' own messages (they quote the devices' configuration): middleware
    (``clusters:manage``: the caller the failure is for), a token with ``network:read``, staff who may view device
    changes; not a cluster's owner or group (``cluster_network``, a cluster's reason and steps)."""
    from network.models import DeviceChange

    token = getattr(request, "auth", None)
    if isinstance(token, ApiToken):
        return token.has_scope(TokenScope.CLUSTERS_MANAGE) or token.has_scope(TokenScope.NETWORK_READ)
    return staff_may(request.user, "view", DeviceChange)


def device_messages(request, clusters) -> dict[int, list[tuple[str, str]]]:
    """Per cluster (by id), the devices' messages (device, message) its network recorded, to take out of what
    the caller is shown (``without_device_messages``); empty for a caller who reads them, and without a query
    for clusters with nothing that could quote one (no reason, no step error)."""
    from network.models import DeviceChange

    if request is None or sees_device_messages(request):
        return {}
    said = {c.pk: c for c in clusters if c.state_reason or any(step.error or step.detail for step in c.steps.all())}
    if not said:
        return {}
    refs = {c.ref: c.pk for c in said.values()}
    found: dict[int, list[tuple[str, str]]] = {}
    rows = (
        DeviceChange.objects.filter(segment__owner_ref__in=list(refs))
        .exclude(error="")
        .values_list("segment__owner_ref", "device", "error")
        .distinct()
    )
    for ref, device, error in rows:
        found.setdefault(refs[ref], []).append((device, error))
    for pairs in found.values():
        pairs.sort(key=lambda pair: -len(pair[1]))  # (a longer message first: never half of one replaced)
    return found


def without_device_messages(text: str, messages: list[tuple[str, str]]) -> str:
    """``text`` (a cluster's reason, a step's error) with each "<device>: <its message>" it quotes (how a failure
    names its device: ``network.errbacks.describe``) said as "<device>: (the device's message: …)" — also the
    message's start where the text was cut short within it (a reason holds at most 2000 characters, and joins
    several), and the message as Python wrote it (``DeviceChangeFailed('sw1', '…', 12)``: a chord's error when the
    failed task's own result was lost)."""
    for device, message in messages:
        if not text or not message:
            continue
        said = f"{device}: "
        text = text.replace(f"{said}{message}", f"{said}{DEVICE_MESSAGE}")
        text = text.replace(repr(message), repr(DEVICE_MESSAGE))
        cut = text.rfind(said)
        tail = text[cut + len(said) :] if cut >= 0 else ""
        if tail and tail != DEVICE_MESSAGE and message.startswith(tail):  # the text ends inside the message
            text = f"{text[: cut + len(said)]}{DEVICE_MESSAGE}"
    return text


def withhold_device_messages(messages: list[tuple[str, str]], *, cluster=None, steps=()) -> None:
    """``cluster``'s reason and ``steps``' error and detail, in memory only, without ``messages`` (one cluster's,
    from ``device_messages``): for pages, which never save the rows they show."""
    if cluster is not None:
        cluster.state_reason = without_device_messages(cluster.state_reason, messages)
    for step in steps:
        step.error = without_device_messages(step.error, messages)
        step.detail = without_device_messages(step.detail, messages)


def hide_device_messages(request, clusters, *, steps=None) -> None:
    """For the browser pages: each cluster's reason and (prefetched) steps — or, for one cluster, the ``steps``
    the page fetched itself — without the devices' messages the caller may not read (``device_messages``)."""
    found = device_messages(request, clusters)
    for cluster in clusters:
        messages = found.get(cluster.pk)
        if messages:
            withhold_device_messages(messages, cluster=cluster, steps=cluster.steps.all() if steps is None else steps)


def cluster_network(request, cluster: VirtualCluster) -> dict:
    """What ``cluster``'s network is made of now (``network.selectors.segment_status``): each switch and host with
    its last change for the cluster and the open drift on its VLAN. The devices' own messages only for whom may
    read the device history (middleware; a token with ``network:read``; staff who may view device changes): they
    quote the devices' configuration; so do the drift's port names."""
    from network.models import Segment
    from network.selectors import segment_status

    detailed = sees_device_messages(request)

    # (a cluster that ended no longer links its segment: its last one, by its reference, tells what was cleaned)
    segment = cluster.segment or Segment.objects.filter(owner_ref=cluster.ref).order_by("-pk").first()
    devices = segment_status(segment) if segment is not None else []
    return {
        "vlan_id": cluster.vlan_id,
        "segment_state": segment.state if segment is not None else None,
        "devices": [
            {
                "kind": d.kind,
                "name": d.name,
                "site": d.site,
                "wanted": d.wanted,
                "enabled": d.enabled,
                "status": d.status,
                "changed_at": d.changed_at,
                "error": d.error if detailed else ("" if not d.error else DEVICE_MESSAGE),
                # (a switch's port names are the operators', as its messages are)
                "drift": [
                    {"port": r.port if detailed else "", "kind": r.kind, "found_at": r.found_at} for r in d.drift
                ],
            }
            for d in devices
        ],
    }


USAGE_KEYS = ("cluster", "owner", "group")


def usage(since, until, *, by: str = "owner", only=None) -> list[dict]:
    """Accounting for ``[since, until)``: per owner, group (``""``: none) or cluster, the clusters that lived in
    it, their hours in it (a VLAN each: VLAN-hours too) and their nodes' hours — a node from its creation until it
    was removed, its cluster ended, or now. Clusters that ended are counted from their history (kept for good);
    a node removed from a live cluster before node removal times were kept counts until its cluster ended. Two
    queries, whatever the window. ``only``: a queryset of the clusters to count (default: all)."""
    from django.utils import timezone

    if by not in USAGE_KEYS:
        raise ValueError(f"by: one of {', '.join(USAGE_KEYS)}")
    now = timezone.now()
    until = min(until, now)
    if until <= since:  # a window not begun yet: nothing lived in it (every live cluster was listed, with 0 hours)
        return []
    in_window = (
        (VirtualCluster.objects if only is None else only)
        .filter(created_at__lt=until)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=since))
    )
    clusters = list(
        in_window.values_list(
            "pk", "name", "owner__username", "group__name", "job_id", "created_at", "ended_at"
        ).order_by("pk")
    )

    def hours(start, end) -> float:
        return max(0.0, (min(end, until) - max(start, since)).total_seconds()) / 3600

    rows: dict[object, dict] = {}
    ends = {}
    for pk, name, owner, group, job, created, ended in clusters:
        ends[pk] = ended or now
        key = {"cluster": pk, "owner": owner, "group": group or ""}[by]
        row = rows.setdefault(key, {by: key, "clusters": 0, "cluster_hours": 0.0, "node_hours": 0.0})
        if by == "cluster":
            row.update(name=name, owner=owner, group=group or "", job_id=job, created_at=created, ended_at=ended)
        row["clusters"] += 1
        row["cluster_hours"] += hours(created, ends[pk])
    keyed = {pk: {"cluster": pk, "owner": owner, "group": group or ""}[by] for pk, _n, owner, group, *_ in clusters}
    # (a subquery, not the ids: a year's window may hold more clusters than a query takes parameters)
    nodes = Node.objects.filter(cluster__in=in_window.values("pk")).values_list(
        "cluster_id", "created_at", "removed_at"
    )
    for cluster_id, created, removed in nodes.iterator():
        if cluster_id not in keyed:  # (a cluster made between the two queries)
            continue
        rows[keyed[cluster_id]]["node_hours"] += hours(created, min(removed or now, ends[cluster_id]))
    out = sorted(rows.values(), key=lambda r: r[by] if by == "cluster" else str(r[by]))
    for row in out:
        row["cluster_hours"] = round(row["cluster_hours"], 3)
        row["node_hours"] = round(row["node_hours"], 3)
    return out


def planned(cluster: VirtualCluster) -> dict:
    """What a cluster just made would get (``services.cluster_plan``, before it rolls back): the policy's decision,
    the VLAN pool and its core, the nodes' sites, the public subnet and the nodes' addresses."""
    pool = cluster.segment.allocation.pool
    nodes = list(cluster.nodes.select_related("host__site").order_by("name"))
    return {
        "connectivity": cluster.connectivity,
        "connectivity_reason": cluster.connectivity_reason,
        "pool": pool.name,
        "core": pool.core.name,
        "sites": sorted({n.host.site.name for n in nodes}),
        "public_subnet": cluster.public_subnet,
        "public_gateway": cluster.public_gateway,
        "expires_at": cluster.expires_at,
        "nodes": [{"name": n.name, "host": n.host.name, "address": n.address} for n in nodes],
    }


def image_delete_outcome(image) -> tuple[str, int]:
    """What deleting ``image`` would do now (``services.image_delete`` decides it again when it is done): ("refused",
    the live clusters booting it), ("retired", 0: ended clusters name it — it boots nothing new and its name stays
    taken), or ("deleted", 0)."""
    if image.retired_at is not None:
        return "retired", 0
    live = image.clusters.filter(state__in=LIVE_STATES).count()
    if live:
        return "refused", live
    return ("retired" if image.clusters.exists() else "deleted"), 0
