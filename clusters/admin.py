"""Clusters in Django admin: state, progress steps and nodes at a glance; teardown as an action."""

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from clusters import selectors, services
from clusters.errors import ClusterError, NotAllowed
from clusters.models import (
    ACTIVE_STATES,
    LIVE_STATES,
    ClusterStep,
    Connectivity,
    IdempotencyKey,
    Image,
    Node,
    PublicPrefix,
    PublicSubnetLease,
    Quota,
    VirtualCluster,
    Webhook,
)
from portal.admin import MadeByThePortal, SavesWhatChanged
from portal.tokens import staff_may


class ImageAdminForm(forms.ModelForm):
    class Meta:
        model = Image
        fields = ("name", "owner", "group", "description", "source")

    def clean(self):
        """A user's image is shared with a group of its owner's only, as the owner's own change is
        (``services.image_update``): shared with another, its members would never see it (and the admin was told
        it was)."""
        data = super().clean()
        owner, group = data.get("owner"), data.get("group")
        if owner is not None and group is not None and not owner.groups.filter(pk=group.pk).exists():
            self.add_error("group", services.not_a_group_of_the_owner(group.name))
        return data


@admin.register(Image)
class ImageAdmin(SavesWhatChanged, admin.ModelAdmin):
    """The provider's catalogue (no owner) and the images users registered. Approving a user's image vouches for
    it: later clusters booting it may be public (paper §2.1); live ones keep their connectivity. Withdrawing the
    approval makes the live public clusters booting it closed (``services.image_approval_withdraw``)."""

    list_display = ("name", "approved", "owner", "group", "description", "created_at", "retired_at")
    list_filter = ("approved", ("owner", admin.EmptyFieldListFilter), ("retired_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "description", "source", "owner__username")
    raw_id_fields = ("owner",)
    # (its actions approve and withdraw: live clusters follow; retiring is a delete, which live clusters refuse)
    readonly_fields = ("created_at", "approved", "retired_at")
    form = ImageAdminForm
    list_select_related = ("owner", "group")
    actions = ("approve", "withdraw_approval")

    @admin.action(description="Approve the selected images (the provider vouches for them)", permissions=["change"])
    def approve(self, request, queryset):
        """A page that shows each image's source first; confirmed, only the versions shown are approved (an owner
        who changed the source meanwhile — the change took the approval away — gets no approval for one nobody
        reviewed)."""
        pending = list(queryset.filter(approved=False).select_related("owner").order_by("name"))
        if request.POST.get("post") != "yes":
            if not pending:
                self.message_user(request, "0 image(s) approved.")
                return None
            for image in pending:  # (a digest, not the text: a form sends a source's newlines back as CRLF)
                image.source_digest = services.image_source_digest(image.source)
            context = {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": "Approve these images?",
                "images": pending,
            }
            return TemplateResponse(request, "admin/clusters/image/approve_confirmation.html", context)
        approved, changed = 0, []
        for image in pending:
            shown = request.POST.get(f"source-{image.pk}")  # the digest of the source the page showed
            if services.image_approve(image=image, shown=shown):
                approved += 1
            elif not Image.objects.filter(pk=image.pk, approved=True).exists():  # (not approved meanwhile)
                changed.append(image.name)
        self.message_user(request, f"{approved} image(s) approved.")
        if changed:
            self.message_user(
                request,
                f"Not approved: {', '.join(changed)}: the source changed since the page showed it (or it was not "
                "shown); review it again.",
                messages.WARNING,
            )
        return None

    @admin.action(
        description="Withdraw the approval of the selected images (their live public clusters become closed)",
        permissions=["change"],
    )
    def withdraw_approval(self, request, queryset) -> None:
        closed, left = [], []
        withdrawn = queryset.filter(approved=True).count()
        for image in queryset:
            try:
                done, kept = services.image_approval_withdraw(image=image, admin=request.user)
            except NotAllowed as exc:  # (may change images, not the clusters that boot them)
                self.message_user(request, f"Nothing withdrawn: {exc.message}", messages.ERROR)
                return
            closed += done
            left += kept
        self.message_user(
            request, f"{withdrawn} image(s) no longer approved; {len(closed)} public cluster(s) booting them closed."
        )
        if left:
            names = "; ".join(f"{c.name} ({c.owner.get_username()}): {why}" for c, why in left)
            self.message_user(
                request,
                f"Still public: {names}. The periodic expiry closes each once it is ready and its network can be "
                "closed.",
                messages.WARNING,
            )


@admin.register(PublicPrefix)
class PublicPrefixAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "subnet_length", "free_subnets")

    @admin.display(description="free subnets (allocated, resting)")
    def free_subnets(self, obj: PublicPrefix) -> str:
        u = selectors.public_prefix_usage([obj])[obj.pk]  # (two queries a row: a provider has a few prefixes)
        return f"{u['free']} of {u['size']} ({u['allocated']}, {u['resting']})"


@admin.register(PublicSubnetLease)
class PublicSubnetLeaseAdmin(MadeByThePortal, admin.ModelAdmin):
    """Who held each public subnet, and when. Search for an address (``198.51.100.7``), or an address and a time
    (``198.51.100.7 2026-12-01T10:00Z``): the clusters whose subnet held it (then)."""

    list_display = ("subnet", "cluster_name", "owner", "group", "job_id", "started_at", "ended_at")
    search_fields = ("subnet", "cluster_name", "owner", "group", "job_id")
    search_help_text = "an address, or an address and a time (198.51.100.7 2026-12-01T10:00Z); or a subnet, owner, job"
    date_hierarchy = "started_at"

    def get_search_results(self, request, queryset, search_term):
        found = _address_and_time(search_term)
        if found is None:
            return super().get_search_results(request, queryset, search_term)
        address, at = found
        holders = selectors.public_address_holders(address, at=at)
        return queryset.filter(pk__in=holders.values("pk")), False


def _address_and_time(text: str):
    """(address, time or None) when ``text`` is an IP address, optionally followed by an ISO 8601 time (UTC
    unless it says otherwise); None for anything else."""
    import ipaddress

    parts = text.split()
    if not 1 <= len(parts) <= 2:
        return None
    try:
        ipaddress.ip_address(parts[0])
    except ValueError:
        return None
    if len(parts) == 1:
        return parts[0], None
    at = selectors.moment(parts[1])
    return (parts[0], at) if at else None


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Per-user and per-group limits of live clusters and nodes; the defaults are in the settings."""

    list_display = ("__str__", "max_clusters", "max_nodes", "in_use", "note")
    search_fields = ("user__username", "group__name", "note")
    raw_id_fields = ("user",)

    def get_queryset(self, request):
        return selectors.quotas_with_usage(super().get_queryset(request))

    @admin.display(description="live clusters / nodes now")
    def in_use(self, quota: Quota) -> str:
        return f"{quota.live_clusters} / {quota.live_nodes}"


class WebhookForm(forms.ModelForm):
    url = forms.URLField(  # the model's field checks the schemes (http, https): said once, not twice
        label="URL",
        max_length=500,
        assume_scheme="https",
        help_text="http(s) endpoint that receives POSTed batches of events",
    )
    secret = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="signs every body (HMAC-SHA256); stored encrypted, never shown back; empty: keep the current one",
    )

    class Meta:
        model = Webhook
        fields = ("name", "url", "secret", "states", "kinds", "enabled")

    def clean_name(self):
        """Unique among its owner's webhooks (the admin's, for one made here): the owner is not a field of the
        form, so the model's constraint is checked here, as the form would."""
        name = self.cleaned_data.get("name")
        owner = self.instance.owner_id if self.instance and self.instance.pk else None
        if Webhook.objects.filter(owner_id=owner, name=name).exclude(pk=self.instance.pk).exists():
            constraint = "webhook_name_of_the_admin" if owner is None else "webhook_name_per_owner"
            message = next(c for c in Webhook._meta.constraints if c.name == constraint).violation_error_message
            raise forms.ValidationError(message)
        return name

    def clean_secret(self):
        secret = self.cleaned_data.get("secret") or ""
        if not secret and not (self.instance and self.instance.pk):
            raise forms.ValidationError("a new webhook needs a secret")
        return secret or self.instance.secret


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    """Endpoints the cluster event feed is pushed to; the delivery state shows whether they keep up."""

    form = WebhookForm
    list_display = (
        "name",
        "url",
        "owner",
        "enabled",
        "all_clusters",
        "last_event_id",
        "last_status",
        "failures",
        "failing_since",
        "last_delivered_at",
    )
    list_filter = ("enabled", "all_clusters", ("owner", admin.EmptyFieldListFilter))
    readonly_fields = (
        "owner",
        "token",
        "all_clusters",
        "last_event_id",
        "last_delivered_at",
        "last_status",
        "last_error",
        "failures",
        "failing_since",
        "next_attempt_at",
    )

    # An admin's webhook gets every cluster's events (owner None, all clusters): only for who may view them all,
    # as a webhook an admin session registers through the API is delivered only while its admin may
    def _sees_every_cluster(self, request) -> bool:
        return staff_may(request.user, "view", VirtualCluster)

    def has_add_permission(self, request):
        return super().has_add_permission(request) and self._sees_every_cluster(request)

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and self._sees_every_cluster(request)

    def save_model(self, request, obj, form, change):
        if change:
            services.webhook_admin_save(hook=obj, changed=form.changed_data)
        else:
            super().save_model(request, obj, form, change)


class NodeInline(admin.TabularInline):
    model = Node
    fk_name = "cluster"
    extra = 0
    fields = ("name", "host", "target_host", "mac", "address", "state")
    readonly_fields = fields
    can_delete = False
    classes = ["no-row-titles"]  # each row's __str__ ("demo/node1") repeats its columns: hidden (change_form.html)

    def get_queryset(self, request):
        # (each row shows its hosts and, in its title, its cluster: a query each per row without these)
        return super().get_queryset(request).select_related("cluster", "host", "target_host")

    def has_add_permission(self, request, obj=None):
        return False


class StepInline(admin.TabularInline):
    model = ClusterStep
    extra = 0
    fields = ("name", "status", "started_at", "finished_at", "device", "detail", "error")
    readonly_fields = fields
    can_delete = False
    classes = ["no-row-titles"]  # "1:allocate:ok" says nothing the columns do not

    def has_add_permission(self, request, obj=None):
        return False

    def get_formset(self, request, obj=None, **kwargs):
        """The steps without the devices' own messages for staff who may not view device changes (as the API
        and the pages show them: ``selectors.device_messages``); in memory, for the page (the rows are read-only)."""
        formset = super().get_formset(request, obj, **kwargs)
        messages = selectors.device_messages(request, [obj]).get(obj.pk) if obj is not None else None
        if not messages:
            return formset

        class Withheld(formset):
            def get_queryset(self):
                if not hasattr(self, "_withheld"):
                    self._withheld = list(super().get_queryset())
                    selectors.withhold_device_messages(messages, steps=self._withheld)
                return self._withheld

        return Withheld


class VirtualClusterForm(forms.ModelForm):
    """The one field admins edit, the expiry, checked by the service before anything is saved: a refused
    extension is an error on the field, never a "changed successfully"."""

    class Meta:
        model = VirtualCluster
        fields = ("expires_at",)

    def clean_expires_at(self):
        value = self.cleaned_data["expires_at"]
        if "expires_at" in self.changed_data and value is not None:
            try:
                services.cluster_extend_check(cluster=self.instance, expires_at=value)
            except ClusterError as exc:
                raise forms.ValidationError(exc.message) from None
        return value


def _undeletable(cluster) -> str:
    """Why the row of ``cluster`` may not be deleted ("" when it may): it is live, or its network still is, or it
    ended less than ``CLUSTER_EVENT_RETENTION`` days ago — its events go with its row, and the feed and the
    webhooks promise every event until then (a reader behind would never learn it ended), and so do its
    Idempotency-Keys (a scheduler's retry would make a second cluster)."""
    from network.models import Segment

    if cluster.state in LIVE_STATES:
        return f"cluster {cluster.name} is {cluster.get_state_display()}: tear it down first"
    if cluster.segment_id and Segment.objects.filter(pk=cluster.segment_id, state__in=Segment.LIVE_STATES).exists():
        return f"cluster {cluster.name}'s network is still being rolled back: wait until it is released"
    kept_until = (cluster.ended_at or cluster.updated_at) + timedelta(days=settings.CLUSTER_EVENT_RETENTION)
    if kept_until > timezone.now():
        return (
            f"cluster {cluster.name} ended less than CLUSTER_EVENT_RETENTION ({settings.CLUSTER_EVENT_RETENTION}) "
            f"days ago: the event feed, the webhooks and its Idempotency-Keys still answer for it; it can be deleted "
            f"from {timezone.localtime(kept_until):%Y-%m-%d %H:%M}"
        )
    return ""


@admin.register(VirtualCluster)
class VirtualClusterAdmin(admin.ModelAdmin):
    form = VirtualClusterForm
    # few columns: at 1280px the filter panel covers the last ones (the creation date is in the date hierarchy)
    list_display = ("name", "owner", "state", "connectivity", "vlan_id", "expires_at")
    list_filter = ("state", "connectivity", "image", "group")
    search_fields = ("name", "owner__username", "job_id")
    list_select_related = ("owner", "group")
    date_hierarchy = "created_at"
    readonly_fields = (
        "name",
        "owner",
        "group",
        "image",
        "admin_rights",
        "connectivity",
        "connectivity_reason",
        "connectivity_overridden_by",
        "connectivity_overridden",
        "state",
        "state_reason",
        "segment",
        "vlan_id",
        "public_prefix",
        "public_subnet",
        "bastion_address",
        "job_id",
        "created_at",
        "ready_at",
        "ended_at",
    )
    fields = (*readonly_fields, "expires_at")
    inlines = [NodeInline, StepInline]
    actions = ["teardown", "override_connectivity", "export_usage"]

    def has_add_permission(self, request):
        return False  # clusters are created through the API, where the policy and the workflow run

    def get_object(self, request, object_id, from_field=None):
        """Its reason without the devices' own messages for staff who may not view device changes (in memory: the
        page's one editable field, the expiry, is saved by the service, never the row as loaded)."""
        cluster = super().get_object(request, object_id, from_field)
        if cluster is not None:
            selectors.hide_device_messages(request, [cluster], steps=())  # (the steps: ``StepInline``)
        return cluster

    def has_delete_permission(self, request, obj=None):
        # No Delete button on a live cluster's page: the delete would be refused (get_deleted_objects).
        return super().has_delete_permission(request, obj) and not (obj is not None and _undeletable(obj))

    def get_deleted_objects(self, objs, request):
        # Deleting a live cluster's row would leave its VLAN on the devices (its segment outlives it) and its
        # credentials valid: only the teardown cleans and revokes. A failed one whose network is not rolled back
        # yet (the rollback could not be sent, or is running) likewise: the sweeper that finishes it works from the
        # cluster's row.
        deleted, counts, perms, protected = super().get_deleted_objects(objs, request)
        live = [why for c in objs if (why := _undeletable(c))]
        if live and super().has_delete_permission(request):
            # has_delete_permission refuses the live ones: this says why, where "no permission" would not
            perms = perms - {self.model._meta.verbose_name}
        return deleted, counts, perms, [*protected, *live]

    def save_model(self, request, obj, form, change):
        if change and "expires_at" in form.changed_data:
            try:
                services.cluster_extend(cluster=obj, expires_at=obj.expires_at)
            except ClusterError as exc:  # the cluster changed since the form's check (a teardown started)
                request._cluster_not_saved = True
                messages.error(request, f"Not saved: {exc.message}")

    def message_user(self, request, message, level=messages.INFO, *args, **kwargs):
        if level == messages.SUCCESS and getattr(request, "_cluster_not_saved", False):
            return  # save_model said why nothing was saved
        super().message_user(request, message, level, *args, **kwargs)

    def get_urls(self):
        opts = self.model._meta
        name = f"{opts.app_label}_{opts.model_name}_teardown"
        teardown = path("<path:object_id>/teardown/", self.admin_site.admin_view(self.teardown_view), name=name)
        return [teardown, *super().get_urls()]

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        # the change page's "Tear down…" button: where the service would start a teardown
        context["can_tear_down"] = (
            obj is not None and obj.state in ACTIVE_STATES and self.has_change_permission(request, obj)
        )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def teardown_view(self, request, object_id):
        """The change page's "Tear down…": the action's confirmation for this one cluster, then back to it."""
        cluster = self.get_object(request, unquote(object_id))
        if cluster is None:
            raise Http404(f"no cluster with id {object_id}")
        if not self.has_change_permission(request, cluster):
            raise PermissionDenied
        response = self.teardown(request, self.get_queryset(request).filter(pk=cluster.pk))
        opts = self.model._meta
        return response or HttpResponseRedirect(
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[cluster.pk])
        )

    @admin.action(description="Export the usage of selected clusters (CSV)", permissions=["view"])
    def export_usage(self, request, queryset):
        """Each selected cluster's hours and its nodes' hours over its whole life (until now), as CSV: the
        accounting of a project's clusters picked in the list (``manage.py clusters usage`` for a window)."""
        from django.db.models import Min
        from django.http import HttpResponse

        from clusters.reports import write_usage

        now = timezone.now()
        since = queryset.aggregate(first=Min("created_at"))["first"] or now
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="virtcloud-usage-{now:%Y%m%d-%H%M}.csv"'
        write_usage(response, since=since, until=now + timedelta(seconds=1), by="cluster", only=queryset)
        return response

    @admin.action(description="Tear down selected clusters…", permissions=["change"])
    def teardown(self, request, queryset):
        """A page naming the clusters and what a teardown does; confirmed, each one's teardown starts (audited)."""
        clusters = list(queryset.select_related("owner").order_by("name"))
        if request.method == "POST" and "apply" in request.POST:
            reason = f"admin {request.user.get_username()}"
            _apply_each(
                request,
                clusters,
                lambda cluster: services.cluster_teardown(cluster=cluster, reason=reason),
                "Teardown started for {n} cluster(s).",
            )
            return None
        return self._confirm(request, "Tear down clusters", "teardown_confirm.html", clusters)

    @admin.action(description="Override the connectivity policy of selected clusters…", permissions=["change"])
    def override_connectivity(self, request, queryset):
        """A page asking the connectivity and the reason; applied (audited) to each ready cluster."""
        clusters = list(queryset.select_related("owner").order_by("name"))
        form = ConnectivityOverrideForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            _apply_each(
                request,
                clusters,
                lambda cluster: services.connectivity_override(
                    cluster=cluster,
                    connectivity=form.cleaned_data["connectivity"],
                    admin=request.user,
                    reason=form.cleaned_data["reason"],
                ),
                "Connectivity set for {n} cluster(s); their network follows.",
            )
            return None
        return self._confirm(
            request, "Override the connectivity policy", "connectivity_override.html", clusters, form=form
        )

    def _confirm(self, request, title: str, template: str, clusters: list, **extra) -> TemplateResponse:
        """The page an action asks on before it changes anything (``admin/clusters/<template>``)."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "clusters": clusters,
            "opts": self.model._meta,
            **extra,
        }
        return TemplateResponse(request, f"admin/clusters/{template}", context)


def _apply_each(request, clusters: list, apply, done: str) -> None:
    """``apply(cluster)`` for each of ``clusters``: one refused (a ``ClusterError``) is a warning naming it and
    the others go on; then ``done`` (with ``{n}``, how many were not refused) as a message."""
    count = 0
    for cluster in clusters:
        try:
            apply(cluster)
            count += 1
        except ClusterError as exc:
            messages.warning(request, f"{cluster.name}: {exc.message}")
    if count:
        messages.info(request, done.format(n=count))


class ConnectivityOverrideForm(forms.Form):
    connectivity = forms.ChoiceField(choices=Connectivity.choices)
    reason = forms.CharField(max_length=500, help_text="why the policy's decision does not apply (audited)")


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):
    """Keys are recorded by the API's changes; one made by hand would answer a request nobody made."""

    list_display = ("key", "actor", "cluster", "created_at")
    search_fields = ("key", "actor")
    readonly_fields = ("key", "actor", "request_hash", "cluster", "created_at")

    def has_add_permission(self, request):
        return False
