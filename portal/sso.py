"""Single sign-on behind an authenticating proxy (Shibboleth, mod_auth_openidc, oauth2-proxy: eduGAIN and the
like): the proxy logs the user in and names them in a request header; the portal takes that name only from the
proxy's own addresses, and the account (groups, flags) still comes from the LDAP directory.

Settings (``portal.settings``): ``SSO_HEADER`` (e.g. ``X-Remote-User``; empty: no SSO), ``SSO_PROXIES`` (the
addresses or networks the proxy connects from: a request from anywhere else that carries the header is
served as if it did not), ``SSO_USERNAME_SUFFIX`` (e.g. ``@example.org``: an eduPersonPrincipalName is the
directory's user name without it; a name without it is refused) and ``SSO_LOGOUT_URL`` (where "Log out" sends
the browser after the portal's session ends: the proxy's or the identity provider's logout, or the user is
signed in again by the next request).
"""

from __future__ import annotations

import ipaddress
import logging

from django.conf import settings
from django.contrib import auth

from portal.auth import ActiveLDAPBackend

logger = logging.getLogger(__name__)

BACKEND = "portal.sso.DirectoryRemoteUserBackend"


def _from_proxy(request) -> bool:
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(peer in network for network in settings.SSO_PROXY_NETWORKS)


def username_from(value: str) -> str | None:
    """The directory's user name for what the proxy named (``SSO_USERNAME_SUFFIX`` stripped); None when it is
    not one (empty, another realm, a character no user name has)."""
    name = value.strip()
    suffix = settings.SSO_USERNAME_SUFFIX
    if suffix:
        if not name.lower().endswith(suffix.lower()):
            return None
        name = name[: -len(suffix)]
    if not name or len(name) > 150 or any(ch.isspace() or ch in "@/\\,;=*()" for ch in name):
        return None
    return name


class TrustedHeaderMiddleware:
    """Logs in the user the proxy names (after Django's ``AuthenticationMiddleware``). A session of another
    user is ended first; a request without the header keeps the session it has (the proxy's own pages)."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.meta_key = "HTTP_" + settings.SSO_HEADER.upper().replace("-", "_") if settings.SSO_HEADER else ""

    def __call__(self, request):
        if self.meta_key and self.meta_key in request.META:
            if _from_proxy(request):
                self._sign_in(request, request.META[self.meta_key])
            else:
                logger.warning(
                    "sso: %s from %s, which is not one of SSO_PROXIES: ignored",
                    settings.SSO_HEADER,
                    request.META.get("REMOTE_ADDR", "?"),
                )
        return self.get_response(request)

    def _sign_in(self, request, value: str) -> None:
        name = username_from(value)
        if request.user.is_authenticated and request.user.get_username() == name:
            return
        if request.user.is_authenticated:
            auth.logout(request)  # another user than the session's: never both
        if name is None:
            logger.warning(
                "sso: %r is not a user name of this portal (SSO_USERNAME_SUFFIX %r)",
                value,
                settings.SSO_USERNAME_SUFFIX,
            )
            return
        user = auth.authenticate(request, remote_user=name)
        if user is not None:
            auth.login(request, user, backend=BACKEND)


class DirectoryRemoteUserBackend(ActiveLDAPBackend):
    """The account of a user the proxy named: the directory's (created or brought up to date from it, groups
    and flags included, as at a password login), or, without a directory, an active local account of that name
    that exists already. Never a password login (``authenticate`` takes ``remote_user`` only)."""

    def authenticate(self, request, remote_user=None, **kwargs):
        if remote_user is None or kwargs:
            return None
        from portal.audit import audit_actor

        if getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
            with audit_actor("sso-login"):
                user = self.populate_user(remote_user)  # None: not in the directory
            if user is None:
                logger.warning("sso: %s is not in the directory: not signed in", remote_user)
            return user if user is not None and user.is_active else None
        from django.contrib.auth import get_user_model

        user = get_user_model().objects.filter(username=remote_user, is_active=True).first()
        if user is None:
            logger.warning("sso: no account %s (and no directory to make it from): not signed in", remote_user)
        return user
