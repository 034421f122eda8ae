"""Writes to virtual clusters: create, extend, tear down, add/remove nodes, migrate, override connectivity.

Every function is atomic: a refused request leaves nothing allocated. Network work is started only after
commit (``transaction.on_commit``) through ``clusters.workflows``, so a rolled-back request sends nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Exists, F, Max, Model, OuterRef, Q, QuerySet, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from access.gateway.state import leg_unusable
from clusters import policy, selectors, workflows
from clusters.errors import (
    Busy,
    ClusterError,
    Conflict,
    Gone,
    InvalidTopology,
    NotAllowed,
    PoolExhausted,
    QuotaExceeded,
)
from clusters.models import (
    ACTIVE_STATES,
    LIVE_STATES,
    ClusterEvent,
    ClusterState,
    ClusterStep,
    Connectivity,
    EventHorizon,
    EventKind,
    IdempotencyKey,
    Image,
    Node,
    NodeState,
    PublicPrefix,
    PublicSubnetLease,
    StepStatus,
    VirtualCluster,
    Webhook,
    address_key,
)
from clusters.signals import cluster_ended, cluster_ready
from network import errors as net_errors
from network import selectors as net_selectors
from network import services as net
from network.models import DeviceChange, Host, Segment
from portal import audit
from portal.models import TokenScope
from portal.pruning import delete_in_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRequest:
    name: str
    host: Host
    mac: str
    address: str | None = None


def not_a_group_of_the_owner(name: str) -> str:
    """The refusal of a group the owner is not a member of — the same words as for a name no group has
    (``GroupField``): which group names exist is not told to whoever asks."""
    return f"{name}: not a group the owner is a member of"


def lifetime_bounds() -> tuple[timedelta, timedelta]:
    return timedelta(seconds=settings.CLUSTER_MIN_LIFETIME), timedelta(seconds=settings.CLUSTER_MAX_LIFETIME)


def request_fingerprint(payload: dict) -> str:
    """What an Idempotency-Key stands for: ``payload`` (the request as validated, defaults applied), with rows
    by id, dataclasses (``NodeRequest``) by their fields and instants in UTC, so that a retry that writes the
    same request differently is the same request."""
    return hashlib.sha256(json.dumps(_canonical(payload), sort_keys=True, default=str).encode()).hexdigest()


def _canonical(value):
    if isinstance(value, Model):
        return value.pk
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


# A lifetime asked for in seconds became an expiry when the request came in, and is checked here a moment later:
# the minimum allows for that moment (a cluster asked for CLUSTER_MIN_LIFETIME seconds is accepted, as the schema
# says, also when the request waited for a lock).
_REQUEST_SLACK = timedelta(seconds=5)


def _check_lifetime(expires_at: datetime, *, since: datetime | None = None) -> None:
    low, high = lifetime_bounds()
    now = timezone.now()
    since = since or now
    if expires_at <= now:
        raise ClusterError(
            f"the expiry is in the past: it must be at least {_duration(low)} from now", field="expires_at"
        )
    if expires_at < now + low - _REQUEST_SLACK:
        raise ClusterError(f"the lifetime must be at least {_duration(low)} from now", field="expires_at")
    if expires_at > since + high:
        raise ClusterError(f"the lifetime must be at most {_duration(high)} from creation", field="expires_at")


def _duration(delta: timedelta) -> str:
    """``delta`` in the largest unit that divides it: "90 days", "12 h", "60 s"."""
    seconds = int(delta.total_seconds())
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}" if unit != "days" or seconds // size != 1 else "1 day"
    return f"{seconds} s"


def _check_nodes(nodes: list[NodeRequest], *, cluster: VirtualCluster | None = None, bastion_address: str = "") -> None:
    if not nodes:
        raise ClusterError("a cluster needs at least one node", field="nodes")
    names = [n.name for n in nodes]
    macs = [n.mac.lower() for n in nodes]
    if len(set(names)) != len(names):
        raise ClusterError("node names must be unique within the cluster", field="nodes")
    if len(set(macs)) != len(macs):
        raise ClusterError("a MAC address appears twice in the request", field="nodes")
    addresses = [n.address for n in nodes if n.address]
    if cluster is not None:
        addresses += [a for a in cluster.nodes.exclude(state=NodeState.REMOVED).values_list("address", flat=True) if a]
    if len(set(addresses)) != len(addresses):
        raise ClusterError("an IP address appears twice among the cluster's nodes", field="nodes")
    bastion = bastion_address or (cluster.bastion_address if cluster is not None else "")
    if bastion and not (cluster is not None and cluster.public_subnet):  # (a public one's nodes are in its subnet)
        own, network = ipaddress.ip_interface(bastion).ip, ipaddress.ip_interface(bastion).network
        clash = [n.name for n in nodes if n.address and ipaddress.ip_address(n.address) == own]
        if clash:
            raise ClusterError(f"node {clash[0]}: {own} is the SSH bastion's address in this cluster", field="nodes")
        # the gateways refuse a state whose bastion forwards there (the whole document: every cluster's)
        unusable = leg_unusable(bastion)
        reserved = [n for n in nodes if n.address and ipaddress.ip_address(n.address) in unusable]
        if reserved:
            raise ClusterError(
                f"node {reserved[0].name}: {reserved[0].address} is the network or broadcast address of {network}, "
                f"the cluster network of the SSH bastion (bastion_address {bastion})",
                field="nodes",
            )
        # the bastion reaches the nodes through its leg, the network of its address: one outside it would be
        # reached through the gateway's other routes (its own services, another network), never this cluster
        outside = [n for n in nodes if n.address and ipaddress.ip_address(n.address) not in network]
        if outside:
            raise ClusterError(
                f"node {outside[0].name}: {outside[0].address} is outside {network}, the cluster network of the "
                f"SSH bastion (bastion_address {bastion})",
                field="nodes",
            )
    live = Node.objects.exclude(state=NodeState.REMOVED)
    if cluster is not None:
        clash = sorted(live.filter(cluster=cluster, name__in=names).values_list("name", flat=True))
        if clash:
            raise ClusterError(f"node {clash[0]} already exists in this cluster", field="nodes")
    used = sorted(live.filter(mac__in=macs).values_list("mac", "cluster__state"))
    for_good = [mac for mac, state in used if state != ClusterState.TEARING_DOWN]
    if for_good:  # (before one whose cluster is being torn down: retrying would not help)
        raise ClusterError(f"MAC address {for_good[0]} is already used by another VM", field="nodes")
    if used:  # its nodes go with its teardown: a scheduler's retry gets it
        mac = used[0][0]
        raise Busy(f"MAC address {mac} is still used by a VM of a cluster being torn down: try again once it ends")
    unavailable = net_selectors.hosts_unavailable(n.host.pk for n in nodes)
    for n in nodes:
        if n.host.pk in unavailable:
            raise InvalidTopology(unavailable[n.host.pk], field="nodes")


def _check_name_free(owner, name: str) -> None:
    """A live cluster of ``owner`` named ``name`` refuses the name: for good (a conflict) while it runs, for now
    (busy, with Retry-After) while it is torn down — the name is free once that ends, and a scheduler's job
    requeued under its cluster's name gets it then."""
    states = set(
        VirtualCluster.objects.filter(owner=owner, name=name, state__in=LIVE_STATES).values_list("state", flat=True)
    )
    if states - {ClusterState.TEARING_DOWN}:
        raise Conflict(f"{owner.get_username()} already has a live cluster named {name}", field="name")
    if states:
        raise Busy(f"{owner.get_username()}'s cluster named {name} is being torn down: try again once it ends")


def _segment_error(exc: net_errors.NetworkError, *, field: str = "nodes") -> ClusterError:
    if isinstance(exc, net_errors.PoolExhausted):
        return PoolExhausted(str(exc))
    if exc.status == 422:
        return InvalidTopology(str(exc), field=field)
    return Conflict(str(exc))


def _allocate_public_subnet() -> tuple[PublicPrefix, str]:
    """A free subnet of the first public prefix (by name) that has one. Free: overlapping no live cluster's
    subnet, whatever prefix that came from (prefixes may overlap; a prefix's subnet length may have changed
    since), nor one given back less than ``PUBLIC_SUBNET_HOLD_DOWN`` s ago (the provider's router may still route
    it to its old network until its next pull, and an abuse report for that moment must name one cluster). One
    lock for every public allocation (PostgreSQL; SQLite serializes writers itself)."""
    _xact_lock(_PUBLIC_SUBNET_LOCK_SPACE, 0)
    live, held = selectors.public_subnets_taken()
    by_version: dict[int, list[tuple[int, int]]] = {4: [], 6: []}  # (another family's subnet never overlaps)
    for version, lo, hi in (*live, *held):
        by_version[version].append((lo, hi))
    prefixes = list(PublicPrefix.objects.order_by("name"))
    for prefix in prefixes:
        net = ipaddress.ip_network(prefix.prefix)
        taken = sorted(by_version[net.version])
        starts = [lo for lo, _hi in taken]
        reach = list(itertools.accumulate((hi for _lo, hi in taken), max))  # the highest address taken so far
        for subnet in net.subnets(new_prefix=prefix.subnet_length):
            lo, hi = int(subnet.network_address), int(subnet.broadcast_address)
            i = bisect.bisect_right(starts, hi)  # taken[:i] start at or before hi: one overlaps if it reaches lo
            if i and reach[i - 1] >= lo:
                continue
            return prefix, str(subnet)
    names = ", ".join(p.name for p in prefixes)
    resting = len(held)
    later = f" ({resting} held back for {settings.PUBLIC_SUBNET_HOLD_DOWN} s after their clusters)" if resting else ""
    raise PoolExhausted(f"the public prefixes ({names}) have no free subnet left{later}")


def _public_addresses(
    cluster: VirtualCluster, wanted: list[tuple[str, str | None]], *, taken: Iterable[str] = ()
) -> list[str]:
    """The addresses of a public cluster's nodes ``wanted`` ((name, address or None)), in its subnet: the
    provider routes that subnet only, its first host address is the provider's router (``public_gateway``).
    A given address must be another host address of the subnet, not one of ``taken`` (the cluster's other
    live nodes'); a node without one gets the lowest free address (never the bastion's, should the cluster
    become closed). Nothing fits: a 400 naming the node."""
    net = ipaddress.ip_network(cluster.public_subnet)
    hosts = net.hosts()
    router = next(hosts)
    used = {ipaddress.ip_address(a) for a in taken if a} | {router}
    if cluster.bastion_address:
        used.add(ipaddress.ip_interface(cluster.bastion_address).ip)
    for name, address in wanted:
        if not address:
            continue
        ip = ipaddress.ip_address(address)
        if ip == router or ip not in net or (net.version == 4 and ip in (net.network_address, net.broadcast_address)):
            raise ClusterError(
                f"node {name}: {address} is not a host address of the cluster's public subnet {net} other than "
                f"the router's ({router}); leave it out to get one",
                field="nodes",
            )
        if ip in used:
            raise ClusterError(f"node {name}: {address} is already another node's address", field="nodes")
        used.add(ip)
    out = []
    for name, address in wanted:
        if not address:
            ip = next((h for h in hosts if h not in used), None)
            if ip is None:
                raise ClusterError(
                    f"the cluster's public subnet {net} has no free address left for node {name}", field="nodes"
                )
            used.add(ip)
            address = str(ip)
        out.append(str(ipaddress.ip_address(address)))
    return out


def _with_public_addresses(cluster: VirtualCluster, nodes: list[NodeRequest], *, taken: Iterable[str] = ()):
    addresses = _public_addresses(cluster, [(n.name, n.address) for n in nodes], taken=taken)
    return [replace(n, address=a) for n, a in zip(nodes, addresses, strict=True)]


def step_start(cluster: VirtualCluster, name: str, *, detail: str = "") -> ClusterStep:
    return ClusterStep.objects.create(cluster=cluster, name=name, generation=cluster.workflow_generation, detail=detail)


def step_start_once(cluster: VirtualCluster, name: str, *, detail: str = "") -> ClusterStep | None:
    """``step_start``, unless this workflow (generation) recorded that step already: None then (a task redelivered
    after its worker died runs again, and records its step once)."""
    if ClusterStep.objects.filter(cluster=cluster, name=name, generation=cluster.workflow_generation).exists():
        return None
    return step_start(cluster, name, detail=detail)


def step_finish(step: ClusterStep, *, status: str = StepStatus.OK, error: str = "", device: str = "") -> None:
    step.status = status
    step.error = error
    step.device = device or step.device
    step.finished_at = timezone.now()
    step.save(update_fields=["status", "error", "device", "detail", "finished_at"])


@transaction.atomic
def cluster_create(
    *,
    owner,
    name: str,
    image: Image,
    admin_rights: bool,
    nodes: list[NodeRequest],
    expires_at: datetime,
    group: Group | None = None,
    job_id: str = "",
    bastion_address: str = "",
    connectivity: str = "",
    idempotency: tuple[str, str, str] | None = None,
    raw_fingerprint: str = "",
) -> tuple[VirtualCluster, bool]:
    """Create a cluster and start provisioning its network. Returns (cluster, created).

    ``connectivity`` is what the request asks for ("": the policy decides); closed is always granted, public
    only where the policy decides public (``policy.decide``). Everything that follows — a public subnet, the
    VLAN on the access gateways' trunks — follows the decision, not the image.

    ``idempotency`` is (actor, key, request fingerprint): a retried request returns the first cluster; the
    same key with a different request is a conflict. ``raw_fingerprint``: of the body as sent, recorded with
    the key (``create_replay``).
    """
    if idempotency is not None:
        _idempotency_lock(*idempotency[:2])
        existing = _idempotent_replay(*idempotency)
        if existing is not None:
            return existing, False
    _check_lifetime(expires_at)
    _check_nodes(nodes, bastion_address=bastion_address)
    _check_name_free(owner, name)
    if group is not None and not owner.groups.filter(pk=group.pk).exists():
        raise ClusterError(not_a_group_of_the_owner(group.name), field="group")
    _check_image(image, owner=owner)
    quota_check(owner=owner, group=group, clusters=1, nodes=len(nodes))

    prefix = PublicPrefix.objects.order_by("name").first()
    decision = policy.decide(
        image=image, admin_rights=admin_rights, public_available=prefix is not None, requested=connectivity
    )
    if bastion_address and decision.connectivity == Connectivity.PUBLIC:
        raise ClusterError(
            f"only a closed cluster has an SSH bastion, and this one is public ({decision.reason}): leave "
            "bastion_address out, or ask for connectivity closed",
            field="bastion_address",
        )
    cluster = VirtualCluster(
        name=name,
        owner=owner,
        group=group,
        image=image,
        admin_rights=admin_rights,
        connectivity=decision.connectivity,
        connectivity_reason=decision.reason,
        expires_at=expires_at,
        job_id=job_id,
        bastion_address=bastion_address,
        closed_since=timezone.now() if decision.connectivity == Connectivity.CLOSED else None,
    )
    if decision.connectivity == Connectivity.PUBLIC:
        cluster.public_prefix, cluster.public_subnet = _allocate_public_subnet()
        nodes = _with_public_addresses(cluster, nodes)
    try:
        with transaction.atomic():
            cluster.save()
    except IntegrityError:
        _check_name_free(owner, name)  # (a create of the same name committed meanwhile: the same refusal)
        raise Conflict(f"{owner.get_username()} already has a live cluster named {name}", field="name") from None
    if cluster.public_subnet:
        _lease_start(cluster)
    try:
        with transaction.atomic():
            audit.create_rows(  # (each gets its audit entry, as its removal does)
                Node,
                [Node(cluster=cluster, name=n.name, host=n.host, mac=n.mac.lower(), address=n.address) for n in nodes],
                related=("cluster",),
            )
    except IntegrityError:
        raise ClusterError("a MAC address or node name is already in use", field="nodes") from None

    step = step_start(cluster, "allocate")
    try:
        segment = net.segment_create(
            owner=cluster.ref,
            hosts=sorted({n.host for n in nodes}, key=lambda h: h.pk),
            gateway=decision.connectivity == Connectivity.CLOSED,
        )
    except net_errors.NetworkError as exc:
        raise _segment_error(exc) from None
    cluster.segment = segment
    cluster.vlan_id = segment.vid
    cluster.save(update_fields=["segment", "vlan_id"])
    step.detail = f"VLAN {cluster.vlan_id} from pool {segment.allocation.pool.name}"
    step_finish(step)

    if idempotency is not None:
        actor, key, fingerprint = idempotency
        try:
            with transaction.atomic():
                IdempotencyKey.objects.create(
                    actor=actor, key=key, request_hash=fingerprint, raw_hash=raw_fingerprint, cluster=cluster
                )
        except IntegrityError:
            # A concurrent request with the same key won the race: ours rolls back entirely.
            raise _IdempotentRace() from None
    audit.record(cluster, "action", message=f"created; connectivity {cluster.connectivity}: {decision.reason}")
    transaction.on_commit(lambda: workflows.start_provision(cluster.pk, cluster.workflow_generation))
    return cluster, True


class _Planned(Exception):
    """Raised inside a dry run's transaction, carrying what it found: everything it did rolls back."""

    def __init__(self, found):
        super().__init__("dry run")
        self.found = found


def cluster_plan(**kwargs) -> dict:
    """A dry run of ``cluster_create`` (same arguments, no idempotency): every check it makes — lifetime, nodes,
    name, group, image, quota, the policy, a VLAN from a pool whose core joins the hosts' sites (and a gateway's,
    for a closed cluster), a public subnet — with the same errors, then ``selectors.planned`` of the cluster it
    would make, and all of it rolled back: nothing is allocated or sent, no row stays (only ids of sequences are
    used up). What it names (the pool, the subnet) is what a create now would get, not a reservation."""
    try:
        with transaction.atomic():
            cluster, _created = cluster_create(**kwargs)
            raise _Planned(selectors.planned(cluster))
    except _Planned as planned:
        return planned.found


class _IdempotentRace(Exception):
    """Raised inside the atomic block so everything rolls back; ``cluster_create_idempotent`` replays."""


def _idempotent_replay(actor: str, key: str, fingerprint: str) -> VirtualCluster | None:
    record = _idempotency_record(actor, key, fingerprint)
    return None if record is None else record.cluster


def create_replay(actor: str, key: str, raw_fingerprint: str) -> VirtualCluster | None:
    """The cluster a create with this key made from exactly this body (``raw_fingerprint``), if one did: its retry
    is answered like it without validating the body again — what was valid then may not be now (the image's
    share ended, the owner was deactivated), and a refusal would tell the scheduler that nothing was made while
    its cluster holds a VLAN. Any other body with the key goes through validation (and is a 409 if it differs)."""
    record = (
        IdempotencyKey.objects.select_related("cluster")
        .filter(actor=actor, key=key, raw_hash=raw_fingerprint)
        .exclude(raw_hash="")
        .first()
    )
    return None if record is None else record.cluster


def cluster_create_idempotent(**kwargs) -> tuple[VirtualCluster, bool]:
    """``cluster_create`` that resolves a race between two requests with the same Idempotency-Key."""
    try:
        return cluster_create(**kwargs)
    except _IdempotentRace:
        cluster = _idempotent_replay(*kwargs["idempotency"])
        assert cluster is not None
        return cluster, False


def cluster_act_once(
    *, idempotency: tuple[str, str, str] | None, cluster: VirtualCluster, status_code: int, act: Callable[[], object]
) -> tuple[VirtualCluster, int]:
    """Run ``act`` (a service call that changes ``cluster``) at most once per ``idempotency`` = (actor, key,
    request fingerprint): the key is recorded in the same transaction as the change, and requests with the
    same key are serialized, so a retry — also one racing the first request — changes nothing again and
    answers with the first request's status code and the cluster as it is now. A request that fails records
    nothing. The same key with a different request is a conflict (409). Returns (cluster, status code)."""
    if idempotency is None:
        act()
        return cluster, status_code
    actor, key, fingerprint = idempotency
    try:
        with transaction.atomic():
            _idempotency_lock(actor, key)
            record = _idempotency_record(actor, key, fingerprint)
            if record is not None:
                return record.cluster, record.status_code
            act()
            with transaction.atomic():
                IdempotencyKey.objects.create(
                    actor=actor, key=key, request_hash=fingerprint, cluster=cluster, status_code=status_code
                )
    except IntegrityError:  # without the lock (SQLite): a concurrent request with this key won; ours rolled back
        record = _idempotency_record(actor, key, fingerprint)
        if record is None:
            raise
        return record.cluster, record.status_code
    return cluster, status_code


_IDEMPOTENCY_LOCK_SPACE = 0x56430010
_PUBLIC_SUBNET_LOCK_SPACE = 0x56430013
_QUOTA_LOCK_SPACES = {"user": 0x56430011, "group": 0x56430012}
_IMAGE_LOCK_SPACE = 0x56430014


def quota_check(*, owner, group: Group | None, clusters: int, nodes: int) -> None:
    """Raise ``QuotaExceeded`` (409) when ``clusters`` more live clusters and ``nodes`` more live nodes would
    exceed the owner's quota or the group's. Inside the caller's transaction, requests for the same owner
    (and group) are serialized on PostgreSQL, so concurrent creates cannot overshoot together."""
    limits = selectors.quota_limits(owner=owner, groups=[group] if group is not None else [])
    limits = [q for q in limits if q.max_clusters is not None or q.max_nodes is not None]
    for limit in limits:
        if limit.user is not None:
            _xact_lock(_QUOTA_LOCK_SPACES["user"], limit.user.pk)
        else:
            _xact_lock(_QUOTA_LOCK_SPACES["group"], limit.group.pk)
    for limit in limits:
        have_clusters, have_nodes = limit.usage()
        if limit.max_clusters is not None and clusters and have_clusters + clusters > limit.max_clusters:
            raise QuotaExceeded(
                f"quota of {limit.scope}: {have_clusters} live clusters of {limit.max_clusters} allowed; "
                "tear one down first",
                field="quota",
            )
        if limit.max_nodes is not None and nodes and have_nodes + nodes > limit.max_nodes:
            raise QuotaExceeded(
                f"quota of {limit.scope}: {have_nodes} live nodes of {limit.max_nodes} allowed, {nodes} more asked for",
                field="quota",
            )


def image_unavailable(name: str) -> str:
    """The one answer for an image that does not exist, is retired, or is someone else's: it tells no one
    which (the API's lookup by name says the same)."""
    return f"No image named {name} is available."


def _check_image(image: Image, *, owner) -> None:
    """Refuse ``image`` unless ``owner`` may boot it (``selectors.images_usable``). On PostgreSQL the image's row
    is share-locked until the cluster commits, so a concurrent delete waits and then finds the cluster."""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(Image._meta.db_table)  # (identifier from the model, value a parameter)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR SHARE", [image.pk])  # noqa: S608
    if not selectors.images_usable(owner).filter(pk=image.pk).exists():
        raise ClusterError(image_unavailable(image.name), field="image")
    # the policy reads its approval as it is now, under the lock: a withdrawal committed since the request read
    # the image is seen (and one that comes now waits for this cluster, then finds it public and closes it)
    image.approved = Image.objects.filter(pk=image.pk).values_list("approved", flat=True).get()


@transaction.atomic
def image_register(
    *, owner, name: str, description: str = "", source: str = "", group: Group | None = None
) -> tuple[Image, bool]:
    """Register a user-provided image of ``owner`` (shared with ``group``'s members when given): (image, created).
    It is never approved here (an admin may approve it), so clusters booting it are closed. The same registration
    again (a retry after a lost answer: the owner's live image of that name, with the same description, source and
    group) returns the image, created False; any other image of that name is a 400 on ``name``. At most
    ``IMAGE_QUOTA`` images per owner (409 ``quota_exceeded``)."""
    _xact_lock(_IMAGE_LOCK_SPACE, owner.pk)  # concurrent registrations of one owner count one after the other
    taken = Image.objects.filter(name=name).first()
    if taken is not None:
        same = (taken.owner_id, taken.group_id, taken.description, taken.source, taken.retired_at)
        if same == (owner.pk, getattr(group, "pk", None), description, source, None):
            return taken, False
        raise ClusterError(f"an image named {name} already exists", field="name")
    if group is not None and not owner.groups.filter(pk=group.pk).exists():
        raise ClusterError(not_a_group_of_the_owner(group.name), field="group")
    have = Image.objects.filter(owner=owner, retired_at__isnull=True).count()
    if settings.IMAGE_QUOTA and not selectors.staff_may(owner, "change", Image) and have >= settings.IMAGE_QUOTA:
        raise QuotaExceeded(
            f"{owner.get_username()} already has {have} images of {settings.IMAGE_QUOTA} allowed: delete one first",
            field="quota",
        )
    image = Image(owner=owner, group=group, name=name, description=description, source=source, approved=False)
    try:
        with transaction.atomic():
            image.save()
    except IntegrityError:
        raise ClusterError(f"an image named {name} already exists", field="name") from None
    audit.record(image, "action", message=f"registered by {owner.get_username()}")
    return image, True


@transaction.atomic
def image_update(*, image: Image, changes: Mapping[str, object]) -> Image:
    """Change a user-provided image's ``description``, ``source`` or ``group`` (a group given: its owner must be
    a member). The row is locked: an image deleted or retired meanwhile is a 409, not a 500. A new ``source``
    takes the provider's approval away: it vouched for the image it looked at, not for what its owner puts
    there later (later clusters booting it are closed until an administrator approves it again); while live
    public clusters boot it, its source does not change (409)."""
    unknown = set(changes) - {"description", "source", "group"}
    if unknown:
        raise ClusterError(f"cannot change {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    locked = Image.objects.select_for_update().filter(pk=image.pk, retired_at__isnull=True).first()
    if locked is None:
        raise Conflict(f"image {image.name} was deleted meanwhile")
    group = changes.get("group")
    if group is not None and not locked.owner.groups.filter(pk=group.pk).exists():
        raise ClusterError(not_a_group_of_the_owner(group.name), field="group")
    fields = [*changes]
    if locked.approved and "source" in changes and changes["source"] != locked.source:
        public = VirtualCluster.objects.filter(image=locked, state__in=LIVE_STATES, connectivity=Connectivity.PUBLIC)
        if public.exists():  # they are public because it was approved, and a node added would boot the new one
            raise Conflict(
                f"live public clusters boot image {locked.name}: its source changes once they have ended (or an "
                "administrator withdrew its approval)"
            )
        locked.approved = False
        fields.append("approved")
    for name, value in changes.items():
        setattr(locked, name, value)
    if fields:
        locked.save(update_fields=fields)
    return locked


@transaction.atomic
def image_delete(*, image: Image) -> str:
    """Delete a user-provided image: "deleted", or "retired" when ended clusters still name it (kept for their
    history, listed no more, booting nothing new). A live cluster booting it is a 409 naming it."""
    locked = Image.objects.select_for_update().filter(pk=image.pk).first()  # (cluster creates share-lock it)
    if locked is None:  # deleted meanwhile (a retried or double-clicked delete): what was asked is done
        return "deleted"
    image = locked
    outcome, live = selectors.image_delete_outcome(image)  # (the rule the confirmation page says)
    if outcome == "refused":  # (not named: they may be others' clusters)
        raise Conflict(f"{live} live cluster(s) boot image {image.name}: they must end first")
    if outcome == "retired":
        if image.retired_at is None:
            image.retired_at = timezone.now()
            image.save(update_fields=["retired_at"])
        return "retired"
    image.delete()
    return "deleted"


def _idempotency_lock(actor: str, key: str) -> None:
    """Requests with the same key wait for each other until the first commits."""
    digest = int.from_bytes(hashlib.sha256(f"{actor}\0{key}".encode()).digest()[:4], "big", signed=True)
    _xact_lock(_IDEMPOTENCY_LOCK_SPACE, digest)


def _xact_lock(space: int, key: int) -> None:
    """PostgreSQL: a transaction advisory lock, held until the caller's transaction ends; elsewhere nothing
    (SQLite serializes writing transactions itself)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [space, key])


def _idempotency_record(actor: str, key: str, fingerprint: str) -> IdempotencyKey | None:
    record = IdempotencyKey.objects.select_related("cluster").filter(actor=actor, key=key).first()
    if record is not None and record.request_hash != fingerprint:
        raise Conflict("this Idempotency-Key was already used for a different request", field="Idempotency-Key")
    return record


def _transition(
    cluster: VirtualCluster, allowed: tuple[str, ...], to: str, *, where: dict | None = None, **fields
) -> VirtualCluster:
    """Conditional UPDATE: move ``cluster`` to ``to`` only from an allowed state (and only if the row still
    matches ``where``), else 409."""
    updated = VirtualCluster.objects.filter(pk=cluster.pk, state__in=allowed, **(where or {})).update(
        state=to, updated_at=timezone.now(), workflow_generation=F("workflow_generation") + 1, **fields
    )
    cluster.refresh_from_db()
    if not updated:
        raise Conflict(
            f"cluster {cluster.name} is {cluster.get_state_display()}; this needs it to be "
            + " or ".join(ClusterState(s).label for s in allowed)
        )
    return cluster


def cluster_extend_check(*, cluster: VirtualCluster, expires_at: datetime) -> None:
    """Why ``cluster`` (as read) cannot get this expiry, as a ``ClusterError`` on ``expires_at``; for forms
    that show it on the field before anything is saved. ``cluster_extend`` checks again under the row lock."""
    if cluster.state not in ACTIVE_STATES:
        raise Conflict(f"cluster {cluster.name} is {cluster.get_state_display()} and cannot be extended")
    _check_lifetime(expires_at, since=cluster.created_at)


def extended_expiry(cluster: VirtualCluster, by: timedelta, *, now: datetime) -> datetime:
    """The expiry "+by" gives: later than the current one by ``by`` — or than now, when the cluster is past its
    expiry and the periodic expiry has not torn it down yet."""
    return max(cluster.expires_at, now) + by


@transaction.atomic
def cluster_extend(
    *, cluster: VirtualCluster, expires_at: datetime | None = None, by: timedelta | None = None
) -> VirtualCluster:
    """Set the expiry of an active cluster to ``expires_at``, or make it later ``by`` this much (computed from the
    expiry under the lock: an extension saved meanwhile is added to, never overwritten). The row locked: a
    teardown starting meanwhile wins or waits; returns the cluster as saved (``cluster`` only names it).
    ``updated_at`` is left alone: it is when the running workflow started, which the deadlines
    (``clusters_end_stalled_workflows``, the retries) measure from — a scheduler changing the lifetime must
    not postpone them."""
    if (expires_at is None) == (by is None):
        raise TypeError("cluster_extend takes expires_at or by")
    locked = VirtualCluster.objects.select_for_update(no_key=True).get(pk=cluster.pk)
    if by is not None:
        expires_at = extended_expiry(locked, by, now=timezone.now())
    cluster_extend_check(cluster=locked, expires_at=expires_at)
    locked.expires_at = expires_at
    locked.save(update_fields=["expires_at"])  # audited by the model's registration
    return locked


@transaction.atomic
def cluster_teardown(
    *, cluster: VirtualCluster, reason: str, expired_by: datetime | None = None
) -> VirtualCluster | None:
    """Start the teardown: hosts, then switches, then the VLAN goes to quarantine; credentials revoked.
    ``expired_by`` (the expiry): only while the cluster's expiry is still at or before that moment — a
    lifetime extended since the expiry read it wins, and None is returned."""
    if cluster.state == ClusterState.TEARING_DOWN:
        return cluster  # asking twice is harmless
    where = {"expires_at__lte": expired_by} if expired_by is not None else None
    try:
        cluster = _transition(cluster, ACTIVE_STATES, ClusterState.TEARING_DOWN, where=where, state_reason=reason)
    except Conflict:
        if cluster.state == ClusterState.TEARING_DOWN:  # (as re-read) another request just started it
            return cluster
        if expired_by is not None and cluster.state in ACTIVE_STATES:
            return None  # extended meanwhile: not expired any more
        raise Conflict(
            f"cluster {cluster.name} has ended ({cluster.get_state_display()}): nothing to tear down"
        ) from None
    audit.record(cluster, "action", message=f"teardown: {reason}")
    # The workflow this interrupts (a provisioning, its rollback, a node change) is stale now and never
    # reports: its running step ends here, or it would stay the progress's current step for good.
    ClusterStep.objects.filter(cluster=cluster, status=StepStatus.RUNNING).update(
        status=StepStatus.FAILED, error=f"called off by the teardown: {reason}", finished_at=timezone.now()
    )
    if cluster.segment_id:
        net.segment_delete(segment=cluster.segment)
    transaction.on_commit(lambda: workflows.start_teardown(cluster.pk, cluster.workflow_generation))
    return cluster


def _lease_start(cluster: VirtualCluster) -> None:
    """``cluster`` holds its public subnet from now (``PublicSubnetLease``: who had an address, and when)."""
    net = ipaddress.ip_network(cluster.public_subnet)
    PublicSubnetLease.objects.create(
        cluster=cluster,
        cluster_name=cluster.name,
        owner=cluster.owner.get_username(),
        group=cluster.group.name if cluster.group_id else "",
        job_id=cluster.job_id or "",
        subnet=str(net),
        version=net.version,
        first=address_key(net.network_address),
        last=address_key(net.broadcast_address),
        started_at=timezone.now(),
    )


def clusters_lease_public_subnets() -> list[int]:
    """A lease for every live public cluster that holds its subnet without one: made by a web process of the
    release before leases (a rolling upgrade), whose migration's backfill came first. Its start is when this
    found it (the best known). Returns the clusters."""
    open_leases = PublicSubnetLease.objects.filter(cluster=OuterRef("pk"), ended_at=None)
    unleased = (
        VirtualCluster.objects.filter(state__in=LIVE_STATES)
        .exclude(public_subnet="")
        .exclude(Exists(open_leases))
        .select_related("owner", "group")
    )
    found = []
    for cluster in unleased:
        with transaction.atomic():  # under the cluster's row lock, as an override or an end changes the subnet
            locked = VirtualCluster.objects.select_for_update(no_key=True)
            still = locked.filter(pk=cluster.pk, public_subnet=cluster.public_subnet)
            if still.exists() and not PublicSubnetLease.objects.filter(cluster=cluster, ended_at=None).exists():
                _lease_start(cluster)
                found.append(cluster.pk)
    return found


def _lease_end(cluster_id: int) -> None:
    """The cluster gave its public subnet back (it ended, or was made closed)."""
    PublicSubnetLease.objects.filter(cluster_id=cluster_id, ended_at=None).update(ended_at=timezone.now())


@transaction.atomic
def _end(cluster_id: int, generation: int, allowed: tuple[str, ...], **fields) -> bool:
    """End the cluster (only from an ``allowed`` state, and only in the workflow's ``generation``): its nodes
    are removed, its public subnet is free, and ``cluster_ended`` revokes credentials after commit. Whether
    it ended now."""
    if VirtualCluster.objects.filter(pk=cluster_id, state__in=allowed, workflow_generation=generation).update(
        ended_at=timezone.now(), public_subnet="", **fields
    ):
        cluster = VirtualCluster.objects.get(pk=cluster_id)
        Node.objects.filter(cluster=cluster).exclude(state=NodeState.REMOVED).update(
            state=NodeState.REMOVED, removed_at=cluster.ended_at
        )
        _lease_end(cluster_id)
        # robust: the cluster has ended whatever a receiver does (access revokes its credentials; its periodic
        # sweep revokes what a failed receiver left)
        transaction.on_commit(lambda: cluster_ended.send(VirtualCluster, cluster=cluster), robust=True)
        return True
    return False


def cluster_finish_teardown(*, cluster_id: int, generation: int) -> None:
    _end(cluster_id, generation, (ClusterState.TEARING_DOWN,), state=ClusterState.TORN_DOWN, segment=None)


def cluster_fail(*, cluster_id: int, generation: int, reason: str) -> bool:
    """The workflow failed for good after compensation: FAILED with the reason; credentials revoked.
    Whether it failed now (not when another generation moved on, or it had ended already)."""
    return _end(cluster_id, generation, LIVE_STATES, state=ClusterState.FAILED, state_reason=reason[:2000])


def cluster_mark_provisioning(*, cluster_id: int, generation: int) -> bool:
    return bool(
        VirtualCluster.objects.filter(
            pk=cluster_id, state=ClusterState.REQUESTED, workflow_generation=generation
        ).update(state=ClusterState.PROVISIONING, updated_at=timezone.now())
    )


@transaction.atomic
def cluster_provisioning_started(*, cluster_id: int, generation: int) -> ClusterStep | None:
    """The provisioning workflow is about to be sent: PROVISIONING, with its running ``network`` step."""
    if not cluster_mark_provisioning(cluster_id=cluster_id, generation=generation):
        return None
    return ClusterStep.objects.create(
        cluster_id=cluster_id, name="network", generation=generation, status=StepStatus.RUNNING
    )


def cluster_workflow_sent(*, cluster_id: int, generation: int) -> None:
    """The provisioning, node change or teardown of ``generation`` is with the broker: a process that dies before
    this (after the commit that made the cluster PROVISIONING, UPDATING or TEARING_DOWN), or a send the broker
    refused, leaves it unmarked, and ``clusters_resend_unsent`` (``clusters_resend_unsent_updates``,
    ``clusters_retry_stuck_teardowns``) sends it again."""
    VirtualCluster.objects.filter(pk=cluster_id, workflow_generation=generation).update(provision_sent=generation)


@transaction.atomic
def cluster_provisioning_not_started(*, cluster_id: int, generation: int, step: ClusterStep | None) -> None:
    """The workflow could not be sent (broker down): back to REQUESTED, so ``clusters_resume_requested``
    sends it again; no request is lost."""
    if step is None:
        return
    VirtualCluster.objects.filter(
        pk=cluster_id, state=ClusterState.PROVISIONING, workflow_generation=generation
    ).update(state=ClusterState.REQUESTED)
    ClusterStep.objects.filter(pk=step.pk, status=StepStatus.RUNNING).delete()  # (not one a sweep ended meanwhile)


def cluster_mark_ready(*, cluster_id: int, generation: int, step: str = "", nodes_ready: bool = True) -> bool:
    """READY only when every participant reported success (the workflow calls this last). ``step``: a
    finished step of that name is recorded in the same transaction, so whoever sees READY (a long poll wakes
    at this commit) also sees its progress complete."""
    with transaction.atomic():
        now = timezone.now()
        updated = VirtualCluster.objects.filter(
            pk=cluster_id,
            state__in=(ClusterState.PROVISIONING, ClusterState.UPDATING),
            workflow_generation=generation,
        ).update(  # ready_at: the first time (the provisioning's latency is measured to it), not the last update
            state=ClusterState.READY, ready_at=Coalesce("ready_at", Value(now)), updated_at=now
        )
        if updated and nodes_ready:  # (after a failed update the new nodes' network is not there: PENDING)
            _pending_converged(cluster_id).update(state=NodeState.READY)
        if updated and step:
            ClusterStep.objects.create(
                cluster_id=cluster_id,
                name=step,
                generation=generation,
                status=StepStatus.OK,
                started_at=now,
                finished_at=now,
            )
            # robust: the cluster is READY whatever a receiver does (access pushes it to the local gateways)
            transaction.on_commit(lambda: cluster_ready.send(VirtualCluster, cluster_id=cluster_id), robust=True)
        return bool(updated)


def _pending_converged(cluster_id: int) -> QuerySet[Node]:
    """The PENDING nodes of a cluster whose node change converged: those on an enabled host behind an enabled
    switch (``network.selectors.hosts_unavailable``). A disabled device is never touched by convergence — a node
    left PENDING there by a failed add has no network yet, however well a later change of the cluster went (it was
    made READY with it)."""
    return Node.objects.filter(
        cluster_id=cluster_id, state=NodeState.PENDING, host__enabled=True, host__switch_port__switch__enabled=True
    )


def _locked(cluster: VirtualCluster) -> VirtualCluster:
    """The cluster as it is now, its row locked until the transaction ends: a node change reads the nodes
    (the last one? the node's state?) only once no other change of this cluster is between its check and
    its claim (the READY → UPDATING transition)."""
    return VirtualCluster.objects.select_for_update(no_key=True).get(pk=cluster.pk)


# States whose workflow ends in READY (or FAILED): a change refused in one of them is worth retrying.
_BUSY_STATES = (ClusterState.REQUESTED, ClusterState.PROVISIONING, ClusterState.UPDATING)


def _require_ready(cluster: VirtualCluster) -> None:
    """A 409 unless ``cluster`` is READY: ``Busy`` while a workflow runs that ends in READY (retry later),
    ``Conflict`` once it has ended, is tearing down, or its provisioning failed and is being rolled back (it
    ends FAILED: never)."""
    if cluster.state == ClusterState.READY:
        if cluster.expires_at is not None and cluster.expires_at <= timezone.now():  # (the sweep ends it soon)
            raise Conflict(f"cluster {cluster.name} has expired: it is torn down")
        return
    if cluster.state == ClusterState.PROVISIONING and _rolling_back(cluster):
        raise Conflict(f"cluster {cluster.name}'s provisioning failed and is being rolled back: it ends failed")
    error = Busy if cluster.state in _BUSY_STATES else Conflict
    raise error(f"cluster {cluster.name} is {cluster.get_state_display()}; this needs it to be ready")


def _rolling_back(cluster: VirtualCluster) -> bool:
    """Whether the current workflow of ``cluster`` is the rollback of a failed provisioning."""
    return ClusterStep.objects.filter(
        cluster=cluster, name="compensate", generation=cluster.workflow_generation, status=StepStatus.RUNNING
    ).exists()


def _segment_hosts(cluster: VirtualCluster) -> list[Host]:
    hosts: dict[int, Host] = {}
    for node in cluster.nodes.exclude(state=NodeState.REMOVED).select_related("host", "target_host"):
        hosts[node.host_id] = node.host
        if node.target_host_id:
            hosts[node.target_host_id] = node.target_host
    return sorted(hosts.values(), key=lambda h: h.pk)


def _reconverge(
    cluster: VirtualCluster,
    step_name: str,
    detail: str,
    *,
    field: str = "nodes",
    allowed: tuple[str, ...] = (ClusterState.READY,),
) -> None:
    """The cluster UPDATING (from one of ``allowed``; a new generation), its network set to its nodes' hosts and
    converged; a network refusal names ``field`` (the request's)."""
    cluster = _transition(cluster, allowed, ClusterState.UPDATING)
    try:
        net.segment_set_hosts(segment=cluster.segment, hosts=_segment_hosts(cluster))
    except net_errors.NetworkError as exc:
        raise _segment_error(exc, field=field) from None
    step = step_start(cluster, step_name, detail=detail)
    transaction.on_commit(lambda: workflows.start_update(cluster.pk, cluster.workflow_generation, step.pk))


def _pending_again(cluster: VirtualCluster, nodes: list[NodeRequest]) -> dict[str, Node]:
    """Of ``nodes``, those asked for again as they are (name, host, MAC, and the address when one is given) while
    still PENDING — an earlier add whose network did not converge (a device failed, or the deadline ended it):
    by name."""
    pending = {n.name: n for n in cluster.nodes.filter(state=NodeState.PENDING, name__in=[r.name for r in nodes])}
    return {
        r.name: pending[r.name]
        for r in nodes
        if r.name in pending
        and (pending[r.name].host_id, pending[r.name].mac.lower()) == (r.host.pk, r.mac.lower())
        and (not r.address or _same_address(r.address, pending[r.name].address))
    }


def _same_address(a: str | None, b: str | None) -> bool:
    return bool(a and b) and ipaddress.ip_address(str(a)) == ipaddress.ip_address(str(b))


@transaction.atomic
def cluster_nodes_add(*, cluster: VirtualCluster, nodes: list[NodeRequest]) -> list[Node]:
    """Add ``nodes`` and converge the network onto their hosts. A node asked for again as it is while it is
    still PENDING (its add did not converge) is not added twice: the network is converged again for it — the
    way to retry a failed add."""
    cluster = _locked(cluster)
    _require_ready(cluster)
    if len({n.name for n in nodes}) != len(nodes):  # (before any is taken for a retry of a pending one)
        raise ClusterError("node names must be unique within the cluster", field="nodes")
    again = _pending_again(cluster, nodes)
    unavailable = net_selectors.hosts_unavailable(node.host_id for node in again.values())
    for node in again.values():  # (a new node's host is checked as it is added: _check_nodes)
        if node.host_id in unavailable:
            raise InvalidTopology(unavailable[node.host_id], field="nodes")
    nodes = [n for n in nodes if n.name not in again]
    if nodes:
        _check_nodes(nodes, cluster=cluster)
        quota_check(owner=cluster.owner, group=cluster.group, clusters=0, nodes=len(nodes))
    if cluster.public_subnet and nodes:
        live = cluster.nodes.exclude(state=NodeState.REMOVED).values_list("address", flat=True)
        nodes = _with_public_addresses(cluster, nodes, taken=live)
    try:
        with transaction.atomic():
            created = audit.create_rows(
                Node,
                [Node(cluster=cluster, name=n.name, host=n.host, mac=n.mac.lower(), address=n.address) for n in nodes],
                related=("cluster",),
            )
    except IntegrityError:
        raise ClusterError("a MAC address or node name is already in use", field="nodes") from None
    detail = [f"{n.name}@{n.host.name}" for n in nodes] + [f"{n.name}@{n.host.name} (again)" for n in again.values()]
    _reconverge(cluster, "nodes.add", ", ".join(detail))
    return sorted([*created, *again.values()], key=lambda n: n.name)


def cluster_update_done(*, cluster_id: int, generation: int, step_id: int) -> None:
    """A node change converged: its step is OK and the cluster READY. One that the deadline (or a failed retry's
    report) ended first did converge after all: the cluster is READY in that same generation, and the nodes it
    left PENDING have their network now — they are READY too (the step stays failed, with why)."""
    ClusterStep.objects.filter(pk=step_id, status=StepStatus.RUNNING).update(
        status=StepStatus.OK, finished_at=timezone.now()
    )
    if cluster_mark_ready(cluster_id=cluster_id, generation=generation):
        return
    with transaction.atomic():  # (the row lock: a node change now is either all before this or all after)
        ended = VirtualCluster.objects.select_for_update(no_key=True).filter(
            pk=cluster_id, state=ClusterState.READY, workflow_generation=generation
        )
        if ended.exists():
            late = _pending_converged(cluster_id)
            names = sorted(late.values_list("name", flat=True))
            if late.update(state=NodeState.READY):
                logger.info("cluster %s: a node change ended late but converged: %s ready", cluster_id, names)


@transaction.atomic
def cluster_node_remove(*, cluster: VirtualCluster, node: Node) -> None:
    cluster = _locked(cluster)
    _require_ready(cluster)
    node.refresh_from_db()  # as it is now: read before the lock
    if node.state == NodeState.REMOVED:  # a concurrent request removed it (and its update ended) meanwhile
        raise Conflict(f"node {node.name} has been removed already")
    if node.state == NodeState.MIGRATING:  # its VM may be on its way: the network of both hosts stays till it ends
        raise Conflict(f"node {node.name} is migrating: complete or cancel its migration first")
    if cluster.nodes.exclude(state=NodeState.REMOVED).count() <= 1:
        raise Conflict("the last node cannot be removed; tear the cluster down instead")
    node.state = NodeState.REMOVED
    node.removed_at = timezone.now()
    node.save(update_fields=["state", "removed_at"])
    _reconverge(cluster, "nodes.remove", f"{node.name}@{node.host.name}")


@transaction.atomic
def node_migrate_prepare(*, cluster: VirtualCluster, node: Node, target: Host) -> Node:
    """Make the network ready on ``target`` (its bridge, its site switch, the core) before the VM moves."""
    cluster = _locked(cluster)
    _require_ready(cluster)
    node.refresh_from_db()
    if node.state != NodeState.READY:
        raise Conflict(f"node {node.name} is {node.get_state_display()}; only a ready node can migrate")
    if target.pk == node.host_id:
        raise ClusterError(f"node {node.name} already runs on {target.name}", field="target_host")
    why = net_selectors.hosts_unavailable([target.pk]).get(target.pk)
    if why:
        raise InvalidTopology(why, field="target_host")
    node.target_host = target
    node.state = NodeState.MIGRATING
    node.save(update_fields=["target_host", "state"])
    _reconverge(cluster, "migrate.prepare", f"{node.name}: {node.host.name} → {target.name}", field="target_host")
    return node


@transaction.atomic
def node_migrate_complete(*, cluster: VirtualCluster, node: Node) -> Node:
    """The VM now runs on its target: clean the source if no node of the cluster is left there."""
    return _migration_end(cluster, node, moved=True)


@transaction.atomic
def node_migrate_cancel(*, cluster: VirtualCluster, node: Node) -> Node:
    """The VM did not move (the hypervisors' migration failed or was called off): the node stays on its
    host and the network prepared on the target is taken away again (its bridge, and its switch and the core
    when no other node of the cluster needs them)."""
    return _migration_end(cluster, node, moved=False)


def _migration_end(cluster: VirtualCluster, node: Node, *, moved: bool) -> Node:
    """End the node's migration (409 when it is not migrating): on the target when the VM ``moved``, else
    where it was; the host it leaves is cleaned by the update this starts."""
    cluster = _locked(cluster)
    _require_ready(cluster)
    node.refresh_from_db()
    if node.state != NodeState.MIGRATING or node.target_host_id is None:
        raise Conflict(f"node {node.name} is not migrating")
    source, target = node.host, node.target_host
    if moved:
        node.host, step, detail = target, "migrate.complete", f"{node.name}: left {source.name}"
    else:
        step, detail = "migrate.cancel", f"{node.name}: stays on {source.name}, {target.name} is left"
    node.target_host = None
    node.state = NodeState.READY
    node.save(update_fields=["host", "target_host", "state"])
    _reconverge(cluster, step, detail)
    return node


def image_source_digest(source: str) -> str:
    """What an approval page sends back for the image source it showed (``image_approve`` compares it)."""
    return hashlib.sha256(source.encode()).hexdigest()


@transaction.atomic
def image_approve(*, image: Image, shown: str | None) -> bool:
    """The provider vouches for ``image`` (audited): only for the version the admin was shown (``shown``: its
    ``image_source_digest``) — an owner who changed the source meanwhile (the change took any approval away)
    gets no approval for one nobody reviewed. Whether it was approved now (False: changed, or not shown; an
    image approved meanwhile is left as it is, False too)."""
    locked = Image.objects.select_for_update(no_key=True).filter(pk=image.pk, approved=False).first()
    if locked is None or shown is None or not hmac.compare_digest(shown, image_source_digest(locked.source)):
        return False
    locked.approved = True
    locked.save(update_fields=["approved"])  # (audited by the model's registration)
    return True


def image_approval_withdraw(*, image: Image, admin) -> tuple[list[VirtualCluster], list[tuple[VirtualCluster, str]]]:
    """The provider no longer vouches for ``image`` (paper §2.1): it is unapproved (audited), and every live
    public cluster booting it is made closed, as an override by ``admin`` naming why — public only because the
    image was approved, they would stay on the provider's routed addresses until they end. One an administrator
    made public by an override stays as it is (they vouched for that cluster). (closed, left with why): a
    cluster in a workflow (provisioning, a node change), or one its network cannot close (its core reaches no
    access gateway), is not changed; withdrawing again closes it once it can be."""
    if not (selectors.staff_may(admin, "change", Image) and selectors.staff_may(admin, "change", VirtualCluster)):
        raise NotAllowed("only an administrator who may change images and clusters withdraws an approval")
    with transaction.atomic():
        locked = Image.objects.select_for_update().get(pk=image.pk)  # (a create reading it waits, then sees it)
        if locked.approved:
            locked.approved = False
            locked.save(update_fields=["approved"])
    closed, left = [], []
    public = VirtualCluster.objects.filter(
        image=image, state__in=LIVE_STATES, connectivity=Connectivity.PUBLIC, connectivity_overridden=False
    ).select_related("owner")
    for cluster in public.order_by("pk"):
        try:
            closed.append(
                connectivity_override(
                    cluster=cluster,
                    connectivity=Connectivity.CLOSED,
                    admin=admin,
                    reason=f"image {image.name} is no longer approved",
                )
            )
        except Busy:
            left.append((cluster, "in a workflow now"))
        except Conflict:  # ended meanwhile
            continue
        except ClusterError as exc:  # its network cannot be closed (no access gateway its core reaches)
            left.append((cluster, str(exc)))
    return closed, left


@transaction.atomic
def connectivity_override(*, cluster: VirtualCluster, connectivity: str, admin, reason: str) -> VirtualCluster:
    """An admin overrides the policy (audited). Takes effect on the network through the gateway leg. The
    row is locked and only the connectivity fields are written: a request that changed the cluster meanwhile
    (a lifetime, a node change that made it UPDATING) is neither undone nor overtaken."""
    if not selectors.staff_may(admin, "change", VirtualCluster):  # (the admin's action asks the same)
        raise NotAllowed("only an administrator can override the connectivity policy")
    return _connectivity_set(
        cluster=cluster, connectivity=connectivity, reason=f"overridden by {admin.get_username()}: {reason}", by=admin
    )


def _connectivity_set(*, cluster: VirtualCluster, connectivity: str, reason: str, by) -> VirtualCluster:
    """Make a READY cluster ``connectivity`` (the row locked), for ``reason``: an admin's override (``by``) or the
    policy's own decision (``by`` None); see ``connectivity_override``."""
    cluster = _locked(cluster)
    _require_ready(cluster)
    if connectivity == cluster.connectivity:
        return cluster
    old = cluster.connectivity
    cluster.connectivity = connectivity
    room = VirtualCluster._meta.get_field("connectivity_reason").max_length
    cluster.connectivity_reason = reason[:room]
    cluster.connectivity_overridden_by = by
    cluster.connectivity_overridden = by is not None
    if connectivity == Connectivity.PUBLIC:
        if not PublicPrefix.objects.exists():
            raise InvalidTopology("no public prefix is configured", field="connectivity")
        cluster.public_prefix, cluster.public_subnet = _allocate_public_subnet()
        # On the provider's routed network the nodes take addresses of its subnet (the VMs renumber).
        live = list(cluster.nodes.exclude(state=NodeState.REMOVED).order_by("name"))
        try:
            addresses = _public_addresses(cluster, [(n.name, None) for n in live])
        except ClusterError:
            raise ClusterError(
                f"the cluster's {len(live)} nodes do not fit in a public subnet ({cluster.public_subnet})",
                field="connectivity",
            ) from None
        for node, address in zip(live, addresses, strict=True):
            node.address = address
        Node.objects.bulk_update(live, ["address"])
    else:
        cluster.public_subnet = ""  # (the nodes keep their addresses: a closed cluster may use any)
        cluster.closed_since = timezone.now()  # the gateways have it once they installed a state made after this
    cluster.save(
        update_fields=[
            "connectivity",
            "connectivity_reason",
            "connectivity_overridden_by",
            "connectivity_overridden",
            "public_prefix",
            "public_subnet",
            "closed_since",
        ]
    )
    if connectivity == Connectivity.PUBLIC:
        _lease_start(cluster)
    else:
        _lease_end(cluster.pk)
    audit.record(cluster, "action", message=f"connectivity {old} → {connectivity}: {cluster.connectivity_reason}")
    try:
        net.segment_set_gateway(segment=cluster.segment, gateway=connectivity == Connectivity.CLOSED)
    except net_errors.NetworkError as exc:
        raise _segment_error(exc, field="connectivity") from None
    _reconverge(cluster, "connectivity", f"{old} → {connectivity}")
    return cluster


def clusters_close_unapproved_public() -> list[int]:
    """The policy once an image's approval is withdrawn (the periodic task calls this): a live public cluster
    booting an image no longer approved, public only because it was (no admin's override), is made closed — also
    one that was in a workflow when the approval was withdrawn (``image_approval_withdraw`` left it), or that a
    create committed as public meanwhile: it would stay on the provider's routed addresses until it ends. One in
    a workflow now is closed at a later run, once it is READY; ids of the clusters closed."""
    closed = []
    found = VirtualCluster.objects.filter(
        state=ClusterState.READY,
        connectivity=Connectivity.PUBLIC,
        connectivity_overridden=False,
        image__approved=False,
    ).select_related("image")
    for cluster in found.order_by("pk"):
        try:
            with audit.audit_actor("policy"), transaction.atomic():
                locked = _locked(cluster)
                if locked.connectivity_overridden:
                    continue  # an administrator vouched for it meanwhile
                _connectivity_set(
                    cluster=locked,
                    connectivity=Connectivity.CLOSED,
                    reason=f"closed by the policy: image {cluster.image.name} is no longer approved",
                    by=None,
                )
        except (Busy, Conflict):  # in a workflow (a later run), or ended meanwhile
            continue
        except ClusterError as exc:  # its network cannot be closed now (no access gateway its core reaches)
            logger.warning("clusters: cluster %s stays public for now: %s", cluster.pk, exc)
            continue
        closed.append(cluster.pk)
    return closed


def clusters_expire() -> list[int]:
    """Tear down every active cluster past its expiry (the periodic task calls this)."""
    ids = []
    now = timezone.now()
    for cluster in VirtualCluster.objects.filter(state__in=ACTIVE_STATES, expires_at__lte=now):
        try:
            with audit.audit_actor("expiry"):
                if cluster_teardown(cluster=cluster, reason="lifetime expired", expired_by=now) is not None:
                    ids.append(cluster.pk)
        except Conflict:
            continue  # changed state meanwhile; the next run looks again
    return ids


EVENT_LOCK = 1447231507  # the event feed's advisory lock (migration 0008): ids in commit order


def clusters_warn_expiring() -> list[int]:
    """An ``expiring`` event (the feed, the webhooks) for every active cluster whose expiry comes within
    ``CLUSTER_EXPIRY_WARNING`` (and within half its lifetime), once per expiry: an extension warns again when the
    new one comes near. Written
    under the feed's lock, as the triggers write theirs, so event ids keep the order of commits; on PostgreSQL the
    feed's long polls are woken. Returns the clusters warned (the periodic expiry calls this)."""
    if not settings.CLUSTER_EXPIRY_WARNING:
        return []
    now = timezone.now()
    due = VirtualCluster.objects.filter(
        state__in=ACTIVE_STATES,
        expires_at__gt=now,
        expires_at__lte=now + timedelta(seconds=settings.CLUSTER_EXPIRY_WARNING),
    ).exclude(expiry_warned_for=F("expires_at"))
    warned = []
    # a cluster whose whole lifetime is shorter than twice the warning is warned halfway through it: one made for a
    # two-hour job was warned (and its owner mailed) within a minute of its creation, at every job
    halfway = [
        (pk, ends)
        for pk, made, ends in due.values_list("pk", "created_at", "expires_at")
        if ends - now <= (ends - made) / 2
    ]
    for cluster_id, ends in halfway:
        with transaction.atomic():
            # the row first, then the feed's lock: the order of a state change (its UPDATE, then the trigger at
            # commit) — the other order deadlocks with a change of this cluster committing meanwhile. The expiry
            # as read: one extended meanwhile (clusters are extended as their end nears) is not warned of an end
            # weeks away now, and then never of that one
            cluster = (
                VirtualCluster.objects.select_for_update(no_key=True)
                .filter(pk=cluster_id, state__in=ACTIVE_STATES, expires_at__gt=now, expires_at=ends)
                .exclude(expiry_warned_for=F("expires_at"))
                .first()
            )
            if cluster is None:  # ended, extended, or warned by another run, meanwhile
                continue
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", [EVENT_LOCK])
            ClusterEvent.objects.create(
                cluster=cluster, kind=EventKind.EXPIRING, state=cluster.state, at=timezone.now()
            )
            VirtualCluster.objects.filter(pk=cluster.pk).update(expiry_warned_for=cluster.expires_at)
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_notify('virtcloud_cluster_state', %s)", [str(cluster.pk)])
        warned.append(cluster_id)
    return warned


def clusters_mail_expiring(*, limit: int = 200) -> list[int]:
    """An e-mail to the owner of every cluster warned of its expiry (``clusters_warn_expiring``) and not mailed
    about that expiry yet (an extension mails again when the new one comes near). Each is claimed before it is
    sent (two runs never mail one expiry twice); a relay that cannot take it now (not reached, a 4xx) gives the
    claim back and the next run tries again, one that refuses it for good (a 5xx) does not. An owner without an
    address is not mailed. A run sends for at most ``mail.BUDGET`` s. Returns the clusters mailed."""
    from portal import mail

    if not settings.EMAIL_ENABLED:
        return []
    now = timezone.now()
    due = (
        VirtualCluster.objects.filter(state__in=ACTIVE_STATES, expires_at__gt=now, expiry_warned_for=F("expires_at"))
        .exclude(expiry_mailed_for=F("expires_at"))
        .select_related("owner")
        .order_by("expires_at")[:limit]
    )
    mailed = []
    budget = mail.Budget()
    for cluster in due:
        if not budget.left():
            break  # the rest: the next run
        if _mail_once(  # (not if extended meanwhile)
            VirtualCluster.objects.filter(pk=cluster.pk, expires_at=cluster.expires_at),
            field="expiry_mailed_for",
            value=cluster.expires_at,
            to=cluster.owner.email,
            subject=_expiry_subject(cluster),
            body=_expiry_body(cluster, now),
        ):
            mailed.append(cluster.pk)
    return mailed


def _mail_once(rows: QuerySet, *, field: str, value, to: str, subject: str, body: str) -> bool:
    """Claim a mail — ``field`` = ``value`` on ``rows`` (one row, as it must still be), unless it holds it already:
    two runs never send it twice — then send it; a relay that cannot take it now gives the claim back for the next
    run (``mail.send_claimed``). No address: claimed, not sent. Whether it was sent."""
    from portal import mail

    if not rows.exclude(**{field: value}).update(**{field: value}):
        return False  # changed, or mailed by another run, meanwhile
    if not to:
        return False
    return mail.send_claimed(
        give_back=lambda: rows.filter(**{field: value}).update(**{field: None}), to=to, subject=subject, body=body
    )


def _expiry_subject(cluster: VirtualCluster) -> str:
    return f"VirtCloud: your cluster {cluster.name} ends {cluster.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _expiry_body(cluster: VirtualCluster, now) -> str:
    owner = cluster.owner
    left = max(0, int((cluster.expires_at - now).total_seconds()))
    hours = f"{round(left / 3600)} h" if left >= 3600 else f"{max(1, round(left / 60))} min"
    job = f", job {cluster.job_id}" if cluster.job_id else ""
    return (
        f"Hello {owner.get_short_name() or owner.get_username()},\n\n"
        f"your virtual cluster {cluster.name} (id {cluster.pk}{job}) ends at "
        f"{cluster.expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC, in about {hours}: its network is then torn "
        "down, and its VPN and SSH access end with it.\n\n"
        f"To keep it longer, extend its lifetime on {settings.SITE_URL.rstrip('/')}/ (Extend, beside the "
        "cluster), or ask whoever runs your jobs to.\n\n"
        "-- \nVirtCloud portal\n"
    )


def _stalled(state: str, older_than: timedelta) -> QuerySet[VirtualCluster]:
    return VirtualCluster.objects.filter(state=state, updated_at__lt=timezone.now() - older_than)


def _restart_stalled(
    stalled: QuerySet[VirtualCluster], start, *, error: str = "stalled: started again", **fields
) -> list[int]:
    """The clusters ``stalled`` lists get their workflow ``start``-ed again, each in a new generation (a late
    callback of the old one changes nothing), with ``fields`` changed too; the old one's running steps fail with
    ``error``. The conditional UPDATE claims each cluster ``stalled`` still lists: two periodic runs never start
    one twice, and one that moved on meanwhile is left alone."""
    ids = []
    for cluster_id in stalled.values_list("pk", flat=True):
        with transaction.atomic():
            if stalled.filter(pk=cluster_id).update(
                workflow_generation=F("workflow_generation") + 1, updated_at=timezone.now(), **fields
            ):
                generation = VirtualCluster.objects.values_list("workflow_generation", flat=True).get(pk=cluster_id)
                # the stalled workflow never reports: its running steps end here (the new one's callbacks end
                # only their own), or one of them would stay the progress's current step for good
                ClusterStep.objects.filter(
                    cluster_id=cluster_id, status=StepStatus.RUNNING, generation__lt=generation
                ).update(status=StepStatus.FAILED, error=error, finished_at=timezone.now())
                transaction.on_commit(lambda cid=cluster_id, gen=generation: start(cid, gen))
                ids.append(cluster_id)
    return ids


def clusters_retry_stuck_teardowns(*, older_than: timedelta = timedelta(minutes=5)) -> list[int]:
    """Teardowns begun at least ``older_than`` ago are started again, in a new generation, when they failed
    part-way (a device was down: ``teardown_failed`` failed the step), never reached the broker
    (``provision_sent`` is not this generation), or made no progress for as long as a rollback may take
    (``network.services.rollback_stalled_after``: the work was lost). One that was sent and waits in a slow queue,
    or is running, is left alone: restarting it would fail it, and add another copy to that queue at every run."""
    failed = ClusterStep.objects.filter(
        cluster=OuterRef("pk"), name="teardown", generation=OuterRef("workflow_generation"), status=StepStatus.FAILED
    )
    lost = timezone.now() - net.rollback_stalled_after()
    stuck = _stalled(ClusterState.TEARING_DOWN, older_than).filter(
        Exists(failed) | Q(provision_sent=None) | ~Q(provision_sent=F("workflow_generation")) | Q(updated_at__lt=lost)
    )
    return _restart_stalled(stuck, workflows.start_teardown)


def steps_finish_running(cluster: VirtualCluster, name: str, *, generation: int, error: str = "") -> None:
    """The running steps ``name`` of ``cluster``'s workflow ``generation`` end: OK, or FAILED with ``error``
    (a late callback of an older workflow never ends the step of the one running now)."""
    ClusterStep.objects.filter(cluster=cluster, name=name, generation=generation, status=StepStatus.RUNNING).update(
        status=StepStatus.FAILED if error else StepStatus.OK, error=error, finished_at=timezone.now()
    )


def cluster_provisioning_failed(*, cluster_id: int, generation: int, reason: str) -> bool:
    """A provisioning failed: the first report claims the rollback (the generation moves on, so the
    failed workflow's later callbacks change nothing) and starts it; any later report does nothing.
    Whether this one claimed it."""
    with transaction.atomic():
        claimed = VirtualCluster.objects.filter(
            pk=cluster_id,
            workflow_generation=generation,
            state__in=(ClusterState.REQUESTED, ClusterState.PROVISIONING),
        ).update(  # updated_at: the rollback starts now (the deadline measures it from here); PROVISIONING: a
            # requested one is not taken for a provisioning that never started (clusters_resume_requested)
            workflow_generation=F("workflow_generation") + 1,
            state=ClusterState.PROVISIONING,
            state_reason=reason[:2000],
            updated_at=timezone.now(),
        )
        if not claimed:
            return False
        cluster = VirtualCluster.objects.get(pk=cluster_id)
        step_start(cluster, "compensate", detail=reason)  # (with the claim: a change is never told "busy" between)
    steps_finish_running(cluster, "network", generation=generation, error=reason)
    logger.warning("cluster %s provisioning failed: %s; compensating", cluster_id, reason)
    workflows.start_compensation(cluster_id, generation + 1, reason)
    return True


def _still_waiting(cluster: VirtualCluster) -> str:
    """ "; still waiting: <device> (<its worker queue>), …" for the unfinished device changes of ``cluster``."""
    waiting = DeviceChange.objects.filter(
        segment_id=cluster.segment_id, status__in=[DeviceChange.Status.PENDING, DeviceChange.Status.RUNNING]
    ).select_related("switch__site", "host__site")
    devices = sorted(
        {f"{c.device} ({_queue_text(c.switch or c.host)})" for c in waiting if (c.switch or c.host) is not None}
    )
    return f"; still waiting: {', '.join(devices)}" if devices else ""


def clusters_end_stalled_workflows() -> list[int]:
    """Workflows still running ``CLUSTER_PROVISION_TIMEOUT`` s after they started end, so that a scheduler
    is never left waiting for a worker that does not come: a provisioning fails — the reason names the
    devices still waiting and the worker queue each waits on — and is rolled back; a rollback still running
    after as long again ends the cluster FAILED (the network keeps the VLAN until its rollback finishes);
    an update (nodes added or removed, a migration) fails its step with that reason and the cluster is
    READY again, as when the update fails (the reconciler keeps the devices at the desired state). Returns
    the clusters ended or rolled back."""
    timeout = settings.CLUSTER_PROVISION_TIMEOUT
    late = VirtualCluster.objects.filter(updated_at__lt=timezone.now() - timedelta(seconds=timeout))
    ended = []
    provisioning = late.filter(state=ClusterState.PROVISIONING).only(
        "pk", "workflow_generation", "segment_id", "state_reason"
    )
    for cluster in provisioning:
        generation = cluster.workflow_generation
        rolling_back = ClusterStep.objects.filter(
            cluster=cluster, name="compensate", generation=generation, status=StepStatus.RUNNING
        ).exists()
        with audit.audit_actor("provisioning deadline"):
            if rolling_back:
                reason = f"the rollback did not finish within {timeout} s{_still_waiting(cluster)}"
                steps_finish_running(cluster, "compensate", generation=generation, error=reason)
                if cluster_fail(
                    cluster_id=cluster.pk, generation=generation, reason=f"{cluster.state_reason}; {reason}"
                ):
                    ended.append(cluster.pk)
                continue
            reason = f"provisioning did not finish within {timeout} s{_still_waiting(cluster)}"
            if cluster_provisioning_failed(cluster_id=cluster.pk, generation=generation, reason=reason):
                ended.append(cluster.pk)
    for cluster in late.filter(state=ClusterState.UPDATING).only("pk", "workflow_generation", "segment_id"):
        reason = f"the update did not finish within {timeout} s{_still_waiting(cluster)}"
        running = ClusterStep.objects.filter(
            cluster=cluster, generation=cluster.workflow_generation, status=StepStatus.RUNNING
        )
        if cluster_update_failed(
            cluster_id=cluster.pk, generation=cluster.workflow_generation, steps=running, reason=reason
        ):
            ended.append(cluster.pk)
    return ended


@transaction.atomic
def cluster_update_failed(*, cluster_id: int, generation: int, steps, reason: str) -> bool:
    """A node change (add, remove, migration) could not be applied: its ``steps`` record why and the cluster
    is READY again (the reconciler keeps the devices at the desired state; nodes being added stay PENDING).
    A migration whose preparation failed is given up: the node stays where it runs, READY, and the target
    leaves the cluster's network (an update of its own). Whether it was still updating."""
    failed = list(steps.values_list("name", "detail"))
    steps.update(status=StepStatus.FAILED, error=reason[:2000], finished_at=timezone.now())
    moving = [detail.split(":", 1)[0] for name, detail in failed if name == "migrate.prepare"]
    if moving:
        with transaction.atomic():
            cluster = VirtualCluster.objects.select_for_update(no_key=True).get(pk=cluster_id)
            nodes = cluster.nodes.filter(name__in=moving, state=NodeState.MIGRATING).select_related("target_host")
            given_up = ", ".join(f"{n.name} stays on its host, {n.target_host.name} is left" for n in nodes)
            if cluster.state == ClusterState.UPDATING and cluster.workflow_generation == generation and given_up:
                # straight into the update that leaves the target (never READY in between: a "ready" event the
                # feed and webhooks carried, for a state nobody could see, told a scheduler to move the VM)
                nodes.update(state=NodeState.READY, target_host=None)
                _reconverge(cluster, "migrate.abort", given_up, allowed=(ClusterState.UPDATING,))
                return True
    return cluster_mark_ready(cluster_id=cluster_id, generation=generation, nodes_ready=False)


def _queue_text(device) -> str:
    return f"queue {device.queue}" if device.queue else "the central worker"


def clusters_roll_back_abandoned_networks() -> list[int]:
    """Failed clusters whose network was never rolled back get its rollback sent again: the rollback could not
    be sent (the broker was down when the provisioning failed, and the deadline then ended the cluster), or it
    failed before it claimed the segment — which is then still in the devices' desired state (the reconciler
    would keep the VLAN on them) with its VLAN allocated. The network's claim makes a rollback sent twice do
    its work once. Returns those clusters (a broker still down: the next run sends the rest)."""
    ids = []
    abandoned = VirtualCluster.objects.filter(state=ClusterState.FAILED, segment__state__in=Segment.DESIRED_STATES)
    for cluster_id, segment_id in abandoned.values_list("pk", "segment_id").order_by("pk"):
        try:
            workflows.roll_back_network(segment_id)
        except Exception:
            logger.exception("could not send the rollback of cluster %s's network; the next run retries", cluster_id)
            break
        logger.warning("cluster %s failed with its network still configured: rolling it back", cluster_id)
        ids.append(cluster_id)
    return ids


def clusters_resend_unsent(*, older_than: timedelta = timedelta(seconds=60)) -> list[int]:
    """Clusters PROVISIONING for longer than ``older_than`` whose workflow never reached the broker (the process
    that committed PROVISIONING died before it sent the workflow: ``provision_sent`` is not this generation)
    are made REQUESTED again, in a new generation, and their provisioning sent — rather than failed at the
    deadline as if a device had not answered. One that was sent and merely waits in a slow queue is left alone.
    (Dying after the send and before the mark sends it twice: the first copy's callbacks are a generation
    behind and change nothing, and converging twice is harmless.)"""
    provisioning = ClusterStep.objects.filter(  # (a rollback runs in a generation of its own, with no such step)
        cluster=OuterRef("pk"), name="network", generation=OuterRef("workflow_generation"), status=StepStatus.RUNNING
    )
    unsent = (
        _stalled(ClusterState.PROVISIONING, older_than)
        .filter(Exists(provisioning))
        .exclude(provision_sent=F("workflow_generation"))
    )
    ids = _restart_stalled(
        unsent, workflows.start_provision, error="never sent to the workers: sent again", state=ClusterState.REQUESTED
    )
    for cluster_id in ids:
        logger.warning("cluster %s: its provisioning was never sent (a process died); sending it again", cluster_id)
    return ids


LOST_AFTER_CONVERGED = "lost on its way after every device converged: sent again"


def clusters_resend_lost(*, quiet_for: timedelta | None = None) -> list[int]:
    """Clusters still PROVISIONING whose workflow was sent and whose every device change settled more than
    ``quiet_for`` ago (default: half ``CLUSTER_PROVISION_TIMEOUT``, so that a last step merely queued behind a burst
    of device work is not taken for lost): nothing waits on a device, yet the cluster never became READY — the
    workflow's last steps were lost on their way (a chord whose counter a task run twice used up early, a message
    a killed worker held on the embedded broker). Sent again, once, in a new generation (every device is at the
    desired state already: converging again changes nothing), rather than failed at the deadline and a working
    network rolled back. A second loss is left to the deadline."""
    quiet_for = timedelta(seconds=settings.CLUSTER_PROVISION_TIMEOUT / 2) if quiet_for is None else quiet_for
    ok = (DeviceChange.Status.OK, DeviceChange.Status.NOOP)
    ids = []
    candidates = _stalled(ClusterState.PROVISIONING, quiet_for).filter(provision_sent=F("workflow_generation"))
    for cluster_id, generation, segment_id in candidates.values_list("pk", "workflow_generation", "segment_id"):
        step = ClusterStep.objects.filter(
            cluster_id=cluster_id, name="network", generation=generation, status=StepStatus.RUNNING
        ).first()
        if step is None or segment_id is None:
            continue
        changes = DeviceChange.objects.filter(segment_id=segment_id, created_at__gte=step.started_at)
        settled = changes.aggregate(
            last=Max("finished_at"), count=Count("pk"), open=Count("pk", filter=~Q(status__in=ok))
        )
        if not settled["count"] or settled["open"] or settled["last"] > timezone.now() - quiet_for:
            continue
        if ClusterStep.objects.filter(cluster_id=cluster_id, error=LOST_AFTER_CONVERGED).exists():
            continue  # (once: a workflow lost again is the deadline's)
        still = VirtualCluster.objects.filter(
            pk=cluster_id, state=ClusterState.PROVISIONING, workflow_generation=generation
        )
        restarted = _restart_stalled(
            still, workflows.start_provision, error=LOST_AFTER_CONVERGED, state=ClusterState.REQUESTED
        )
        for restarted_id in restarted:
            logger.warning("cluster %s: provisioning lost after the devices converged: sent again", restarted_id)
        ids += restarted
    return ids


def clusters_resend_unsent_updates(*, older_than: timedelta = timedelta(seconds=60)) -> list[int]:
    """Clusters UPDATING for longer than ``older_than`` whose node change never reached the broker (the broker
    refused it, or the process that committed UPDATING died before it sent it: ``provision_sent`` is not this
    generation) have it sent again, in a new generation with its step again — rather than answering ``busy``
    until the deadline fails it with its new nodes left pending for good. One that was sent and waits in a slow
    queue is left alone. The deadline still counts from when the change began (``updated_at`` is left as it
    is): one that cannot be sent for ``CLUSTER_PROVISION_TIMEOUT`` is left to ``clusters_end_stalled_workflows``.
    Each cluster is claimed by a conditional UPDATE of its generation, so that two runs, or a workflow that did
    get through and ends meanwhile, never make it twice."""
    running = ClusterStep.objects.filter(
        cluster=OuterRef("pk"), generation=OuterRef("workflow_generation"), status=StepStatus.RUNNING
    )
    in_time = timezone.now() - timedelta(seconds=settings.CLUSTER_PROVISION_TIMEOUT)
    unsent = (
        _stalled(ClusterState.UPDATING, older_than)
        .filter(Exists(running), updated_at__gt=in_time)
        .exclude(provision_sent=F("workflow_generation"))
    )
    ids = []
    for cluster_id, generation in unsent.values_list("pk", "workflow_generation"):
        with transaction.atomic():
            # a new generation: a late callback of a copy that did get through changes nothing
            if not unsent.filter(pk=cluster_id, workflow_generation=generation).update(
                workflow_generation=generation + 1
            ):
                continue  # another run took it, or it moved on
            step = ClusterStep.objects.filter(cluster_id=cluster_id, generation=generation).order_by("-pk").first()
            name, detail = (step.name, step.detail) if step else ("update", "")
            ClusterStep.objects.filter(cluster_id=cluster_id, generation=generation, status=StepStatus.RUNNING).update(
                status=StepStatus.FAILED, error="never sent to the workers: sent again", finished_at=timezone.now()
            )
            again = step_start(VirtualCluster.objects.get(pk=cluster_id), name, detail=detail)  # (the new generation)
            transaction.on_commit(lambda c=cluster_id, g=generation + 1, s=again.pk: workflows.start_update(c, g, s))
            ids.append(cluster_id)
        logger.warning("cluster %s: its node change was never sent; sending it again", cluster_id)
    return ids


def clusters_resume_requested(*, older_than: timedelta = timedelta(seconds=60)) -> list[int]:
    """Clusters whose provisioning never started (the broker was down at commit time) are started again:
    no request is lost."""
    return _restart_stalled(_stalled(ClusterState.REQUESTED, older_than), workflows.start_provision)


def cluster_events_prune() -> int:
    """Delete the cluster events older than ``CLUSTER_EVENT_RETENTION`` days, and the Idempotency-Keys of
    clusters that ended that long ago (a live cluster's keep answering retries); and the steps of
    clusters that ended ``HISTORY_RETENTION`` days ago (their progress is over), and the public subnet leases
    that ended that long ago. How many events went."""
    now = timezone.now()
    horizon = now - timedelta(days=settings.CLUSTER_EVENT_RETENTION)
    deleted = _events_prune(older_than=horizon)
    ended = VirtualCluster.objects.exclude(state__in=LIVE_STATES)
    IdempotencyKey.objects.filter(cluster__in=ended.filter(ended_at__lt=horizon).values("pk")).delete()
    long_ended = ended.filter(ended_at__lt=now - timedelta(days=settings.HISTORY_RETENTION)).values("pk")
    delete_in_batches(ClusterStep.objects.filter(cluster__in=long_ended))
    PublicSubnetLease.objects.filter(ended_at__lt=now - timedelta(days=settings.HISTORY_RETENTION)).delete()
    return deleted


def _events_prune(*, older_than) -> int:
    """Delete the events older than ``older_than``, all but the newest event (a new webhook starts after the
    newest: with none left it would start at 0, behind what was pruned, and be told it missed events it never
    had), and record the highest id deleted (``EventHorizon``): readers behind it are told what they missed. How
    many went."""
    with transaction.atomic():
        newest = ClusterEvent.objects.order_by("-id").values_list("id", flat=True).first()
        old = ClusterEvent.objects.filter(at__lt=older_than, id__lt=newest or 0)
        through = old.aggregate(through=Max("id"))["through"]
        if through is None:
            return 0
        deleted, _ = old.filter(id__lte=through).delete()
        EventHorizon.objects.get_or_create(pk=1)
        EventHorizon.objects.filter(pk=1).update(pruned_through=Greatest(F("pruned_through"), Value(through)))
    return deleted


# --- webhooks the middleware registers through the API -------------------------------------------------------

#: webhooks one account may register through the API (the admin makes any number)
WEBHOOKS_PER_OWNER = 10
_WEBHOOK_FIELDS = ("url", "states", "kinds", "enabled")


def _webhook_checked(hook: Webhook) -> None:
    """The model's own checks (the URL's scheme, port and address, the states) as a refusal naming the field."""
    from django.core.exceptions import ValidationError

    try:
        hook.full_clean(exclude=["secret", "owner", "next_attempt_at", "last_event_id"])
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        raise ClusterError(" ".join(messages), field=None if field == "__all__" else field) from None


@transaction.atomic
def webhook_create(
    *, owner, name: str, url: str, states: list[str], kinds: list[str] = (), enabled: bool = True, token=None
) -> tuple[Webhook, str]:
    """A webhook ``owner`` registers (with ``token``: it gets the feed while that token is live): it gets the
    event feed from now on, signed with a secret made here and returned (the only time it is shown). At most
    ``WEBHOOKS_PER_OWNER``; only public addresses unless the networks it may use list them
    (``clusters.webhooks.reach``). (webhook, secret)."""
    owner.__class__.objects.select_for_update(no_key=True).filter(pk=owner.pk).first()  # one count at a time per owner
    if Webhook.objects.filter(owner=owner).count() >= WEBHOOKS_PER_OWNER:
        raise QuotaExceeded(f"{owner.get_username()} has {WEBHOOKS_PER_OWNER} webhooks already: delete one first")
    taken = ClusterError(f"a webhook named {name} exists already", field="name")
    if Webhook.objects.filter(owner=owner, name=name).exists():
        raise taken
    secret = secrets.token_urlsafe(32)
    # a user's own token (clusters:write) gets the feed of the clusters the user sees; middleware and admins, all
    everything = token is None or token.has_scope(TokenScope.CLUSTERS_MANAGE)
    hook = Webhook(
        owner=owner,
        token=token,
        name=name,
        url=url,
        states=states,
        kinds=list(kinds),
        enabled=enabled,
        secret=secret,
        all_clusters=everything,
    )
    _webhook_checked(hook)
    try:
        with transaction.atomic():
            hook.save()  # (audited, as every change of a webhook: clusters.apps registers it, its secret never shown)
    except IntegrityError:  # the same name, made by this account in another request at the same moment
        raise taken from None
    return hook, secret


@transaction.atomic
def webhook_update(*, hook: Webhook, changes: dict) -> Webhook:
    """Change a webhook's URL, states, kinds or whether it is enabled. A new URL or enabling it again starts afresh:
    no backoff left from the failures of before."""
    hook = Webhook.objects.select_for_update().filter(pk=hook.pk).first()
    if hook is None:
        raise Gone("the webhook was deleted meanwhile")
    before = {name: getattr(hook, name) for name in _WEBHOOK_FIELDS}
    for name in _WEBHOOK_FIELDS:
        if name in changes:
            setattr(hook, name, changes[name])
    _webhook_checked(hook)
    changed = [name for name in _WEBHOOK_FIELDS if before[name] != getattr(hook, name)]
    if webhook_starts_afresh(hook, changed):
        changed += _webhook_afresh(hook)
    if changed:
        hook.save(update_fields=changed)
    return hook


def webhook_starts_afresh(hook: Webhook, changed: list[str]) -> bool:
    """Whether a change of the fields ``changed`` (a new URL, enabled again) ends the backoff of ``hook``."""
    return "url" in changed or ("enabled" in changed and hook.enabled)


def _webhook_afresh(hook: Webhook) -> list[str]:
    """No backoff left from the failures of before: delivered at the next run. The fields set."""
    for name, value in {**Webhook.KEEPING_UP, "next_attempt_at": timezone.now(), "last_error": ""}.items():
        setattr(hook, name, value)
    return [*Webhook.KEEPING_UP, "next_attempt_at", "last_error"]


def webhook_admin_save(*, hook: Webhook, changed: list[str]) -> None:
    """Save the admin's change of ``hook``: only the form's fields ``changed`` — the delivery state (cursor,
    failures, next attempt) as the page read it is the deliveries' own, and a round that ended meanwhile is not
    undone (the cursor moved back sent a batch twice; a claim undone let two rounds send at once) — then what
    ``webhook_update`` does beyond saving (a new URL, or enabled again: no backoff left from before)."""
    if changed:
        hook.save(update_fields=changed)
    if webhook_starts_afresh(hook, changed):
        hook.save(update_fields=_webhook_afresh(hook))


def webhook_delete(*, hook: Webhook) -> None:
    hook.delete()


def webhooks_mail_failing(*, limit: int = 200) -> list[int]:
    """An e-mail to the owner of every webhook it gets the feed for whose tries have failed for
    ``WEBHOOK_ALERT_AFTER`` seconds in a row, once per run of failures (claimed first, as
    ``clusters_mail_expiring`` does: a relay that cannot take it now gives the claim back). The administrators'
    own webhooks (no owner) have no one to mail: ``/metrics`` has ``virtcloud_webhook_failures``. Returns the
    webhooks mailed."""
    from portal import mail

    if not settings.EMAIL_ENABLED:
        return []
    now = timezone.now()
    due = (
        Webhook.deliverable()
        .filter(failing_since__lt=now - timedelta(seconds=settings.WEBHOOK_ALERT_AFTER), owner__isnull=False)
        .exclude(failing_mailed_for=F("failing_since"))
        .select_related("owner")
        .order_by("failing_since")[:limit]
    )
    mailed = []
    budget = mail.Budget()
    for hook in due:
        if not budget.left():
            break
        since = hook.failing_since.astimezone(UTC)
        subject = f"VirtCloud: your webhook {hook.name} has failed since {since:%Y-%m-%d %H:%M} UTC"
        body = _failing_body(hook)  # (before the claim: a query cut here never leaves a claim without its mail)
        if _mail_once(  # (not if delivered meanwhile)
            Webhook.objects.filter(pk=hook.pk, failing_since=hook.failing_since),
            field="failing_mailed_for",
            value=hook.failing_since,
            to=hook.owner.email,
            subject=subject,
            body=body,
        ):
            mailed.append(hook.pk)
    return mailed


def _failing_body(hook: Webhook) -> str:
    owner = hook.owner
    site = settings.SITE_URL.rstrip("/")
    oldest = ClusterEvent.objects.filter(id__gt=hook.last_event_id).order_by("id").values_list("at", flat=True).first()
    days = settings.CLUSTER_EVENT_RETENTION
    if oldest is not None:
        kept = (
            f"The oldest event waiting for it is from {oldest.astimezone(UTC):%Y-%m-%d %H:%M} UTC. Events are kept "
            f"{days} days: from {(oldest + timedelta(days=days)).astimezone(UTC):%Y-%m-%d %H:%M} UTC on, the "
            'webhook misses events (its next batch then says which: "missed"), and its endpoint has to read the '
            "clusters again.\n\n"
        )
    else:
        kept = f"Events are kept {days} days: the webhook misses those its endpoint does not take by then.\n\n"
    error = hook.last_error or (f"HTTP {hook.last_status}" if hook.last_status else "no answer")
    return (
        f"Hello {owner.get_short_name() or owner.get_username()},\n\n"
        f"your webhook {hook.name} ({hook.url}) has not been delivered to since "
        f"{hook.failing_since.astimezone(UTC):%Y-%m-%d %H:%M} UTC: {hook.failures} tries in a row failed, the "
        f"last with: {error}\n\n"
        f"The portal keeps trying, every {settings.WEBHOOK_MAX_BACKOFF} s at most, and sends every event it has "
        "not delivered yet once the endpoint answers 2xx. " + kept + "Put the endpoint right, or change the "
        f"webhook's URL or disable it: PATCH {site}/api/clusters/webhooks/{hook.pk}/ (GET it to see its state).\n\n"
        "-- \nVirtCloud portal\n"
    )
