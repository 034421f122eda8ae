"""Admin: the audit log (read-only, filterable by object type, action and user), API tokens, directory accounts,
and Django's users (a directory account's password is the directory's)."""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.db import models
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone

from portal import audit
from portal.backends import is_directory_account
from portal.models import ApiToken, AuditEntry, DirectoryAccount, LoginFailure, PeriodicRun, TokenScope
from portal.tokens import token_create, token_revoke


def secrets_shown(modeladmin, request, secrets: list[tuple[str, str]], *, title: str, what: str):
    """The page that shows new secrets (``(name, secret)``) once: rendered in the response itself — not a message,
    which the session store would keep in clear until the next page — and never cached."""
    from django.template.response import TemplateResponse
    from django.utils.cache import add_never_cache_headers

    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "what": what,
        "secrets": secrets,
        "opts": opts,
        "back": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
    }
    response = TemplateResponse(request, "admin/secrets_shown.html", context)
    add_never_cache_headers(response)
    return response


class JSONFormField(forms.JSONField):
    """Django's JSON form field, except that a value nested deeper than Python's stack (``[[[[…``) is the field's
    error like any other malformed JSON, not a 500 (Django catches only ``JSONDecodeError``)."""

    default_error_messages = {"nested": "Nested too deeply."}

    def to_python(self, value):
        try:
            return super().to_python(value)
        except RecursionError:
            raise forms.ValidationError(self.error_messages["nested"], code="nested") from None

    def bound_data(self, data, initial):
        try:
            return super().bound_data(data, initial)
        except RecursionError:
            return forms.fields.InvalidJSONInput(data)


#: for ``ModelAdmin.formfield_overrides``: the JSON fields' form field
JSON_FORM_FIELDS = {models.JSONField: {"form_class": JSONFormField}}


class SavesWhatChanged:
    """A ``ModelAdmin`` whose change saves only the fields the form changed (``update_fields``): a full save wrote
    back every other field as the page's POST had loaded it, the read-only ones included, undoing what a service
    committed meanwhile — a token revoked ("lost my laptop"), an image's approval withdrawn, a gateway given a new
    token or enrolled again."""

    def save_model(self, request, obj, form, change):
        if not change:
            return super().save_model(request, obj, form, change)
        concrete = {f.name for f in obj._meta.concrete_fields if not f.primary_key}
        fields = [name for name in form.changed_data if name in concrete]
        if fields:
            obj.save(update_fields=fields)
        return None


class MadeByThePortal:
    """An admin page for rows only the portal writes: shown, never added, changed or deleted here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(PeriodicRun)
class PeriodicRunAdmin(MadeByThePortal, admin.ModelAdmin):
    """When each periodic task last ended, well or not (a task missing here has not run yet)."""

    list_display = ("task", "last_success_at", "last_failure_at", "last_error")
    search_fields = ("task",)


@admin.register(AuditEntry)
class AuditEntryAdmin(MadeByThePortal, admin.ModelAdmin):
    list_display = ("timestamp", "actor", "action", "content_type", "object_repr", "request_id")
    list_filter = ("action", "content_type")  # (not the actor: a value per token and per guessing address; search)
    search_fields = ("object_repr", "object_id", "actor", "request_id", "message")
    date_hierarchy = "timestamp"
    list_select_related = ("content_type",)
    readonly_fields = [f.name for f in AuditEntry._meta.fields]


class ApiTokenForm(forms.ModelForm):
    # (a node token, ``cluster:node``, is made for its cluster by ``POST /api/clusters/{id}/node-token/``)
    scopes = forms.MultipleChoiceField(
        choices=[(value, label) for value, label in TokenScope.choices if value != TokenScope.CLUSTER_NODE],
        widget=forms.CheckboxSelectMultiple,
    )

    class Meta:
        model = ApiToken
        fields = ["user", "name", "scopes", "expires_at"]

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        unchanged = self.instance.pk is not None and expires_at == self.instance.expires_at
        if expires_at is not None and expires_at <= timezone.now() and not unchanged:
            raise forms.ValidationError(
                "This time has passed: the token would never work. Leave it empty for a token that does not expire, "
                "or revoke the token instead."
            )
        return expires_at


def _plain(value):
    """A field's value as the audit log keeps it (JSON)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


@admin.register(ApiToken)
class ApiTokenAdmin(SavesWhatChanged, admin.ModelAdmin):
    """Tokens are made here; the secret is shown once, on the page the save answers with. A token acts as its user with
    its scopes, so only a superuser makes one or changes its scopes and expiry: another staff member who may
    change tokens renames and revokes them (a token for someone else, or a wider scope, would be theirs to use)."""

    form = ApiTokenForm
    list_display = (
        "name",
        "user",
        "prefix",
        "scopes_list",
        "cluster",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    list_select_related = ("user", "cluster__owner")
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return request.user.is_superuser and super().has_add_permission(request)

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        fixed = ("user", "prefix", "created_at", "revoked_at", "last_used_at", "last_used_ip")
        if obj.cluster_id is not None:  # a node token: its cluster and scope are what it is; it ends with it
            return (*fixed, "cluster", "scopes", "expires_at")
        return fixed if request.user.is_superuser else (*fixed, "scopes", "expires_at")

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
        request._token_made = (f"{token.name} ({token.user.get_username()}, {token.prefix}…)", secret)

    def response_add(self, request, obj, post_url_continue=None):
        made = getattr(request, "_token_made", None)
        if made is None:
            return super().response_add(request, obj, post_url_continue)
        return secrets_shown(self, request, [made], title="Token made", what="Token")

    def delete_model(self, request, obj):
        audit.record(obj, "delete", {"scopes": [obj.scopes, None]})
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for token in queryset:
            audit.record(token, "delete", {"scopes": [token.scopes, None]})
        super().delete_queryset(request, queryset)

    @admin.display(description="scopes")
    def scopes_list(self, obj) -> str:
        labels = dict(TokenScope.choices)
        return ", ".join(labels.get(scope, scope) for scope in obj.scopes) or "—"

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        done = already = 0
        for token in queryset:
            if token.revoked_at is not None:
                already += 1
                continue
            token_revoke(token=token)
            done += 1
        note = f" ({already} revoked before, left as they were)" if already else ""
        self.message_user(request, f"Revoked {done} token(s); they stop working at once{note}.", messages.SUCCESS)


@admin.register(DirectoryAccount)
class DirectoryAccountAdmin(MadeByThePortal, admin.ModelAdmin):
    """Which accounts come from LDAP and when they last followed it (written by logins and the periodic sync;
    read-only here: the directory is the source. Deleting a row would take the account out of the sync, which
    deactivates it when it leaves the directory, and keep its tokens and credentials working after that)."""

    list_display = ["user", "dn", "synced_at", "active"]
    list_select_related = ["user"]
    search_fields = ["user__username", "dn", "entry_uuid"]
    readonly_fields = ["user", "dn", "entry_uuid", "synced_at"]

    @admin.display(boolean=True, ordering="user__is_active")
    def active(self, obj) -> bool:
        return obj.user.is_active


@admin.register(LoginFailure)
class LoginFailureAdmin(admin.ModelAdmin):
    """Recent failed logins per account and address; deleting an account's rows lets it log in again at once (a
    user who mistyped their password too often and called the helpdesk), deleting a client's lets that client
    (an office's NAT, refused for spraying) in again."""

    list_display = ["username", "address", "client", "at"]
    search_fields = ["username", "address", "client"]
    date_hierarchy = "at"
    readonly_fields = ["username", "address", "client", "at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


User = get_user_model()
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(Group)
class PortalGroupAdmin(GroupAdmin):
    """Django's group admin, except that only a superuser changes what permissions a group gives (a staff member
    with ``change_group`` gave a group of their own every permission)."""

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        return fields if request.user.is_superuser else [*fields, "permissions"]


@admin.register(User)
class PortalUserAdmin(UserAdmin):
    """Django's user admin, except that a directory (LDAP) account gets no password here: it would log the
    account in without the directory, even after the directory disabled it (``portal.backends``).

    Who is a superuser, and what permissions and groups an account has, only a superuser changes; and only a
    superuser changes a superuser's or another staff member's account (its password above all): a staff member
    with ``change_user`` would otherwise make themselves one, join a group whose clusters they would get, or take
    over an account with more rights (the things this portal keeps to superusers: minting API tokens, the
    gateways' state). The groups' permissions likewise (``PortalGroupAdmin``)."""

    SUPERUSER_ONLY = ("is_superuser", "user_permissions", "groups")

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:
            fields += [f for f in self.SUPERUSER_ONLY if f not in fields]
        return fields

    @staticmethod
    def _above(request, obj) -> bool:
        """Whether ``obj`` is an account only a superuser changes: a superuser's, or another staff member's (whose
        password, once reset, would log the one who reset it in with that account's rights)."""
        if obj is None or request.user.is_superuser:
            return False
        return obj.is_superuser or (obj.is_staff and obj.pk != request.user.pk)

    def has_change_permission(self, request, obj=None) -> bool:
        return not self._above(request, obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return not self._above(request, obj) and super().has_delete_permission(request, obj)

    def user_change_password(self, request, id, form_url=""):
        user = self.get_object(request, unquote(id))
        if user is not None and is_directory_account(user):
            messages.error(
                request,
                f"The account {user.get_username()} is a directory (LDAP) account: its password is set in the "
                "directory, not here (a password set here would not log it in). To keep it out, deactivate the "
                "account or disable it in the directory.",
            )
            return redirect(reverse("admin:auth_user_change", args=[user.pk]))
        return super().user_change_password(request, id, form_url)
