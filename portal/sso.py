"""Single sign-on through an authenticating proxy (Shibboleth, mod_auth_openidc, oauth2-proxy: eduGAIN and the
like): the proxy protects one path, ``/sso/login/``, and names the user it signed in in a request header
there; the portal takes that name only on that path and only from the proxy's own addresses, signs the user
in (a session, as a password login makes), and the account — groups, flags — still comes from the LDAP
directory. Everywhere else the header means nothing, so a path the proxy leaves open (the API, static files)
cannot be used to name someone.

Settings (``portal.settings``): ``SSO_HEADER`` (e.g. ``X-Remote-User``; empty: no SSO), ``SSO_PROXIES`` (the
addresses or networks the proxy connects from), ``SSO_USERNAME_SUFFIX`` (the realm the identity provider
vouches for, e.g. ``@example.org``: an eduPersonPrincipalName is the directory's user name without it; a name
without it signs nobody in) and ``SSO_LOGOUT_URL`` (where "Log out" sends the browser after the portal's session
ends: the proxy's or the identity provider's logout).
"""

from __future__ import annotations

import ipaddress
import logging

from django.conf import settings
from django.contrib import auth
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from portal.auth import LDAP_UNAVAILABLE_MESSAGE, ActiveLDAPBackend
from portal.logins import login_audit

logger = logging.getLogger(__name__)

BACKEND = "portal.sso.DirectoryRemoteUserBackend"


def from_proxy(request) -> bool:
    """Whether the request comes from one of ``SSO_PROXIES`` (an IPv4-mapped IPv6 peer as its IPv4 address)."""
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    peer = getattr(peer, "ipv4_mapped", None) or peer
    return any(peer in network for network in settings.SSO_PROXY_NETWORKS)


def username_from(value: str) -> str | None:
    """The directory's user name for what the proxy named: ``SSO_USERNAME_SUFFIX`` stripped, lower-cased (as
    the directory's accounts are kept); None when it is not one (another realm, a character no name has)."""
    name = value.strip().lower()
    suffix = settings.SSO_USERNAME_SUFFIX.lower()
    if not name.endswith(suffix):
        return None
    name = name[: len(name) - len(suffix)]
    if not name or len(name) > 150 or any(ch.isspace() or ch in "@/\\,;=*()" for ch in name):
        return None
    return name


@require_safe
@never_cache
def sso_login(request):
    """``/sso/login/?next=…`` — behind the proxy: sign in the user it names (a session of another user ends
    first — asked first when another site's link led here), then on to ``next``. Refused (403, saying why,
    logged): not from the proxy, no header, a name that is not one of this portal's, an account the directory does
    not have."""
    meta_key = "HTTP_" + settings.SSO_HEADER.upper().replace("-", "_")
    target = request.GET.get("next", "")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, require_https=request.is_secure()):
        target = settings.LOGIN_REDIRECT_URL
    if not from_proxy(request) or meta_key not in request.META:
        logger.warning("sso: login from %s without the proxy's header: refused", request.META.get("REMOTE_ADDR", "?"))
        return _refused(request, "This address is not behind the organization's login.")
    value = request.META[meta_key]
    name = username_from(value)
    if name is None:
        logger.warning("sso: %r is not a user name of this portal (SSO_USERNAME_SUFFIX)", value)
        return _refused(request, "Your organization's login names an account this portal does not serve.")
    if request.user.is_authenticated and request.user.get_username() == name:
        return redirect(target)
    if request.user.is_authenticated:
        if request.META.get("HTTP_SEC_FETCH_SITE") == "cross-site":
            # a link on another site would end this session (an administrator's password one, say) at a click
            # there: the browser's user says so here first
            context = {"signed_in": request.user.get_username(), "name": name, "next": target}
            return render(request, "registration/sso_switch.html", context)
        auth.logout(request)  # another user than the session's: never both
    user = auth.authenticate(request, remote_user=name)
    if user is None and getattr(request, "ldap_unavailable", False):  # an outage, not an unknown account
        return render(request, "registration/sso_refused.html", {"why": LDAP_UNAVAILABLE_MESSAGE}, status=503)
    if user is None:
        return _refused(request, f"There is no active account {name} in the directory.")
    auth.login(request, user, backend=BACKEND)
    login_audit(user, request, "single sign-on")
    return redirect(target)


def context(request) -> dict:
    """Templates: whether the login page offers "Log in with your organization"."""
    return {"sso_enabled": bool(settings.SSO_HEADER)}


def _refused(request, why: str):
    return render(request, "registration/sso_refused.html", {"why": why}, status=403)


class DirectoryRemoteUserBackend(ActiveLDAPBackend):
    """The directory's account of a user the proxy named, created or brought up to date from it (groups and
    flags, as at a password login; a local account of that name that is in use is never taken over). Never a
    password login: ``authenticate`` takes ``remote_user`` only."""

    def authenticate(self, request, remote_user=None, **kwargs):
        if remote_user is None or kwargs or not getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
            return None
        from django_auth_ldap.backend import _LDAPUser

        from portal.audit import audit_actor

        with audit_actor("sso-login"):
            # populate_user, with the request: an outage reported through it marks the request (``ldap_unavailable``)
            user = _LDAPUser(self, username=remote_user, request=request).populate_user()  # None: not found, or down
        if user is None:
            logger.warning("sso: %s not found in the directory (or it is unreachable): not signed in", remote_user)
        return user if user is not None and user.is_active else None
