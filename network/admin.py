"""Django admin for the network inventory. Secrets are write-only."""

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count
from django.template.response import TemplateResponse

from network import selectors, services
from network.choices import DeviceKind, PortRole
from network.models import (
    CoreTransport,
    DeviceChange,
    Drift,
    Host,
    Segment,
    SegmentMember,
    Site,
    Switch,
    SwitchPort,
    VlanAllocation,
    VlanPool,
)
from network.selectors import queue_name
from network.vlanranges import format_ranges
from portal.admin import JSON_FORM_FIELDS


def _still_carrying(ports, *, leaving_switches=()) -> list[str]:
    """Why these ports may not be deleted: the live VLANs each still carries (forgotten, a port is never
    converged again, so they would stay on the device). ``leaving_switches``: ids of switches deleted whole."""
    carrying = selectors.ports_carrying([p.pk for p in ports if p.pk], leaving_switches=leaving_switches)
    return [
        f"port {port} carries VLAN {format_ranges(carrying[port.pk])} of live clusters (or of ended ones still "
        "holding it): tear them down, or let their cleanup finish, first"
        for port in ports
        if port.pk in carrying
    ]


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ("name", "description", "worker_queue")
    search_fields = ("name", "description")


class CoreTransportForm(forms.ModelForm):
    """A core's sites are saved after its own clean() ran (many-to-many): what depends on them is checked
    here, with the sites the form is about to give it (leaving a site: ``selectors.core_site_users``, also
    the core uplinks there; joining one: the pools' checks ``shared_site_overlaps`` and ``platform_clashes``)."""

    class Meta:
        model = CoreTransport
        fields = "__all__"  # noqa: DJ007 - the admin shows every field of the core

    def clean(self):
        data = super().clean()
        if not self.instance.pk or "sites" not in data:
            return data
        sites = [site.pk for site in data["sites"]]
        vids = (data["vid_min"], data["vid_max"]) if data.get("vid_min") and data.get("vid_max") else None
        users = selectors.core_site_users(self.instance.pk, sites, vids)
        if users:
            shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            self.add_error(None, f"the core must keep joining the sites and carrying the VLANs of {shown}")
        # a site the core newly joins may bring its pools to another core's pools, and to switches that keep
        # some of their ids for themselves: the pools' own checks, with the sites added
        added = sorted(set(sites) - set(self.instance.sites.values_list("pk", flat=True)))
        if added:
            for pool in self.instance.pools.select_related("core").order_by("name"):
                for problem in (
                    pool.shared_site_overlaps(added) + pool.platform_clashes(added) + pool.static_clashes(added)
                ):
                    self.add_error("sites", problem)
        return data


@admin.register(CoreTransport)
class CoreTransportAdmin(admin.ModelAdmin):
    form = CoreTransportForm
    list_display = ("name", "kind", "vid_min", "vid_max", "service_tag", "site_list")
    list_filter = ("kind", "sites")
    search_fields = ("name", "description")
    filter_horizontal = ("sites",)

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("sites")

    @admin.display(description="sites")
    def site_list(self, obj):
        return ", ".join(s.name for s in obj.sites.all())


class SwitchForm(forms.ModelForm):
    """The password field is write-only: empty keeps the stored one; a box clears it."""

    password = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Leave empty to keep the stored password. Stored encrypted; never shown.",
    )
    clear_password = forms.BooleanField(required=False, help_text="Remove the stored password.")

    class Meta:
        model = Switch
        fields = [
            "name",
            "site",
            "platform",
            "address",
            "username",
            "password",
            "driver_args",
            "worker_queue",
            "enabled",
            "description",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.instance.pk:
            # a new switch has no stored password to keep: the box is sent back with what was typed when another
            # field is refused (empty, the corrected form saved the switch without one, saying nothing)
            self.fields["password"].widget.render_value = True
            self.fields["password"].help_text = "Stored encrypted; never shown once saved. Empty: no password."

    def clean(self):
        data = super().clean()
        if data.get("clear_password"):
            data["password"] = ""
        elif not data.get("password") and self.instance.pk:
            data["password"] = self.instance.password
        self.instance.password = data.get("password", "")
        return data


# --- actions on switches and hosts ---------------------------------------------------------------------------


def _worker(device) -> str:
    """The queue of the worker that converges ``device`` (its own, its site's, or the central worker's)."""
    return queue_name(device) + ("" if device.queue else " (central)")


def _kind(queryset) -> str:
    return DeviceKind.SWITCH if queryset.model is Switch else DeviceKind.HOST


@admin.action(description="Reconcile now (find and repair drift)", permissions=["change"])
def reconcile_now(modeladmin, request, queryset):
    from network import tasks

    kind = _kind(queryset)
    devices = list(queryset.filter(enabled=True).select_related("site"))
    skipped = sorted(queryset.filter(enabled=False).values_list("name", flat=True))
    unsent: list[str] = []
    actor = f"{request.user.get_username()} (admin: reconcile now)"  # whose request the repairs were

    def send(device) -> None:
        try:
            tasks.reconcile_later(kind, device, actor=actor)
        except Exception as exc:  # the broker is unreachable: say so, as Plan does per device
            unsent.append(f"{device.name} ({type(exc).__name__}: {exc})")

    for device in devices:
        transaction.on_commit(lambda device=device: send(device))
    queued = len(devices) - len(unsent)
    if queued:
        modeladmin.message_user(request, f"Reconcile queued for {queued} {kind}(s); see Drift and Device changes.")
    if unsent:
        modeladmin.message_user(request, f"Reconcile could not be queued for {', '.join(unsent)}", level=messages.ERROR)
    if skipped:
        modeladmin.message_user(request, f"Disabled, not reconciled: {', '.join(skipped)}", level=messages.WARNING)


# read-only (a dry run), so anyone who may view the devices may ask for it
@admin.action(description="Plan (dry run): show the diff convergence would apply", permissions=["view"])
def plan_dry_run(modeladmin, request, queryset):
    from network import tasks

    kind = _kind(queryset)
    rows = tasks.plan_devices(kind, list(queryset.filter(enabled=True).select_related("site").order_by("name")))
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"Plan for {len(rows)} {kind}(s): nothing has been changed",
        "rows": rows,
        "skipped": sorted(queryset.filter(enabled=False).values_list("name", flat=True)),
        "opts": modeladmin.model._meta,
    }
    return TemplateResponse(request, "admin/network/plan.html", context)


class SwitchPortFormSet(forms.BaseInlineFormSet):
    """A switch's ports: one that carries live VLANs is not deleted, and a new switch's core uplinks are
    checked against its site (the port's own check needs a saved switch)."""

    def clean(self):
        super().clean()
        refused = _still_carrying([form.instance for form in self.deleted_forms])
        if refused:
            raise forms.ValidationError(refused)
        site = self.instance.site if self.instance.site_id else None
        for form in self.forms:
            if form in self.deleted_forms or not getattr(form, "cleaned_data", None):
                continue
            core = form.cleaned_data.get("core")
            if site is None or core is None or form.cleaned_data.get("role") != PortRole.CORE_UPLINK:
                continue
            joined = set(core.sites.values_list("pk", flat=True))
            if joined and site.pk not in joined:
                form.add_error("core", f"core {core.name} does not join site {site.name}")


class SwitchPortInline(admin.TabularInline):
    model = SwitchPort
    formset = SwitchPortFormSet
    extra = 0
    fields = ("name", "role", "core", "static_vlans", "description")

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        # The rows fit a 1280px screen: interface names are short, and no icons beside each row's core picker.
        if db_field.name in ("name", "static_vlans"):
            kwargs["widget"] = forms.TextInput(attrs={"size": 16})
        formfield = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "core":
            widget = formfield.widget
            widget.can_add_related = widget.can_change_related = False
            widget.can_delete_related = widget.can_view_related = False
        return formfield


@admin.register(Switch)
class SwitchAdmin(admin.ModelAdmin):
    form = SwitchForm
    formfield_overrides = JSON_FORM_FIELDS
    # few columns: at 1280px the filter panel covers the last ones (the platform is a filter)
    list_display = ("name", "site", "address", "worker", "enabled", "port_count")
    list_filter = ("site", "platform", "enabled")
    search_fields = ("name", "address", "description")
    list_select_related = ("site",)
    readonly_fields = ("last_reconciled_at", "reconcile_error")
    inlines = [SwitchPortInline]
    actions = [reconcile_now, plan_dry_run]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_ports=Count("ports"))

    @admin.display(description="ports", ordering="_ports")
    def port_count(self, obj):
        return obj._ports

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms, protected = super().get_deleted_objects(objs, request)
        ports = list(SwitchPort.objects.filter(switch__in=list(objs)).select_related("switch"))
        leaving = [switch.pk for switch in objs]
        return deleted, counts, perms, [*protected, *_still_carrying(ports, leaving_switches=leaving)]

    @admin.display(description="worker queue")
    def worker(self, obj):
        return _worker(obj)


@admin.register(SwitchPort)
class SwitchPortAdmin(admin.ModelAdmin):
    list_display = ("__str__", "switch", "role", "core")
    list_filter = ("role", "switch__site", "core")
    search_fields = ("name", "switch__name", "description")
    list_select_related = ("switch", "switch__site", "core")

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, perms, [*protected, *_still_carrying(list(objs))]

    def get_search_results(self, request, queryset, search_term):
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        # The host form's port picker offers only host trunks (the others would fail validation anyway).
        if request.GET.get("model_name") == "host" and request.GET.get("field_name") == "switch_port":
            queryset = queryset.filter(role=PortRole.HOST_TRUNK)
        return queryset, may_have_duplicates


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    formfield_overrides = JSON_FORM_FIELDS
    list_display = ("name", "site", "switch_port", "trunk_interface", "driver", "worker", "enabled")
    list_filter = ("site", "driver", "enabled")
    search_fields = ("name", "switch_port__name", "switch_port__switch__name")
    readonly_fields = ("last_reconciled_at", "reconcile_error")
    list_select_related = ("site", "switch_port", "switch_port__switch")
    autocomplete_fields = ("switch_port",)
    actions = [reconcile_now, plan_dry_run]

    @admin.display(description="worker queue")
    def worker(self, obj):
        return _worker(obj)


@admin.register(VlanPool)
class VlanPoolAdmin(admin.ModelAdmin):
    list_display = ("name", "core", "ranges", "reserved", "quarantine_seconds")
    list_filter = ("core",)
    search_fields = ("name", "description")
    list_select_related = ("core",)

    def save_model(self, request, obj, form, change):
        """The pool's rows follow its ranges and reserved ids at once (ids no longer in them leave the pool as
        soon as no one holds them, new ones can be handed out)."""
        super().save_model(request, obj, form, change)
        services.vlan_pool_sync(pool=obj)


# --- The VLAN life cycle: allocations, segments, device changes and drift (read-only records) -----------------


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written only by the services and tasks: viewable, never edited by hand."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(VlanAllocation)
class VlanAllocationAdmin(ReadOnlyAdmin):
    list_display = (
        "pool",
        "vid",
        "state",
        "owner",
        "allocated_at",
        "released_at",
        "quarantine_until",
        "gateway_mapped",
    )
    list_filter = ("state", "pool", "gateway_mapped")
    search_fields = ("owner", "=vid")
    list_select_related = ("pool",)


class SegmentMemberInline(admin.TabularInline):
    model = SegmentMember
    extra = 0
    fields = ("host",)
    readonly_fields = ("host",)
    can_delete = False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("segment", "host")  # (a query each per row without)

    def has_add_permission(self, request, obj=None):
        return False


class DeviceChangeInline(admin.TabularInline):
    model = DeviceChange
    extra = 0
    fields = ("device", "cause", "status", "attempts", "started_at", "finished_at", "error")
    readonly_fields = fields
    can_delete = False
    ordering = ("-created_at",)

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Segment)
class SegmentAdmin(ReadOnlyAdmin):
    list_display = ("owner_ref", "vid", "state", "gateway", "member_count", "created_at", "updated_at", "short_error")
    list_filter = ("state", "gateway")
    search_fields = ("owner_ref", "=vid")
    inlines = [SegmentMemberInline, DeviceChangeInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_members=Count("members"))

    @admin.display(description="hosts", ordering="_members")
    def member_count(self, obj):
        return obj._members

    @admin.display(description="why (failed, or VLAN kept)")
    def short_error(self, obj):
        return obj.error[:120]


@admin.register(DeviceChange)
class DeviceChangeAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "kind", "device", "cause", "status", "attempts", "seconds", "short_error")
    list_filter = ("status", "kind")
    search_fields = ("device", "cause", "error", "segment__owner_ref")
    list_select_related = ("segment",)
    date_hierarchy = "created_at"

    @admin.display(description="seconds")
    def seconds(self, obj):
        return None if obj.duration is None else f"{obj.duration:.3f}"

    @admin.display(description="error")
    def short_error(self, obj):
        return obj.error[:120]


@admin.register(Drift)
class DriftAdmin(ReadOnlyAdmin):
    list_display = ("found_at", "device", "port", "kind", "vlans", "expected", "actual", "last_seen_at", "repaired_at")
    list_filter = ("kind", "device_kind", ("repaired_at", admin.EmptyFieldListFilter))
    search_fields = ("device", "port", "vlans")
