"""Reads of the access service: who may enter which cluster, whose credentials one may see.

The membership rule lives here and only here. ``clusters`` models are imported inside the functions so
that the access app imports (and its migrations run) independently of the clusters app.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import ipaddress
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import BooleanField, Count, Exists, ExpressionWrapper, Min, OuterRef, Prefetch, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from access.gateway.state import leg_unusable
from access.models import USER_KINDS, Credential, CredentialCluster, CredentialKind, Gateway
from access.pki import CLOCK_SKEW


def enterable_states() -> tuple[str, ...]:
    """Cluster states in which its network exists and a user may be let in (an update keeps the VLAN)."""
    from clusters.models import ClusterState

    return (ClusterState.READY, ClusterState.UPDATING)


def enterable_condition() -> Q:
    """The cluster's half of the access rule: closed (users enter it through the gateways, whose VLAN maps
    hold such clusters only) and its network up (``enterable_states``)."""
    from clusters.models import Connectivity

    return Q(connectivity=Connectivity.CLOSED, state__in=enterable_states())


def clusters_user_may_enter(user) -> QuerySet:
    """Closed clusters whose network is up and that ``user`` owns or shares through one of their groups.

    THE membership rule of the access service: profiles, SSH certificates, the "my clusters" page and
    revocation on leaving a group all ask this function.
    """
    return clusters_user_belongs_to(user).filter(enterable_condition())


def clusters_with_enterable(clusters: QuerySet) -> QuerySet:
    """``clusters`` with ``enterable``: whether the cluster's people (its owner and its group's members) may enter
    it now — ``clusters_user_may_enter`` without the membership half. On the "my clusters" page, which lists the
    user's own clusters only, that is whether the user may; in the access API it speaks of the cluster's people
    whoever asks (a scheduler's token, an admin, who see others' clusters too). False for a public cluster:
    nobody enters it through the gateways (it is reached directly)."""
    return clusters.annotate(enterable=ExpressionWrapper(enterable_condition(), output_field=BooleanField()))


def clusters_user_belongs_to(user) -> QuerySet:
    """Clusters ``user`` owns or shares through a group, in any state (the membership half of the rule)."""
    from clusters.models import VirtualCluster

    if user is None or not user.is_authenticated or not user.is_active:
        return VirtualCluster.objects.none()
    from clusters.selectors import shared_with

    # group_id IN (subquery) and EXISTS rather than joins, so no row is duplicated and no DISTINCT is needed.
    return (
        VirtualCluster.objects.filter(Q(owner=user) | shared_with(user))
        .select_related("owner", "group")
        .order_by("name", "pk")
    )


def clusters_unshared_by_owner(owners) -> list[int]:
    """Ids of the live clusters of ``owners`` whose group the owner is no longer in (``shared_with``: the
    group's people lost them when the owner left)."""
    from clusters.models import LIVE_STATES, VirtualCluster
    from clusters.selectors import owner_in_group

    return list(
        VirtualCluster.objects.filter(owner__in=[o.pk for o in owners], group__isnull=False, state__in=LIVE_STATES)
        .exclude(owner_in_group())
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def clusters_user_may_see(user) -> QuerySet:
    """Closed clusters the user owns or shares in any live state, with ``enterable`` (``clusters_with_enterable``):
    the page shows why one is not enterable."""
    from clusters.models import LIVE_STATES, Connectivity

    return clusters_with_enterable(
        clusters_user_belongs_to(user).filter(connectivity=Connectivity.CLOSED, state__in=LIVE_STATES)
    )


def cluster_label(cluster) -> str:
    """The cluster's name in access credentials, the gateway's VLAN map and the SSH host aliases.

    Cluster names are unique per owner only, and group members see clusters of several owners: the id
    makes the label unique. It matches ``access.attrcerts.FQAN_RE`` (name ≤ 40 characters + id)."""
    return f"{cluster.name}-{cluster.pk}"


def bastion_address(text) -> str:
    """An address as the bastion's ``permitopen`` compares it (one spelling per address)."""
    return ipaddress.ip_address(str(text)).compressed


#: Why the SSH bastion does not relay to a node (the API's ``withheld_nodes``, the ssh_config's comment, the
#: "my clusters" page).
WITHHELD_SHARED = (
    "another cluster uses this address too and the SSH bastion forwards by address: use the VPN profile for this node"
)
WITHHELD_OVERLAP = (
    "another cluster's network overlaps this cluster's and the SSH bastion forwards by address from one network "
    "stack, which routes the overlap through one of them: use the VPN profile for this node"
)
WITHHELD_NO_LEG = (
    "the SSH bastion has no address of its own in this cluster's network (its scheduler gave no bastion_address): "
    "it reaches only nodes known by name there; use the VPN profile for this node"
)
WITHHELD_OUTSIDE = (
    "the address is outside the network of the SSH bastion's address in this cluster: use the VPN profile for this node"
)


WITHHELD_UNUSABLE = (
    "the address is the network or broadcast address of the SSH bastion's network in this cluster, which it never "
    "forwards to: use the VPN profile for this node"
)


def bastion_unreachable(cluster, address: str | None) -> str | None:
    """Why the SSH bastion may not forward to a node of ``cluster`` at ``address``, or None when it may. It
    forwards through its leg into the cluster: to an address in the network of the cluster's
    ``bastion_address``, or (``address`` None) to the node's alias, which the operator's resolver maps into the
    cluster's network. An address without a leg, or outside its network, would be reached through the gateway's
    other routes — its own services, the provider's network, another cluster — so it never is."""
    if not address:
        return None
    if not cluster.bastion_address:
        return WITHHELD_NO_LEG
    if ipaddress.ip_address(str(address)) not in ipaddress.ip_interface(cluster.bastion_address).network:
        return WITHHELD_OUTSIDE
    if ipaddress.ip_address(str(address)) in leg_unusable(cluster.bastion_address):  # (a node made before the rule)
        return WITHHELD_UNUSABLE
    return None


def bastion_shared_addresses() -> set[str]:
    """Node addresses the SSH bastion cannot tell apart: given to live nodes of more than one cluster that the
    bastion relays to or that the provider routes (a closed cluster in the gateways' VLAN map, a live public
    one). Closed clusters may use any addresses, others' too (paper §2.1), but the bastion forwards by address
    (``permitopen``) from one network stack: it would carry a user of one cluster to whichever of those nodes
    its routes pick. So such an address is withheld from every closed cluster that uses it (no ``permitopen``,
    no ``Host`` entry); their users reach those nodes through the VPN, which selects the VLAN, not an address.
    """
    from clusters.models import LIVE_STATES, Connectivity, Node, NodeState

    relayed = Q(cluster__connectivity=Connectivity.CLOSED, cluster__state__in=enterable_states()) & Q(
        cluster__vlan_id__isnull=False
    )
    routed = Q(cluster__connectivity=Connectivity.PUBLIC, cluster__state__in=LIVE_STATES)
    rows = (
        Node.objects.filter(relayed | routed, address__isnull=False)
        .exclude(state=NodeState.REMOVED)
        .values("address")
        .annotate(clusters=Count("cluster_id", distinct=True))
        .filter(clusters__gt=1)
        .values_list("address", flat=True)
    )
    return {bastion_address(a) for a in rows}


class BastionLegs:
    """The networks of the SSH bastion's legs into the clusters it relays to (closed, in the gateways' VLAN maps,
    with a ``bastion_address``), for a bastion that forwards by address from one network stack: the kernel
    routes an address two legs' networks hold through one of them (the longer prefix, or whichever came first),
    so a node there may be another cluster's machine — or a root user's VM in another cluster claiming it. Of
    ``gateway``'s clusters when it has a site (the others have no leg there), else of every one. One query;
    lookups by prefix, not by pairs (many clusters may use one private network)."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        from clusters.models import VirtualCluster

        relayed = VirtualCluster.objects.filter(enterable_condition(), vlan_id__isnull=False)
        if gateway is not None and gateway.site_id is not None:
            relayed = relayed.filter(segment__allocation__pool__core__sites=gateway.site_id)
        rows = relayed.exclude(bastion_address="").values_list("pk", "bastion_address")
        self.holders: dict = {}  # network → the clusters whose leg is on it
        for pk, leg in rows:
            with contextlib.suppress(ValueError):
                self.holders.setdefault(ipaddress.ip_interface(leg).network, set()).add(pk)
        self.starts = {
            version: sorted((int(n.network_address), n.prefixlen) for n in self.holders if n.version == version)
            for version in (4, 6)
        }

    def _others(self, network, cluster_id: int) -> bool:
        return bool(self.holders.get(network, set()) - {cluster_id})

    def covered(self, address: str, cluster_id: int) -> bool:
        """Whether another cluster's leg network holds ``address`` (a node of ``cluster_id``)."""
        ip = ipaddress.ip_address(str(address))
        return any(
            self._others(ipaddress.ip_network((ip, length), strict=False), cluster_id)
            for length in range(ip.max_prefixlen + 1)
        )

    def overlapped(self, leg: str, cluster_id: int) -> bool:
        """Whether another cluster's leg network overlaps the network of ``leg`` (``cluster_id``'s bastion
        address): one holding it (or the same), or one inside it."""
        network = ipaddress.ip_interface(leg).network
        if any(self._others(network.supernet(new_prefix=n), cluster_id) for n in range(network.prefixlen + 1)):
            return True
        starts = self.starts[network.version]  # inside: a start within the network and a longer prefix
        first = bisect.bisect_left(starts, (int(network.network_address), network.prefixlen + 1))
        for start, length in itertools.takewhile(lambda s: s[0] <= int(network.broadcast_address), starts[first:]):
            if self._others(ipaddress.ip_network((start, length)), cluster_id):
                return True
        return False


def bastions_forward_by_address(gateways: Iterable[Gateway] | None = None) -> bool:
    """Whether an enabled gateway (of ``gateways``, default all) runs one bastion for every cluster
    (``Gateway.forwards_by_address``): it withholds ``bastion_shared_addresses``."""
    gateways = Gateway.objects.filter(enabled=True) if gateways is None else gateways
    return any(g.enabled and g.forwards_by_address for g in gateways)


def bastion_withheld_nodes(
    clusters: Iterable, *, gateway: Gateway | None = None
) -> dict[int, list[tuple[str, str, str]]]:
    """Per cluster (by id), its live nodes that the SSH bastion (``gateway``'s, default any enabled one) does
    not relay to, as (name, address — or the node's alias when it has none —, why), by name: an address
    ``bastion_unreachable`` refuses, or, for a bastion that forwards by address from one network stack, one in
    ``bastion_shared_addresses`` or in another cluster's leg network (``BastionLegs``: a node without an
    address, when its cluster's leg network overlaps another's). Clusters with none are left out."""
    from access.ssh import node_alias
    from clusters.models import Node, NodeState

    by_id = {c.pk: c for c in clusters}
    if not by_id:
        return {}
    by_address = gateway.forwards_by_address if gateway is not None else bastions_forward_by_address()
    shared = bastion_shared_addresses() if by_address else set()
    legs = BastionLegs(gateway) if by_address else None
    out: dict[int, list[tuple[str, str, str]]] = {}
    nodes = (
        Node.objects.filter(cluster_id__in=list(by_id))
        .exclude(state=NodeState.REMOVED)
        .order_by("name")
        .values_list("cluster_id", "name", "address")
    )
    for cluster_id, name, address in nodes:
        cluster = by_id[cluster_id]
        if not address:
            if legs and cluster.bastion_address and legs.overlapped(cluster.bastion_address, cluster_id):
                alias = node_alias(cluster_label(cluster), name)
                out.setdefault(cluster_id, []).append((name, alias, WITHHELD_OVERLAP))
            continue
        why = WITHHELD_SHARED if bastion_address(address) in shared else bastion_unreachable(cluster, address)
        if not why and legs and legs.covered(address, cluster_id):
            why = WITHHELD_OVERLAP
        if why:
            out.setdefault(cluster_id, []).append((name, bastion_address(address), why))
    return out


def credentials_visible(user, *, as_admin: bool = True) -> QuerySet[Credential]:
    """A user's own credentials; admins who may view credentials (``clusters.selectors.staff_may``, as in the
    Django admin) see everyone's, unless they do not act as admins (``as_admin=False``: through an API token
    without ``clusters:manage``)."""
    from clusters.selectors import staff_may

    qs = Credential.objects.select_related("user", "revoked_by").prefetch_related(
        Prefetch("clusters", queryset=CredentialCluster.objects.order_by("label"))
    )
    if as_admin and staff_may(user, "view", Credential):
        return qs
    return qs.filter(user=user)


def credentials_of(user, *, ended: int) -> list[Credential]:
    """``user``'s own credentials for their page: every one still valid (so each can be revoked, however many
    there are), then the ``ended`` newest that were revoked or expired; newest first in each part."""
    now = timezone.now()
    # (not the host certificates of nodes the user asked for: the page's "lost my laptop" is about the person)
    own = credentials_visible(user, as_admin=False).filter(kind__in=USER_KINDS)
    valid = list(own.live(now))
    gone = list(own.filter(Q(revoked_at__isnull=False) | Q(not_after__lte=now))[:ended])
    early = credentials_ending_before_their_clusters(valid)
    unpinned = credentials_pinning_a_retired_gateway(valid)
    connected = sessions_now([c.pk for c in valid + gone])
    for credential in valid + gone:
        credential.ends_before_cluster = credential.pk in early
        credential.gateway_re_enrolled = credential.pk in unpinned
        credential.connected = connected.get(credential.pk, [])
    return valid + gone


def sessions_now(credential_ids) -> dict[int, list]:
    """The sessions the gateways report up now for each of ``credential_ids`` (``GatewaySession``): only from a
    gateway whose last report is younger than ``GATEWAY_STATE_MAX_AGE`` — an older one may be long over. One
    query."""
    from access.models import GatewaySession

    fresh = timezone.now() - timedelta(seconds=settings.GATEWAY_STATE_MAX_AGE)
    rows = GatewaySession.objects.filter(
        credential_id__in=list(credential_ids), gateway__sessions_reported_at__gte=fresh, gateway__enabled=True
    ).select_related("gateway")
    found: dict[int, list] = {}
    for row in rows.order_by("since", "pk"):
        found.setdefault(row.credential_id, []).append(row)
    return found


def gateway_certificates() -> tuple[set[str], datetime | None]:
    """(the SHA-256 of every gateway's current TLS certificate, when the last gateway was enrolled); one query. A
    certificate that cannot be read is left out: no profile pins it."""
    from access import pki

    found, newest = set(), None
    rows = Gateway.objects.exclude(server_certificate="").values_list("server_certificate", "enrolled_at")
    for pem, enrolled_at in rows:
        with contextlib.suppress(ValueError):
            found.add(pki.pem_fingerprint(pem))
        if enrolled_at is not None and (newest is None or enrolled_at > newest):
            newest = enrolled_at
    return found, newest


def credentials_pinning_a_retired_gateway(credentials: Iterable[Credential]) -> set[int]:
    """The ids of the valid VPN profiles among ``credentials`` that a gateway refuses now because it was
    re-enrolled since they were made: one that pins a certificate no gateway has any more, or one from before
    profiles pinned certificates (which a gateway's old key could still answer) made before some gateway's
    current certificate. Their holder should download again. One query, none when no credential is a
    candidate."""
    now = timezone.now()
    candidates = [c for c in credentials if c.kind == CredentialKind.VPN and c.revoked_at is None and c.not_after > now]
    if not candidates:
        return set()
    current, newest = gateway_certificates()
    return {
        c.pk
        for c in candidates
        if (not set(c.pinned_gateways) <= current)
        or (not c.pinned_gateways and newest is not None and newest > c.created_at)
    }


#: how far before its full lifetime a credential must end to count as cut short by a cluster's end (signing
#: and recording it take a moment after its validity was set)
_CUT_SHORT = timedelta(minutes=1)


def credentials_ending_before_their_clusters(credentials: Iterable[Credential]) -> set[int]:
    """The ids of the valid user credentials among ``credentials`` that a download now would outlast: cut short
    at issue by the end of a cluster they admit to (they end before their full lifetime, by the settings), and
    every cluster they admit to now ends later (its lifetime was extended since). Their holder should download
    again. ``credentials`` need their ``clusters`` prefetched; one query."""
    from access import services
    from clusters.models import VirtualCluster

    now = timezone.now()
    candidates = [c for c in credentials if c.kind in USER_KINDS and c.revoked_at is None and c.not_after > now]
    ids = {link.cluster_id for c in candidates for link in c.clusters.all()}
    ends = dict(VirtualCluster.objects.filter(pk__in=ids).values_list("pk", "expires_at")) if ids else {}
    early = set()
    for credential in candidates:
        if credential.kind == CredentialKind.SSH:
            lifetime = services.ssh_cert_lifetime()
        else:
            lifetime = services.publish_cert_lifetime() if credential.published else services.vpn_cert_lifetime()
        clusters_end = [ends.get(link.cluster_id) for link in credential.clusters.all()]
        if not clusters_end or None in clusters_end:
            continue
        cut_short = credential.not_after < credential.created_at + lifetime - _CUT_SHORT
        # (validities are whole seconds: a credential that ends with its cluster ends at most a second before it)
        if cut_short and credential.not_after < min(clusters_end).replace(microsecond=0):
            early.add(credential.pk)
    return early


def gateways_ready() -> QuerySet[Gateway]:
    """Enabled gateways that are set up: enrolled (``gateway config`` issued their server certificate) and
    pulled their state at least once. Any other refuses everyone: it has no server certificate or no state to
    authorize from. Users are offered these only."""
    return Gateway.objects.filter(enabled=True, last_pull_at__isnull=False).exclude(server_certificate="")


def gateways_for(*, kind: str, site_ids=()) -> list[Gateway]:
    """Ready gateways (``gateways_ready``) serving ``kind`` ("vpn" or "ssh"): those whose state is current first
    (a stale one refuses everyone, see ``gateway_is_stale``), then those at ``site_ids``. Empty when none is."""
    field = {"vpn": ("vpn", "both"), "ssh": ("ssh", "both")}[kind]
    gateways = list(gateways_ready().filter(kind__in=field))
    site_ids = set(site_ids)
    now = timezone.now()
    gateways.sort(key=lambda g: (gateway_is_stale(g, now), g.site_id not in site_ids if site_ids else False, g.name))
    return gateways


def ambiguous_vlans() -> QuerySet:
    """The VLAN ids (a ``values_list`` query) that more than one enterable cluster holds: cores that share no
    site may hand out the same ids (``network.models.VlanPool``). A gateway without a site has one trunk and
    one VLAN map for all: it cannot tell such clusters apart, so it carries none of them (fail closed) — a
    user of one would be put on the other's network. A gateway at a site never meets two of them (only one
    core's VLANs reach a site's trunk with that id)."""
    from clusters.models import VirtualCluster

    return (
        VirtualCluster.objects.filter(enterable_condition(), vlan_id__isnull=False)
        .order_by()
        .values("vlan_id")
        .annotate(holders=Count("pk"))
        .filter(holders__gt=1)
        .values_list("vlan_id", flat=True)
    )


def _on_ambiguous_vlan() -> Exists:
    """For a cluster queryset: whether its VLAN id is ``ambiguous_vlans`` (another enterable cluster holds it)."""
    from clusters.models import VirtualCluster

    others = VirtualCluster.objects.filter(enterable_condition(), vlan_id=OuterRef("vlan_id"))
    return Exists(others.exclude(pk=OuterRef("pk")))


def gateway_carries(clusters) -> Callable[[Gateway], bool]:
    """Whether a gateway's trunk carries the VLANs of all of ``clusters``: one at a site every cluster's core
    reaches — elsewhere the network never puts their VLANs on its trunk (``network.selectors.segment_views``),
    and the same ids may be other clusters there — or a gateway without a site (one trunk for all), unless one
    of the clusters' VLAN ids is ``ambiguous_vlans``. One query, however many gateways are asked about."""
    from clusters.models import VirtualCluster

    ids = [c.pk for c in clusters]

    @functools.cache
    def reached() -> tuple[frozenset[tuple[int, int]], bool]:  # ((cluster, a site its core joins), any ambiguous)
        found = VirtualCluster.objects.filter(pk__in=ids)
        rows = list(found.values_list("pk", "segment__allocation__pool__core__sites", _on_ambiguous_vlan()))
        return frozenset((pk, site) for pk, site, _on_shared in rows), any(on_shared for *_, on_shared in rows)

    def carries(gateway: Gateway) -> bool:
        sites, ambiguous = reached()
        if gateway.site_id is None:
            return not ambiguous
        return all((pk, gateway.site_id) in sites for pk in ids)

    return carries


def gateway_has_cluster(gateway: Gateway, cluster) -> bool | None:
    """Whether ``gateway`` is known to have installed a state that holds ``cluster``: its ``state_as_of`` (see
    ``clusters_access_ready``) at or after the cluster's ``ready_at`` and its ``closed_since`` (a cluster an admin
    made closed later enters the gateways' maps then). None: the cluster has no ready time."""
    if cluster.ready_at is None:
        return None
    since = max(cluster.ready_at, cluster.closed_since or cluster.ready_at)
    return gateway.state_as_of is not None and gateway.state_as_of >= since


def gateways_carrying(clusters: Iterable) -> dict[int, list[Gateway]]:
    """Per cluster of ``clusters`` (by id), the ready gateways (``gateways_ready``, with their ``site``) whose trunk
    carries it, by name: ``gateway_carries``' rule (a site the cluster's core reaches, or no site and an id that
    is not ``ambiguous_vlans``), for the clusters the gateways' VLAN maps hold (``access.services.gateway_state``:
    closed, network up, with a VLAN). Left out: clusters no ready gateway carries — public ones, and closed ones
    whose network is not up, among them. Two queries at most, however many clusters and gateways."""
    from clusters.models import VirtualCluster

    ids = [c.pk for c in clusters]
    gateways = list(gateways_ready().select_related("site").order_by("name")) if ids else []
    if not gateways:
        return {}
    reached: dict[int, set[int | None]] = {}  # cluster → the sites its core joins (None: it has no core)
    carried = VirtualCluster.objects.filter(enterable_condition(), pk__in=ids, vlan_id__isnull=False).order_by()
    ambiguous = set()
    rows = carried.values_list("pk", "segment__allocation__pool__core__sites", _on_ambiguous_vlan())
    for pk, site_id, on_a_shared_id in rows:
        reached.setdefault(pk, set()).add(site_id)
        if on_a_shared_id:
            ambiguous.add(pk)
    out = {
        pk: [
            g
            for g in gateways
            if (g.site_id is not None and g.site_id in sites) or (g.site_id is None and pk not in ambiguous)
        ]
        for pk, sites in reached.items()
    }
    return {pk: carrying for pk, carrying in out.items() if carrying}


def clusters_access_ready(clusters: Iterable) -> dict[int, bool]:
    """Per cluster of ``clusters`` (by id): whether every ready gateway (``gateways_ready``) that carries it
    (``gateways_carrying``) is known to have installed a state made after the cluster became ready — its
    ``state_as_of`` (a pull answered 304, a pull that reported the state it had installed, a state the portal
    installed itself on a gateway on its host) at or after the cluster's ``ready_at`` (``gateway_has_cluster``).
    False: a gateway may still refuse its users ("gateways updating…"); a remote gateway pulling every minute is
    known to have it within two pulls (the first brings it, the next says it has it). Left out: clusters no ready
    gateway carries (public ones too), and those with no ready time. Two queries at most."""
    ready = [c for c in clusters if c.ready_at is not None]
    return _access_ready(ready, gateways_carrying(ready))


def _access_ready(clusters: Iterable, carrying: dict[int, list[Gateway]]) -> dict[int, bool]:
    return {
        c.pk: all(gateway_has_cluster(g, c) for g in carrying[c.pk])
        for c in clusters
        if c.ready_at is not None and c.pk in carrying
    }


@dataclass(frozen=True)
class Endpoint:
    """Where a user's client connects to a gateway for one service: ``proto`` for OpenVPN (the profile's
    ``proto``/``remote``), ``user`` for SSH (the ssh_config's ``ProxyJump`` account)."""

    host: str
    port: int
    proto: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class GatewayRoute:
    """One way into a cluster: a ready gateway whose trunk carries it (``clusters_access``)."""

    gateway: Gateway
    #: what VPN profiles and SSH configs for the cluster connect to (None: the gateway does not serve it, or, for
    #: SSH, its bastions do not relay to this cluster: ``gateway_relays_ssh``)
    vpn: Endpoint | None
    ssh: Endpoint | None
    #: it refuses everyone now (``gateway_is_stale``)
    stale: bool
    #: its installed state holds the cluster (``gateway_has_cluster``; None: the cluster has no ready time)
    has_cluster: bool | None


@dataclass(frozen=True)
class ClusterAccess:
    """Whether and where a cluster can be entered (``clusters_access``). ``cluster`` has ``enterable``
    (``clusters_with_enterable``)."""

    cluster: object
    access_ready: bool | None
    gateways: list[GatewayRoute]


def clusters_access(clusters: Iterable) -> list[ClusterAccess]:
    """``clusters`` (annotated by ``clusters_with_enterable``), each with the ready gateways that carry it
    (``gateways_carrying``) and where a user connects to them, and ``access_ready`` (``clusters_access_ready``;
    None where it leaves the cluster out). What the "my clusters" page says beside a cluster, for the API. Two
    queries at most, however many clusters and gateways."""
    clusters = list(clusters)
    carrying = gateways_carrying(clusters)
    ready = _access_ready(clusters, carrying)
    now = timezone.now()
    return [
        ClusterAccess(
            cluster=cluster,
            access_ready=ready.get(cluster.pk),
            gateways=[_route(g, cluster, now) for g in carrying.get(cluster.pk, [])],
        )
        for cluster in clusters
    ]


def gateway_relays_ssh(gateway: Gateway, cluster) -> bool:
    """Whether ``gateway`` runs an SSH bastion that relays to ``cluster``'s nodes: one bastion for every cluster
    (to the nodes ``bastion_unreachable`` lets it reach), or a bastion per cluster, which listens only for
    clusters with a VLAN and a ``bastion_address`` (access/gateway/bastion.py;
    ``access.services.ssh_certificate_issue`` refuses the others)."""
    if not gateway.serves_ssh:
        return False
    return gateway.forwards_by_address or bool(cluster.vlan_id and cluster.bastion_address)


def _route(gateway: Gateway, cluster, now: datetime) -> GatewayRoute:
    # the same host, ports and account as ``access.services`` writes into profiles and SSH configs
    vpn = Endpoint(gateway.address, gateway.vpn_port, proto=str(gateway.vpn_proto)) if gateway.serves_vpn else None
    ssh = None
    if gateway_relays_ssh(gateway, cluster):
        ssh = Endpoint(gateway.address, gateway.ssh_port_for(cluster.vlan_id), user=gateway.ssh_user)
    return GatewayRoute(
        gateway=gateway,
        vpn=vpn,
        ssh=ssh,
        stale=gateway_is_stale(gateway, now),
        has_cluster=gateway_has_cluster(gateway, cluster),
    )


def gateway_settings(gateway: Gateway) -> dict:
    """The portal's half of a gateway's own configuration, the ``config`` section of its state: what
    ``access.gateway.config.render`` takes from the portal (with the operator's ``local.json``) for its
    openvpn.conf, sshd_config and systemd units. A gateway re-renders them when a pull brings a change."""
    return {
        "serves_vpn": gateway.serves_vpn,
        "serves_ssh": gateway.serves_ssh,
        "vpn_port": gateway.vpn_port,
        "vpn_proto": str(gateway.vpn_proto),
        "ssh_port": gateway.ssh_port,
        "ssh_port_base": gateway.ssh_port_base,
        "ssh_user": gateway.ssh_user,
        # OpenVPN renegotiates (tls-verify again) within the state's max age: a session ends once it has expired
        "reneg_sec": settings.GATEWAY_STATE_MAX_AGE,
    }


def gateway_state_age(gateway: Gateway, now: datetime) -> timedelta:
    """How old the newest change is that the gateway's installed state is known to hold (since it was set up,
    if it never said). An upper bound on what it knows, not a sign it is current: a gateway that never pulled has
    no state at all, however recently it was made (``gateway_is_stale``)."""
    return now - (gateway.state_as_of or gateway.created_at)


def gateway_is_stale(gateway: Gateway, now: datetime) -> bool:
    """Whether the gateway has, as far as the portal knows, not installed a current state for
    ``GATEWAY_STATE_MAX_AGE`` — or never pulled one: it then refuses everyone (it fails closed) until it reaches
    the portal."""
    if gateway.last_pull_at is None and gateway.state_as_of is None:
        return True  # never pulled: nothing installed, whatever its age since created_at says
    return gateway_state_age(gateway, now) > timedelta(seconds=settings.GATEWAY_STATE_MAX_AGE)


def gateways_failed_closed() -> list[tuple[Gateway, timedelta]]:
    """Ready gateways (the ones users are sent to) that refuse everyone now (``gateway_is_stale``), by name, with
    their state's age."""
    now = timezone.now()
    gateways = gateways_ready().order_by("name")
    return [(g, gateway_state_age(g, now)) for g in gateways if gateway_is_stale(g, now)]


def stale_gateway_lifetime() -> timedelta:
    """How long after the last pull it made a gateway may still let anyone in on the state it has: it fails
    closed ``GATEWAY_STATE_MAX_AGE`` after that pull, and a session admitted just before may live until its
    next renegotiation (every ``GATEWAY_STATE_MAX_AGE``) — twice the age, plus the clocks' difference (the
    margin certificates get)."""
    return timedelta(seconds=2 * settings.GATEWAY_STATE_MAX_AGE) + CLOCK_SKEW


def vlan_reuse_horizon(now: datetime) -> datetime | None:
    """VLAN ids released before the returned time are in no gateway's VLAN map any more (``None``: there is no
    gateway), so no VPN client can still be put on one by the mapping of the cluster that had it.

    A gateway's state holds every change made before its ``state_as_of`` (its creation when it never said);
    a gateway that has not caught up with a release has failed closed ``stale_gateway_lifetime`` after it.
    Every gateway counts, disabled ones too (a disabled gateway may still be running on what it pulled):
    delete the row of a gateway that is gone."""
    oldest = Gateway.objects.aggregate(oldest=Min(Coalesce("state_as_of", "created_at")))["oldest"]
    if oldest is None:
        return None
    return max(oldest, now - stale_gateway_lifetime())
