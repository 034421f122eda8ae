"""Reads of clusters: who may see what, with the related rows each list needs."""

from __future__ import annotations

from django.db.models import Prefetch, Q, QuerySet

from clusters.models import STATE_CHANNEL, ClusterStep, Node, NodeState, VirtualCluster
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
