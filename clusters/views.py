"""Browser pages of clusters: the home page lists the clusters a user can see, with their network."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from clusters import selectors
from clusters.models import LIVE_STATES, SETTLED_STATES, ClusterState


@login_required
def home(request):
    clusters = selectors.clusters_visible(request)
    live = list(clusters.filter(state__in=LIVE_STATES))
    for cluster in live:  # the step a cluster in a transitional state is at (the live script keeps it current)
        cluster.progress = selectors.cluster_progress(cluster) if cluster.state not in SETTLED_STATES else None
    return render(
        request,
        "clusters/home.html",
        {
            "groups": request.user.groups.order_by("name"),
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
