"""Reads of clusters: who may see what, with the related rows each list needs."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.db.models import Prefetch, Q, QuerySet

from clusters.models import (
    LIVE_STATES,
    STATE_CHANNEL,
    ClusterEvent,
    ClusterStep,
    Node,
    NodeState,
    Quota,
    VirtualCluster,
)
from portal.models import TokenScope
from portal.notify import wait_for
from portal.tokens import token_scope


def clusters_visible(request) -> QuerySet[VirtualCluster]:
    """Admins and middleware tokens (clusters:manage) see every cluster; a user sees their own clusters and
    their groups' clusters."""
    qs = VirtualCluster.objects.select_related("owner", "group", "image", "segment").prefetch_related(
        Prefetch("nodes", queryset=Node.objects.exclude(state=NodeState.REMOVED).select_related("host", "target_host")),
        Prefetch("steps", queryset=ClusterStep.objects.order_by("started_at", "id")),
    )
    user = request.user
    if user.is_staff or token_scope(request, TokenScope.CLUSTERS_MANAGE):
        return qs
    return qs.filter(Q(owner=user) | Q(group__in=user.groups.all())).distinct()


def may_act_on(request, cluster: VirtualCluster) -> bool:
    """Owners, admins and middleware act on a cluster; group members only see it."""
    user = request.user
    return user.is_staff or cluster.owner_id == user.pk or token_scope(request, TokenScope.CLUSTERS_MANAGE)


def cluster_wait(cluster_id: int, states: list[str], timeout: float) -> str | None:
    """Wait until the cluster is in one of ``states`` or ``timeout`` seconds passed; its state then (None:
    the cluster was deleted meanwhile). Woken by the state-change notification on PostgreSQL (no query while
    nothing happens), polling elsewhere."""
    current = VirtualCluster.objects.values_list("state", flat=True)

    def reached() -> str | None:
        state = current.filter(pk=cluster_id).first()
        return GONE if state is None else (state if state in states else None)

    found = wait_for(reached, channel=STATE_CHANNEL, payload=str(cluster_id), timeout=timeout)
    if found is None:
        found = current.filter(pk=cluster_id).first()
    return None if found in (GONE, None) else found


GONE = "(deleted)"


# --- quotas ---------------------------------------------------------------------------------------------------


def quota_limits(*, owner, group: Group | None) -> list[tuple[str, int | None, int | None]]:
    """The quotas that apply: [(whose, max live clusters, max live nodes)], None meaning no limit."""
    if owner.is_staff:
        return []
    quotas = list(Quota.objects.filter(Q(user=owner) | Q(group=group)) if group else Quota.objects.filter(user=owner))
    own = next((q for q in quotas if q.user_id == owner.pk), None)
    default_clusters, default_nodes = settings.CLUSTER_QUOTA_CLUSTERS or None, settings.CLUSTER_QUOTA_NODES or None
    limits = [
        (
            f"user {owner.get_username()}",
            default_clusters if own is None or own.max_clusters is None else own.max_clusters,
            default_nodes if own is None or own.max_nodes is None else own.max_nodes,
        )
    ]
    theirs = next((q for q in quotas if group is not None and q.group_id == group.pk), None)
    if theirs is not None:
        limits.append((f"group {group.name}", theirs.max_clusters, theirs.max_nodes))
    return limits


def quota_usage(*, user=None, group: Group | None = None) -> tuple[int, int]:
    """(live clusters, their live nodes) of ``user``, or of ``group``'s clusters."""
    live = VirtualCluster.objects.filter(Q(owner=user) if user is not None else Q(group=group), state__in=LIVE_STATES)
    return live.count(), Node.objects.filter(cluster__in=live).exclude(state=NodeState.REMOVED).count()


def quota_report(owner) -> list[dict]:
    """Every quota that applies to ``owner``'s clusters — their own, and each of their groups' that has one —
    with what is in use now."""
    rows = []
    for whose, max_clusters, max_nodes in quota_limits(owner=owner, group=None):
        rows.append((whose, max_clusters, max_nodes, quota_usage(user=owner)))
    if not owner.is_staff:
        groups = Quota.objects.filter(group__in=owner.groups.all()).select_related("group").order_by("group__name")
        for q in groups:
            rows.append((f"group {q.group.name}", q.max_clusters, q.max_nodes, quota_usage(group=q.group)))
    return [
        {"scope": whose, "max_clusters": c, "max_nodes": n, "clusters": used[0], "nodes": used[1]}
        for whose, c, n, used in rows
    ]


# --- the event feed -------------------------------------------------------------------------------------------


def cluster_events(request, *, after: int, cluster_id: int | None, limit: int, timeout: float) -> list[ClusterEvent]:
    """Events after id ``after`` of the clusters the caller may see (one cluster's with ``cluster_id``), at
    most ``limit``, oldest first. None yet: wait up to ``timeout`` seconds for the next (woken by the
    state-change notification on PostgreSQL)."""
    visible = clusters_visible(request).order_by().values("pk")
    events = ClusterEvent.objects.filter(id__gt=after, cluster__in=visible).select_related("cluster")
    if cluster_id is not None:
        events = events.filter(cluster_id=cluster_id)

    def found() -> list[ClusterEvent] | None:
        rows = list(events.order_by("id")[:limit])
        return rows or None

    payload = None if cluster_id is None else str(cluster_id)
    return wait_for(found, channel=STATE_CHANNEL, payload=payload, timeout=timeout) or []
