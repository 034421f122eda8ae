"""API tokens: issue, authenticate (DRF), revoke. A token is ``vc_<prefix>_<secret>``; only the SHA-256 of
the whole token is stored, and comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from portal import audit
from portal.models import ApiToken, TokenScope

LAST_USED_GRANULARITY = timedelta(seconds=60)  # don't write on every request


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def token_create(*, user, name: str, scopes: list[str], expires_at=None) -> tuple[ApiToken, str]:
    """Make a token; returns (record, the secret shown once)."""
    unknown = set(scopes) - set(TokenScope.values)
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    prefix = secrets.token_hex(4)
    secret = f"vc_{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(
        user=user, name=name, prefix=prefix, key_hash=_hash(secret), scopes=sorted(scopes), expires_at=expires_at
    )
    audit.record(token, "create", {"name": [None, name], "scopes": [None, sorted(scopes)], "user": [None, user.pk]})
    return token, secret


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
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("The token's user is disabled.")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_GRANULARITY:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=_client_ip(request))
        audit.set_request_actor(f"{token.user.get_username()} (token {token.prefix})", token.user)
        return token.user, token

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


def _client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


class HasScope(permissions.BasePermission):
    """Session users (browser) act as themselves; tokens need the view's ``required_scopes`` for the method."""

    message = "This API token lacks the scope for this request."

    def has_permission(self, request, view) -> bool:
        if request.user.is_authenticated and audit.current().actor == "anonymous":
            # Authenticated by DRF inside the view (not by Django's middleware): it becomes the actor.
            audit.set_request_actor(request.user.get_username(), request.user)
        token = request.auth
        if not isinstance(token, ApiToken):
            return True
        scopes = getattr(view, "required_scopes", {})
        needed = scopes.get("write" if request.method not in permissions.SAFE_METHODS else "read", ())
        if not needed:
            return True
        return any(token.has_scope(s) for s in needed)


def token_scope(request, scope: str) -> bool:
    token = getattr(request, "auth", None)  # plain Django requests (browser pages) have no token
    return isinstance(token, ApiToken) and token.has_scope(scope)
