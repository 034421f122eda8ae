"""Admin: the audit log (read-only, filterable by object type, action and user), API tokens, directory accounts."""

from django import forms
from django.contrib import admin, messages

from portal import audit
from portal.models import ApiToken, AuditEntry, DirectoryAccount, LoginFailure, TokenScope
from portal.tokens import token_create, token_revoke


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "actor", "action", "content_type", "object_repr", "request_id")
    list_filter = ("action", "content_type", "actor")
    search_fields = ("object_repr", "object_id", "actor", "request_id", "message")
    date_hierarchy = "timestamp"
    list_select_related = ("content_type",)
    readonly_fields = [f.name for f in AuditEntry._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ApiTokenForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(choices=TokenScope.choices, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = ApiToken
        fields = ["user", "name", "scopes", "expires_at"]


def _plain(value):
    """A field's value as the audit log keeps it (JSON)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are made here; the secret is shown once, in the confirmation message."""

    form = ApiTokenForm
    list_display = ("name", "user", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    list_select_related = ("user",)
    actions = ["revoke"]

    def get_readonly_fields(self, request, obj=None):
        return ("user", "prefix", "created_at", "revoked_at", "last_used_at", "last_used_ip") if obj else ()

    def save_model(self, request, obj, form, change):
        if change:
            before = type(obj).objects.get(pk=obj.pk)
            super().save_model(request, obj, form, change)
            changes = {
                name: [_plain(getattr(before, name)), _plain(getattr(obj, name))]
                for name in form.changed_data
                if getattr(before, name) != getattr(obj, name)
            }
            if changes:  # (tokens are not audited by registration: the secret's hash must never be)
                audit.record(obj, "update", changes)
            return
        token, secret = token_create(
            user=form.cleaned_data["user"],
            name=form.cleaned_data["name"],
            scopes=form.cleaned_data["scopes"],
            expires_at=form.cleaned_data.get("expires_at"),
        )
        obj.pk = token.pk
        messages.warning(request, f"Copy the token now, it is not shown again: {secret}")

    def delete_model(self, request, obj):
        audit.record(obj, "delete", {"scopes": [obj.scopes, None]})
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for token in queryset:
            audit.record(token, "delete", {"scopes": [token.scopes, None]})
        super().delete_queryset(request, queryset)

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token_revoke(token=token)


@admin.register(DirectoryAccount)
class DirectoryAccountAdmin(admin.ModelAdmin):
    """Which accounts come from LDAP and when they last followed it (written by logins and the periodic sync;
    read-only here: the directory is the source)."""

    list_display = ["user", "dn", "synced_at", "active"]
    list_select_related = ["user"]
    search_fields = ["user__username", "dn"]
    readonly_fields = ["user", "dn", "synced_at"]

    @admin.display(boolean=True, ordering="user__is_active")
    def active(self, obj) -> bool:
        return obj.user.is_active

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(LoginFailure)
class LoginFailureAdmin(admin.ModelAdmin):
    """Recent failed logins per account; deleting an account's rows lets it log in again at once (a user who
    mistyped their password too often and called the helpdesk)."""

    list_display = ["username", "at"]
    search_fields = ["username"]
    date_hierarchy = "at"
    readonly_fields = ["username", "at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
