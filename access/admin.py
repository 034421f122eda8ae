"""Access in admin: the authorities (never their keys), credentials (read-only, revoke action), retired host
keys (read-only), gateways (with "make gateway token", whose secret is shown once)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Prefetch

from access import services
from access.models import (
    Authority,
    Credential,
    CredentialCluster,
    Gateway,
    GatewaySession,
    RetiredHostKey,
    RevocationReason,
)
from portal.admin import MadeByThePortal, SavesWhatChanged, secrets_shown


@admin.register(Authority)
class AuthorityAdmin(MadeByThePortal, admin.ModelAdmin):
    """Made by the portal on first use; shown for their certificates and revocation list status only."""

    list_display = ("kind", "created_at", "revocation_number", "revocation_updated_at", "revocation_next_update")
    fields = (
        "kind",
        "certificate",
        "public_key",
        "revocation_number",
        "revocation_updated_at",
        "revocation_next_update",
        "created_at",
    )
    readonly_fields = fields  # (deleting a CA would orphan every credential and gateway)


@admin.register(RetiredHostKey)
class RetiredHostKeyAdmin(MadeByThePortal, admin.ModelAdmin):
    """Bastion host keys taken out of use (a gateway re-enrolled or deleted) whose certificates are still valid:
    every SSH bundle refuses them. Kept by the portal; nothing to edit."""

    list_display = ("gateway", "retired_at", "until")
    fields = ("gateway", "key", "names", "until", "retired_at")
    readonly_fields = fields  # (deleting one would let the old key answer for the gateway again)


class CredentialClusterInline(admin.TabularInline):
    model = CredentialCluster
    fields = ("label", "cluster_id")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    """Every certificate given to a user; revoke from the list (the CRL/KRL is re-signed at once)."""

    list_display = ("serial", "kind", "user", "label", "clusters_list", "not_after", "revoked_at", "revocation_reason")
    list_filter = ("kind", "revocation_reason", "published", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("serial", "user__username", "key_id", "fingerprint", "clusters__label", "label")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Credential._meta.fields]
    inlines = [CredentialClusterInline]
    actions = ["revoke"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("user", "revoked_by")
            .prefetch_related(Prefetch("clusters", queryset=CredentialCluster.objects.order_by("label")))
        )

    @admin.display(description="clusters")
    def clusters_list(self, obj) -> str:
        return ", ".join(obj.cluster_labels())

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # a record of what was issued: view-only (no Save buttons); revoke with the action

    def has_delete_permission(self, request, obj=None):
        return False

    def has_revoke_permission(self, request) -> bool:
        """Who may revoke: those with the model's change permission (though no field can be changed)."""
        return super().has_change_permission(request)

    @admin.action(description="Revoke selected credentials (withdrawn by an administrator)", permissions=["revoke"])
    def revoke(self, request, queryset):
        done = services.credentials_revoke(
            ids=queryset.values_list("pk", flat=True),
            reason=RevocationReason.PRIVILEGE_WITHDRAWN,
            by=request.user,
            note=f"admin action by {request.user.get_username()}",
        )
        self.message_user(request, f"Revoked {done} credential(s); the CRL/KRL was re-signed.", messages.SUCCESS)


@admin.register(GatewaySession)
class GatewaySessionAdmin(MadeByThePortal, admin.ModelAdmin):
    """Who is connected through the access gateways, as each last reported (after its pull): the holder of each
    certificate, where from, on which cluster. A row whose gateway reported longer than ``GATEWAY_STATE_MAX_AGE``
    ago may be over. To cut one: revoke its credential (the gateway cuts it at its next pull)."""

    list_display = ("gateway", "kind", "holder", "serial", "peer", "cluster", "count", "since", "reported_at")
    list_filter = ("kind", "gateway")
    search_fields = ("=serial", "peer", "cluster", "credential__user__username", "credential__label")
    list_select_related = ("gateway", "credential", "credential__user")
    fields = list_display + ("credential",)
    readonly_fields = fields

    @admin.display(description="holder", ordering="credential__user__username")
    def holder(self, obj: GatewaySession) -> str:
        if obj.credential is None:
            return "(not issued by this portal)"
        label = f" ({obj.credential.label})" if obj.credential.label else ""
        who = obj.credential.user.get_username() if obj.credential.user_id else "?"
        return f"{who}{label}"


@admin.register(Gateway)
class GatewayAdmin(SavesWhatChanged, admin.ModelAdmin):
    """Access gateways. After adding one: "make gateway token", then on the gateway host
    ``manage.py gateway config NAME --dir ...`` (on the portal) and ``manage.py gateway pull`` from cron."""

    list_display = (
        "name",
        "site",
        "kind",
        "address",
        "vpn_port",
        "ssh_port",
        "enabled",
        "token",
        "last_pull_at",
        "state_as_of",
        "sessions_reported_at",
    )
    list_filter = ("kind", "enabled", "site")
    search_fields = ("name", "address")
    fields = (
        "name",
        "site",
        "kind",
        "address",
        "vpn_port",
        "vpn_proto",
        "ssh_port",
        "ssh_port_base",
        "ssh_user",
        "server_name",
        "local_state_dir",
        "enabled",
        "token",
        "server_certificate",
        "ssh_host_certificate",
        "enrolled_at",
        "last_pull_at",
        "state_as_of",
    )
    readonly_fields = (
        "token",
        "server_certificate",
        "ssh_host_certificate",
        "enrolled_at",
        "last_pull_at",
        "state_as_of",
    )
    actions = ["make_token"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        renamed = [name for name in ("address", "server_name") if name in form.changed_data]
        if change and obj.enrolled_at is not None and renamed:
            # its certificates name what it was enrolled with: the profiles and bundles issued from now on name
            # the new values, which the gateway's keys do not carry until it is enrolled again
            self.message_user(
                request,
                f"Gateway {obj.name}: its {' and '.join(renamed)} changed, but its TLS and SSH host certificates "
                "still name the old one: VPN profiles and SSH bundles issued from now on will not reach it until "
                f"`manage.py gateway config {obj.name} --re-enrol` has given it new keys (then restart its OpenVPN "
                "and sshd).",
                messages.WARNING,
            )

    def get_readonly_fields(self, request, obj=None):
        # where the portal's own processes write a gateway's state (revocations install it at once): a path on
        # the portal's host, set by a superuser only — a staff member who may change gateways may not make every
        # user's "lost my laptop" write files anywhere the portal may
        fields = super().get_readonly_fields(request, obj)
        return fields if request.user.is_superuser else (*fields, "local_state_dir")

    @admin.action(
        description="Make gateway token (shown once; replaces the gateway's current token)", permissions=["change"]
    )
    def make_token(self, request, queryset):
        made = [(gateway.name, services.gateway_token_issue(gateway=gateway, by=request.user)) for gateway in queryset]
        return secrets_shown(self, request, made, title="Gateway tokens made", what="Gateway")
