"""Reads of the access service: who may enter which cluster, whose credentials one may see.

The membership rule lives here and only here. ``clusters`` models are imported inside the functions so
that the access app imports (and its migrations run) independently of the clusters app.
"""

from __future__ import annotations

from django.db.models import Prefetch, Q, QuerySet

from access.models import Credential, CredentialCluster, Gateway


def enterable_states() -> tuple[str, ...]:
    """Cluster states in which its network exists and a user may be let in (an update keeps the VLAN)."""
    from clusters.models import ClusterState

    return (ClusterState.READY, ClusterState.UPDATING)


def clusters_user_may_enter(user) -> QuerySet:
    """Closed clusters whose network is up and that ``user`` owns or shares through one of their groups.

    THE membership rule of the access service: profiles, SSH certificates, the "my clusters" page and
    revocation on leaving a group all ask this function.
    """
    from clusters.models import Connectivity

    return clusters_user_belongs_to(user).filter(connectivity=Connectivity.CLOSED, state__in=enterable_states())


def clusters_user_belongs_to(user) -> QuerySet:
    """Clusters ``user`` owns or shares through a group, in any state (the membership half of the rule)."""
    from clusters.models import VirtualCluster

    if user is None or not user.is_authenticated or not user.is_active:
        return VirtualCluster.objects.none()
    # group_id IN (subquery) rather than a join, so no row is duplicated and no DISTINCT is needed.
    return (
        VirtualCluster.objects.filter(Q(owner=user) | Q(group__in=user.groups.values("pk")))
        .select_related("owner", "group")
        .order_by("name", "pk")
    )


def clusters_user_may_see(user) -> QuerySet:
    """Closed clusters the user owns or shares in any live state (the page shows why one is not enterable)."""
    from clusters.models import LIVE_STATES, Connectivity

    return clusters_user_belongs_to(user).filter(connectivity=Connectivity.CLOSED, state__in=LIVE_STATES)


def cluster_label(cluster) -> str:
    """The cluster's name in access credentials, the gateway's VLAN map and the SSH host aliases.

    Cluster names are unique per owner only, and group members see clusters of several owners: the id
    makes the label unique. It matches ``access.attrcerts.FQAN_RE`` (name ≤ 40 characters + id)."""
    return f"{cluster.name}-{cluster.pk}"


def credentials_visible(user, *, as_admin: bool = True) -> QuerySet[Credential]:
    """A user's own credentials; admins see everyone's, unless they do not act as admins (``as_admin=False``:
    through an API token without ``clusters:manage``)."""
    qs = Credential.objects.select_related("user", "revoked_by").prefetch_related(
        Prefetch("clusters", queryset=CredentialCluster.objects.order_by("label"))
    )
    if user.is_staff and as_admin:
        return qs
    return qs.filter(user=user)


def gateways_for(*, kind: str, site_ids=()) -> list[Gateway]:
    """Enabled gateways serving ``kind`` ("vpn" or "ssh"), those at ``site_ids`` first."""
    field = {"vpn": ("vpn", "both"), "ssh": ("ssh", "both")}[kind]
    gateways = list(Gateway.objects.filter(enabled=True, kind__in=field))  # (only site_id is used)
    site_ids = set(site_ids)
    gateways.sort(key=lambda g: (g.site_id not in site_ids if site_ids else False, g.name))
    return gateways
