"""Browser pages of clusters: the home page lists the clusters a user can see, with their network; whoever may act
on one (``selectors.may_act_on``, the API's rule) extends its lifetime there, or tears it down after a page that
says what that does. Thin, as the access pages: a form, one service call, a message or the page again with the
refusal at its field (400)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import wraps

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import F, Q
from django.http import HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.text import capfirst
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_safe

from clusters import selectors, services
from clusters.errors import ClusterError
from clusters.models import (
    ACTIVE_STATES,
    LIVE_STATES,
    SETTLED_STATES,
    ClusterState,
    Connectivity,
    Image,
    VirtualCluster,
)
from portal import throttle

HOME = "home"
#: how much longer "Extend" offers: (value, label, added to the expiry — or to now, for a cluster past it)
EXTEND_BY = (
    ("1h", "1 hour", timedelta(hours=1)),
    ("1d", "1 day", timedelta(days=1)),
    ("7d", "7 days", timedelta(days=7)),
    ("30d", "30 days", timedelta(days=30)),
)


class ExtendForm(forms.Form):
    """One row's "Extend": how much longer. Every row has one, so its field ids carry the cluster's id."""

    by = forms.ChoiceField(
        choices=[(value, f"+{label}") for value, label, _ in EXTEND_BY],
        error_messages={"required": "Choose how much longer.", "invalid_choice": "Choose one of the lengths offered."},
    )

    def __init__(self, *args, cluster: VirtualCluster, **kwargs):
        super().__init__(*args, auto_id=f"extend-{cluster.pk}-%s", **kwargs)
        self.cluster = cluster

    def offer(self, now: datetime) -> None:
        """Show only the lengths the lifetime bounds allow now (the service's own check): a length past them
        is still refused at the field when a page left open sends it."""
        self.fields["by"].choices = [
            (value, f"+{label}")
            for value, label, delta in EXTEND_BY
            if _fits(self.cluster, services.extended_expiry(self.cluster, delta, now=now))
        ]
        if self.errors:
            self.fields["by"].widget.attrs["autofocus"] = True  # the page opens at the refusal
        elif any(value == "1d" for value, _ in self.fields["by"].choices):
            self.initial["by"] = "1d"

    def delta(self) -> timedelta:
        """How much later the chosen length makes the expiry (the service adds it to the expiry under its lock)."""
        return next(delta for value, _, delta in EXTEND_BY if value == self.cleaned_data["by"])


def _fits(cluster: VirtualCluster, expires_at: datetime) -> bool:
    try:
        services.cluster_extend_check(cluster=cluster, expires_at=expires_at)
    except ClusterError:
        return False
    return True


def _utc(moment: datetime) -> str:
    """A time as the pages show it."""
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _expires_soon(cluster: VirtualCluster, now: datetime) -> str:
    """What the page says beside the expiry of an active cluster that expires within ``CLUSTER_EXPIRY_WARNING``
    (the window of its ``expiring`` event, so that its users notice before it is torn down): "in 3 h",
    "in 20 min", "past its expiry" (the periodic expiry tears it down at its next run); "" otherwise."""
    left = cluster.expires_at - now
    if cluster.state not in ACTIVE_STATES or left > timedelta(seconds=settings.CLUSTER_EXPIRY_WARNING):
        return ""
    if left <= timedelta(0):
        return "past its expiry"
    if left < timedelta(hours=1):
        return f"in {max(1, int(left.total_seconds() // 60))} min"
    return f"in {int(left.total_seconds() // 3600)} h"


def _post_only(view):
    """POST only: another method is a 405, with a page that leads back (not Django's blank one)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.method != "POST":
            page = render_to_string("clusters/post_only.html", request=request)
            return HttpResponseNotAllowed(["POST"], content=page)
        return view(request, *args, **kwargs)

    return wrapper


@login_required
@never_cache
def home(request):
    return _page(request)


#: live clusters the clusters page lists (the newest)
HOME_LIVE_SHOWN = 100


def _page(request, *, refused: ExtendForm | None = None, status: int = 200) -> HttpResponse:
    """The clusters page; ``refused``: a row's "Extend" as it was sent, shown with its refusal (status 400)."""
    clusters = selectors.clusters_visible(request)
    # the newest first, at most HOME_LIVE_SHOWN (an administrator sees every user's: thousands of rows, each with
    # its nodes and steps, were one page); the rest are in the admin and the API
    live = list(clusters.filter(state__in=LIVE_STATES)[: HOME_LIVE_SHOWN + 1])
    more = len(live) > HOME_LIVE_SHOWN
    live_total = clusters.filter(state__in=LIVE_STATES).count() if more else len(live)
    live = live[:HOME_LIVE_SHOWN]
    groups = list(request.user.groups.order_by("name"))
    access = reverse("access:my-clusters")
    admin = selectors.staff_may(request.user, "view", VirtualCluster)
    now = timezone.now()
    # the live clusters the user belongs to (their own, and their groups' whose owner is still a member: the rule)
    ours = set(
        clusters.filter(pk__in=[c.pk for c in live])
        .filter(Q(owner=request.user) | selectors.shared_with(request.user))
        .values_list("pk", flat=True)
    )
    for cluster in live:  # the step a cluster in a transitional state is at (the live script keeps it current)
        cluster.progress = selectors.cluster_progress(cluster) if cluster.state not in SETTLED_STATES else None
        # its row on the access page: closed clusters of one's own or of one's groups (an admin sees others' too)
        closed = cluster.connectivity == Connectivity.CLOSED
        cluster.access_url = f"{access}#cluster-{cluster.pk}" if cluster.pk in ours and closed else ""
        cluster.admin_url = reverse("admin:clusters_virtualcluster_change", args=[cluster.pk]) if admin else ""
        cluster.expires_soon = _expires_soon(cluster, now)
        # extend or tear down: the owner's and an admin's (group members only see it), while it is active
        cluster.actionable = cluster.state in ACTIVE_STATES and selectors.may_act_on(request, cluster)
        if cluster.actionable:
            form = refused if refused is not None and refused.cluster.pk == cluster.pk else ExtendForm(cluster=cluster)
            form.offer(now)
            cluster.extend_form = form
    if refused is not None and not any(c.actionable and c.pk == refused.cluster.pk for c in live):
        # its row is not on the page (past the newest HOME_LIVE_SHOWN, or no longer active): the refusal in words
        for problem in [e for errors in refused.errors.values() for e in errors]:
            messages.error(request, f"{refused.cluster.name} was not extended: {problem}")
    ended = list(clusters.exclude(state__in=LIVE_STATES).order_by(F("ended_at").desc(nulls_last=True), "-id")[:10])
    selectors.hide_device_messages(request, live + ended)  # (in memory: not the cluster's people's to read)
    return render(
        request,
        "clusters/home.html",
        {
            "groups": groups,
            "sees_all": selectors.sees_all(request, VirtualCluster),
            "live": live,
            "live_total": live_total,
            # the live page script (static/js/live-state.js) follows rows in a transitional state
            "states": ",".join(ClusterState.values),
            "live_states": ",".join(LIVE_STATES),
            "transitional_states": ",".join(s for s in LIVE_STATES if s not in SETTLED_STATES),
            "state_labels": dict(ClusterState.choices),
            # the last ten to end (a long-lived cluster torn down a minute ago before ten jobs' made after it)
            "ended": ended,
        },
        status=status,
    )


@require_safe
@login_required
@never_cache
def detail(request, pk: int):
    """A cluster's page: what it is, its nodes, its life step by step, its events, and the switches and hosts of its
    network with their last change and open drift ("why is node n2 still pending?")."""
    cluster = get_object_or_404(
        selectors.clusters_visible(request).select_related("owner", "group", "image", "segment"), pk=pk
    )
    steps = list(cluster.steps.order_by("-started_at", "-id")[:50])
    selectors.hide_device_messages(request, [cluster], steps=steps)  # (not the cluster's people's to read)
    for step in steps:
        seconds = (step.finished_at - step.started_at).total_seconds() if step.finished_at else None
        step.took = "" if seconds is None else f"{seconds:.2f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    return render(
        request,
        "clusters/detail.html",
        {
            "cluster": cluster,
            "nodes": list(cluster.nodes.select_related("host", "host__site").order_by("name")),
            "steps": steps,
            "events": list(cluster.events.order_by("-id")[:20]),
            "network": selectors.cluster_network(request, cluster),
            "actionable": cluster.state in ACTIVE_STATES and selectors.may_act_on(request, cluster),
            "admin_url": reverse("admin:clusters_virtualcluster_change", args=[cluster.pk])
            if selectors.sees_all(request, VirtualCluster)
            else "",
        },
    )


def _visible(request, pk: int) -> VirtualCluster:
    """The cluster ``pk`` if the user can see it (404 otherwise, as in the API)."""
    return get_object_or_404(selectors.clusters_visible(request), pk=pk)


def _not_yours(request, cluster: VirtualCluster) -> HttpResponse:
    """403 for a cluster the user sees but may not change (a group member who is not its owner), saying who may."""
    return render(request, "clusters/not_yours.html", {"cluster": cluster}, status=403)


def _cluster_changes_limited(view):
    """Extend and tear down count with the API's cluster writes (``cluster-writes``); past the rate, the home page
    with 429, nothing done."""
    return throttle.limited("cluster-writes", "changes", lambda request: _page(request, status=429))(view)


@_post_only
@login_required
@_cluster_changes_limited
def extend(request, pk: int):
    """A row's "Extend": the expiry later by the length chosen. Refused by the lifetime bounds: the page again
    with the reason at the field (400), nothing changed; refused because of its state: a message."""
    cluster = _visible(request, pk)
    if not selectors.may_act_on(request, cluster):
        return _not_yours(request, cluster)
    form = ExtendForm(request.POST, cluster=cluster)
    if form.is_valid():
        try:
            cluster = services.cluster_extend(cluster=cluster, by=form.delta())
        except ClusterError as exc:
            if exc.field != "expires_at":  # (it has ended, or is ending): nothing to choose differently
                messages.error(request, capfirst(exc.message))
                return redirect(HOME)
            latest = _utc(_longest(cluster))
            form.add_error("by", f"{capfirst(exc.message)}: {cluster.name} may run until {latest} at most.")
    if not form.is_valid():
        return _page(request, refused=form, status=400)
    messages.success(request, f"Extended {cluster.name}: it now expires {_utc(cluster.expires_at)}.")
    if cluster.connectivity == Connectivity.CLOSED:
        messages.info(
            request,
            "VPN profiles and SSH certificates downloaded before still end at the old expiry: "
            "the VPN and SSH access page marks them, download again there.",
        )
    return redirect(HOME)


def _longest(cluster: VirtualCluster) -> datetime:
    """The latest expiry the lifetime bounds allow."""
    return cluster.created_at + services.lifetime_bounds()[1]


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
@_cluster_changes_limited
def teardown(request, pk: int):
    """GET: what tearing this cluster down does, and a button that does it. POST: start the teardown."""
    cluster = _visible(request, pk)
    if not selectors.may_act_on(request, cluster):
        return _not_yours(request, cluster)
    if request.method != "POST":
        selectors.hide_device_messages(request, [cluster])  # (in memory, for the page only)
        return render(
            request,
            "clusters/teardown.html",
            {"cluster": cluster, "active": cluster.state in ACTIVE_STATES, "nodes": list(cluster.nodes.all())},
        )
    if cluster.state == ClusterState.TEARING_DOWN:  # (the button sent twice, or another's teardown came first)
        messages.info(request, f"{cluster.name} is already being torn down.")
        return redirect(HOME)
    try:
        services.cluster_teardown(
            cluster=cluster, reason=f"requested in the browser (by {request.user.get_username()})"
        )
    except ClusterError as exc:  # it has ended meanwhile (a page left open): 409 in the API
        messages.error(request, capfirst(exc.message))
        return redirect(HOME)
    messages.success(
        request,
        f"Tearing down {cluster.name}: its VLAN leaves every switch and host, and access to it is revoked. "
        "It moves to Recently ended when that is done.",
    )
    return redirect(HOME)


# --- images ----------------------------------------------------------------------------------------------------


class ImageForm(forms.Form):
    """Register a user-provided image (``services.image_register``: never approved, so clusters booting it are
    closed)."""

    name = forms.SlugField(max_length=100, help_text="Letters, digits, '-' and '_'; unique among all images.")
    description = forms.CharField(max_length=200, required=False)
    source = forms.CharField(
        max_length=500, required=False, help_text="Where it comes from: a URL, a path, a checksum (for the record)."
    )
    group = forms.ModelChoiceField(
        queryset=None, required=False, empty_label="nobody (only you)", label="Share with group"
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"].queryset = user.groups.order_by("name")

    def focus_first_error(self) -> None:
        """The page opens at the first field refused (the name, for a refusal of the whole form)."""
        refused = [name for name in self.fields if name in self.errors] or ["name"]
        self.fields[refused[0]].widget.attrs["autofocus"] = True


def _image_changes_limited(bound: bool):
    """The images page's writes count with the API's cluster and image writes (``cluster-writes``); past the rate,
    the page again with 429 (``bound``: with the form as it was sent)."""

    def page(request):
        form = ImageForm(request.POST if bound else None, user=request.user)
        return _images_page(request, form, status=429)

    return throttle.limited("cluster-writes", "changes", page)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
@_image_changes_limited(bound=True)
def images(request):
    """GET: the images the user may boot (the provider's catalogue, their own, their groups'), and a form to
    register one of their own. POST: register it (the page again with the refusal at its field: 400)."""
    form = ImageForm(request.POST or None, user=request.user)
    if request.method != "POST":
        return _images_page(request, form)
    if form.is_valid():
        try:
            image, _ = services.image_register(owner=request.user, **form.cleaned_data)
        except ClusterError as exc:  # (a quota reached names no field of the form: the whole form)
            form.add_error(exc.field if exc.field in form.fields else None, capfirst(exc.message))
        else:
            shared = f", shared with {image.group.name}" if image.group else ""
            messages.success(request, f"Registered {image.name}{shared}: clusters booting it are closed.")
            return redirect("clusters:images")
    return _images_page(request, form, status=400)


def _images_page(request, form: ImageForm, *, status: int = 200) -> HttpResponse:
    if form.is_bound and form.errors:
        form.focus_first_error()
    # what the user may boot (an administrator who sees every user's images too: those are the admin's list — on
    # this page they were thousands of rows, unbounded)
    rows = list(selectors.images_usable(request.user).select_related("owner", "group").order_by("name"))
    for image in rows:
        image.changeable = selectors.image_may_change(request, image)
    others = 0
    if selectors.sees_all(request, Image):
        others = selectors.images_visible(request).exclude(pk__in=[image.pk for image in rows]).count()
    context = {"images": rows, "form": form, "others": others}
    return render(request, "clusters/images.html", context, status=status)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
@never_cache
@_image_changes_limited(bound=False)
def image_delete(request, name: str):
    """GET: what deleting this image does (deleted, or retired when ended clusters still name it — its name then
    stays taken — or refused while a live cluster boots it), and a button that does it. POST: delete it."""
    image = get_object_or_404(selectors.images_visible(request), name=name)
    if not selectors.image_may_change(request, image):
        messages.error(request, f"{image.name} is not yours to delete.")
        return redirect("clusters:images")
    if request.method != "POST":
        outcome, live = selectors.image_delete_outcome(image)
        return render(request, "clusters/image_delete.html", {"image": image, "outcome": outcome, "live": live})
    try:
        outcome = services.image_delete(image=image)
    except ClusterError as exc:
        messages.error(request, capfirst(exc.message))
        return redirect("clusters:images")
    if outcome == "retired":
        messages.success(request, f"Retired {image.name}: ended clusters still name it; it boots nothing new.")
    else:
        messages.success(request, f"Deleted {image.name}.")
    return redirect("clusters:images")
