"""API tokens: issue, authenticate (DRF), revoke. A token is ``vc_<prefix>_<secret>``; only the SHA-256 of
the whole token is stored, and comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.contrib.auth import get_permission_codename
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables
from rest_framework import authentication, exceptions, permissions

from portal import audit
from portal.models import ApiToken, TokenScope

LAST_USED_GRANULARITY = timedelta(seconds=60)  # don't write on every request
#: a token's public prefix (how it is found, and named in logs): random, unique, drawn again when taken — tokens
#: are never deleted, so with 32 bits two of them met in the end (an IntegrityError, a 500)
PREFIX_BYTES = 6
PREFIX_ATTEMPTS = 5


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@sensitive_variables("secret")
@transaction.atomic
def token_create(*, user, name: str, scopes: list[str], expires_at=None, cluster=None) -> tuple[ApiToken, str]:
    """Make a token; returns (record, the secret shown once). ``cluster``: a node token's (``cluster:node`` only)."""
    unknown = set(scopes) - set(TokenScope.values)
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    if (cluster is not None) != (list(scopes) == [TokenScope.CLUSTER_NODE]):
        raise ValueError("a node token (scope cluster:node, and no other) is bound to a cluster, and only it")
    for attempt in range(PREFIX_ATTEMPTS):
        prefix = secrets.token_hex(PREFIX_BYTES)
        secret = f"vc_{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():  # (a savepoint: a prefix taken leaves the caller's transaction usable)
                token = ApiToken.objects.create(
                    user=user,
                    name=name,
                    prefix=prefix,
                    key_hash=_hash(secret),
                    scopes=sorted(scopes),
                    expires_at=expires_at,
                    cluster=cluster,
                )
            break
        except IntegrityError:
            if attempt == PREFIX_ATTEMPTS - 1 or not ApiToken.objects.filter(prefix=prefix).exists():
                raise  # not the prefix (or never free): a real error
    changes = {"name": [None, name], "scopes": [None, sorted(scopes)], "user": [None, user.pk]}
    if cluster is not None:
        changes["cluster"] = [None, cluster.pk]
    audit.record(token, "create", changes)
    return token, secret


#: what a user may give a token of their own (the API tokens page): act as themselves on their clusters and
#: credentials; never middleware's, a gateway's, the router's or monitoring's
SELF_SERVICE_SCOPES = (TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE)
#: live (neither revoked nor expired) tokens a user may hold — made by themselves or by an administrator — for
#: them to make another one themselves
SELF_SERVICE_LIMIT = 20


class TokenRefused(Exception):
    """A token a user asked for themselves is refused: ``field`` (of the form) and why."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def tokens_live(user):
    """``user``'s own tokens that still admit: neither revoked nor expired. Not their clusters' node tokens
    (``cluster:node``): those are the nodes', and end with their cluster (the tokens page, "lost my laptop")."""
    return ApiToken.objects.filter(user=user, revoked_at=None, cluster=None).filter(
        Q(expires_at=None) | Q(expires_at__gt=timezone.now())
    )


@transaction.atomic
def token_create_own(*, user, name: str, scopes: list[str], days: int) -> tuple[ApiToken, str]:
    """A token ``user`` makes for themselves (scripts, a laptop's ``client.py``): ``SELF_SERVICE_SCOPES`` only,
    expiring within ``USER_TOKEN_MAX_DAYS``, at most ``SELF_SERVICE_LIMIT`` live at once. (record, secret)."""
    from django.conf import settings

    if not settings.USER_TOKEN_MAX_DAYS:
        raise TokenRefused(None, "API tokens are made by the administrators here: ask them for one")
    if not scopes or set(scopes) - set(SELF_SERVICE_SCOPES):
        raise TokenRefused("scopes", f"choose among {', '.join(SELF_SERVICE_SCOPES)}")
    if not 1 <= days <= settings.USER_TOKEN_MAX_DAYS:
        raise TokenRefused("days", f"a token lives 1 to {settings.USER_TOKEN_MAX_DAYS} days")
    user._meta.model.objects.select_for_update(no_key=True).filter(pk=user.pk).first()  # one count at a time per user
    if tokens_live(user).count() >= SELF_SERVICE_LIMIT:
        raise TokenRefused(None, f"you hold {SELF_SERVICE_LIMIT} live tokens already: revoke one you no longer use")
    return token_create(user=user, name=name, scopes=list(scopes), expires_at=timezone.now() + timedelta(days=days))


@transaction.atomic
def token_revoke(*, token: ApiToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit.record(token, "update", {"revoked_at": [None, token.revoked_at.isoformat()]})


class TokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer vc_…`` (or ``Token vc_…``)."""

    keywords = ("bearer", "token")

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1").split()
        if not header or header[0].lower() not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header: expected 'Bearer <token>'.")
        raw = header[1]
        parts = raw.split("_", 2)
        if len(parts) != 3 or parts[0] != "vc" or "\x00" in raw:  # (PostgreSQL text cannot hold a NUL)
            raise exceptions.AuthenticationFailed("Invalid API token.")
        token = ApiToken.objects.select_related("user").filter(prefix=parts[1]).first()
        if token is None or not hmac.compare_digest(token.key_hash, _hash(raw)):
            raise exceptions.AuthenticationFailed("Invalid API token.")
        now = timezone.now()
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API token has been revoked.")
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed("This API token has expired.")
        if not token.user.is_active and token.cluster_id is None:
            # a node token is its cluster's, not its owner's: the nodes of a cluster whose owner was deactivated
            # (it runs on until it ends, entered by its group) keep fetching who may log in (members removed,
            # certificates revoked) and their host certificates; it ends with the cluster
            raise exceptions.AuthenticationFailed("The token's user is disabled.")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_GRANULARITY:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=_client_ip(request))
        audit.set_request_actor(f"{token.user.get_username()} (token {token.prefix})", token.user)
        return token.user, token

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


def _client_ip(request) -> str | None:
    from portal.logins import client_address  # (behind the TLS proxy: the client, not the proxy)

    return client_address(request)


class HasScope(permissions.BasePermission):
    """Session users (browser) act as themselves; tokens need the view's ``required_scopes`` for the method. A
    view that names no scope for a method it answers refuses every token (a view that forgot its scopes is closed,
    not open to gateway, router and metrics tokens); a method it does not answer stays DRF's 405."""

    message = "This API token lacks the scope for this request."

    def has_permission(self, request, view) -> bool:
        if request.user.is_authenticated and audit.current().actor == "anonymous":
            # Authenticated by DRF inside the view (not by Django's middleware): it becomes the actor.
            audit.set_request_actor(request.user.get_username(), request.user)
        token = request.auth
        if not isinstance(token, ApiToken):
            return True
        scopes = getattr(view, "required_scopes", {})
        if request.method == "OPTIONS":  # what the view takes: for a token with any scope the view names
            needed = (*scopes.get("read", ()), *scopes.get("write", ()))
        else:
            needed = scopes.get("write" if request.method not in permissions.SAFE_METHODS else "read", ())
        if not needed:
            return getattr(view, request.method.lower(), None) is None  # (not answered: a 405 follows)
        return any(token.has_scope(s) for s in needed)


class StaffSessionMayView(permissions.BasePermission):
    """In the browser, only an administrator who may view the view's model (``staff_may``) — the network
    inventory: switch addresses, device diffs, allocations' holders are not every user's to read. Through a token
    the scopes decide (``HasScope``)."""

    message = "Only an administrator who may view these in the admin reads them with a browser session."

    def has_permission(self, request, view) -> bool:
        if isinstance(request.auth, ApiToken):
            return True
        queryset = getattr(view, "queryset", None)
        return staff_may(request.user, "view", (queryset if queryset is not None else view.get_queryset()).model)


def staff_may(user, action: str, model) -> bool:
    """Whether the Django admin lets ``user`` ``action`` ("view" or "change") every row of ``model``: a
    superuser everything; another staff member with the model's ``change`` permission (which views too), or
    with its ``view`` permission for "view". Not staff (the admin lets nobody else in): nothing — an ordinary
    user, who sees and changes only their own (and sees their groups')."""
    if action not in ("view", "change"):
        raise ValueError(f"unknown action {action!r}")
    if not (user.is_active and user.is_staff):
        return False
    if user.is_superuser:
        return True
    opts = model._meta
    actions = ("change",) if action == "change" else ("change", "view")
    return any(user.has_perm(f"{opts.app_label}.{get_permission_codename(a, opts)}") for a in actions)


def token_scope(request, scope: str) -> bool:
    token = getattr(request, "auth", None)  # plain Django requests (browser pages) have no token
    return isinstance(token, ApiToken) and token.has_scope(scope)
