"""Browser pages of clusters: the home page lists the clusters a user can see, with their network."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.urls import reverse

from clusters import selectors
from clusters.models import LIVE_STATES, SETTLED_STATES, ClusterState, Connectivity


@login_required
def home(request):
    clusters = selectors.clusters_visible(request)
    live = list(clusters.filter(state__in=LIVE_STATES))
    groups = list(request.user.groups.order_by("name"))
    mine = {g.pk for g in groups}
    access = reverse("access:my-clusters")
    admin = request.user.is_staff and request.user.has_perm("clusters.view_virtualcluster")
    for cluster in live:  # the step a cluster in a transitional state is at (the live script keeps it current)
        cluster.progress = selectors.cluster_progress(cluster) if cluster.state not in SETTLED_STATES else None
        # its row on the access page: closed clusters of one's own or of one's groups (an admin sees others' too)
        ours = cluster.owner_id == request.user.pk or cluster.group_id in mine
        closed = cluster.connectivity == Connectivity.CLOSED
        cluster.access_url = f"{access}#cluster-{cluster.pk}" if ours and closed else ""
        cluster.admin_url = reverse("admin:clusters_virtualcluster_change", args=[cluster.pk]) if admin else ""
    return render(
        request,
        "clusters/home.html",
        {
            "groups": groups,
            "sees_all": selectors.acts_as_admin(request),
            "live": live,
            # the live page script (static/js/live-state.js) follows rows in a transitional state
            "states": ",".join(ClusterState.values),
            "live_states": ",".join(LIVE_STATES),
            "transitional_states": ",".join(s for s in LIVE_STATES if s not in SETTLED_STATES),
            "state_labels": dict(ClusterState.choices),
            "ended": list(clusters.exclude(state__in=LIVE_STATES)[:10]),
        },
    )
