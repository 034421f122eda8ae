"""Django admin for the network inventory. Secrets are write-only."""

from django import forms
from django.contrib import admin

from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ("name", "description")
    search_fields = ("name", "description")


@admin.register(CoreTransport)
class CoreTransportAdmin(admin.ModelAdmin):
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
            "enabled",
            "description",
        ]

    def clean(self):
        data = super().clean()
        if data.get("clear_password"):
            data["password"] = ""
        elif not data.get("password") and self.instance.pk:
            data["password"] = self.instance.password
        self.instance.password = data.get("password", "")
        return data


class SwitchPortInline(admin.TabularInline):
    model = SwitchPort
    extra = 0
    fields = ("name", "role", "core", "description")


@admin.register(Switch)
class SwitchAdmin(admin.ModelAdmin):
    form = SwitchForm
    list_display = ("name", "site", "platform", "address", "enabled", "port_count")
    list_filter = ("site", "platform", "enabled")
    search_fields = ("name", "address", "description")
    list_select_related = ("site",)
    inlines = [SwitchPortInline]

    def get_queryset(self, request):
        from django.db.models import Count

        return super().get_queryset(request).annotate(_ports=Count("ports"))

    @admin.display(description="ports", ordering="_ports")
    def port_count(self, obj):
        return obj._ports


@admin.register(SwitchPort)
class SwitchPortAdmin(admin.ModelAdmin):
    list_display = ("__str__", "switch", "role", "core")
    list_filter = ("role", "switch__site", "core")
    search_fields = ("name", "switch__name", "description")
    list_select_related = ("switch", "switch__site", "core")


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("name", "site", "switch_port", "trunk_interface", "driver", "agent_queue", "enabled")
    list_filter = ("site", "driver", "enabled")
    search_fields = ("name", "switch_port__name", "switch_port__switch__name")
    list_select_related = ("site", "switch_port", "switch_port__switch")
    autocomplete_fields = ("switch_port",)


@admin.register(VlanPool)
class VlanPoolAdmin(admin.ModelAdmin):
    list_display = ("name", "core", "ranges", "reserved", "quarantine_seconds")
    list_filter = ("core",)
    search_fields = ("name", "description")
    list_select_related = ("core",)
