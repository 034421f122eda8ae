"""Identity from LDAP (django-auth-ldap over python-ldap). The only module that imports ``ldap``.

Users and their groups come from the directory (groups are mirrored into Django groups, which the
``clusters`` app maps to cluster membership); staff and superuser flags follow configured LDAP groups. A
local Django superuser keeps working as break-glass when the directory is down. A directory that cannot be
reached is reported to the person logging in as such, not as a wrong password.

django-auth-ldap updates an account only when its owner logs in, but an API token acts without a login:
``ldap_sync`` (beat, every ``LDAP_SYNC_INTERVAL`` seconds) brings every directory account up to date —
groups (leaving one revokes the credentials it gave), flags, names — and deactivates an account gone from
the directory (which revokes every credential and stops its tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ldap
import ldap.filter
from django.core.exceptions import ImproperlyConfigured
from django_auth_ldap.backend import LDAPBackend
from django_auth_ldap.config import GroupOfNamesType, LDAPGroupQuery, LDAPSearch, PosixGroupType

from portal.env import env_bool, env_float, env_str

logger = logging.getLogger(__name__)

LDAP_UNAVAILABLE_MESSAGE = (
    "The directory service (LDAP) cannot be reached, so LDAP accounts cannot log in right now. "
    "Please try again in a few minutes; if it persists, contact the operators."
)

_GROUP_TYPES = {"posix": PosixGroupType, "groupofnames": GroupOfNamesType}


class ActiveLDAPBackend(LDAPBackend):
    """django-auth-ldap's backend, except that a deactivated account (``ldap_sync``: gone from the directory)
    loses its browser sessions at once, as Django's own backend does: django-auth-ldap's ``get_user`` does not
    look at ``is_active``, so such a session stayed signed in for up to the session's lifetime."""

    def get_user(self, user_id):
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None


def ldap_settings() -> dict:
    """AUTH_LDAP_* settings from the environment; empty when LDAP_SERVER_URI is not set."""
    uri = env_str("LDAP_SERVER_URI")
    if not uri:
        return {}
    if not uri.startswith(("ldap://", "ldaps://", "ldapi://")):
        raise ImproperlyConfigured(f"LDAP_SERVER_URI={uri!r} must start with ldap://, ldaps:// or ldapi://")
    user_base = env_str("LDAP_USER_BASE", required=True)
    group_base = env_str("LDAP_GROUP_BASE", required=True)
    group_kind = (env_str("LDAP_GROUP_TYPE", "posix") or "").lower()
    if group_kind not in _GROUP_TYPES:
        raise ImproperlyConfigured(f"LDAP_GROUP_TYPE={group_kind!r} must be one of: {', '.join(_GROUP_TYPES)}")
    object_class = "posixGroup" if group_kind == "posix" else "groupOfNames"
    timeout = env_float("LDAP_TIMEOUT", 3.0, minimum=0.1)
    flags = {}
    staff, superuser = env_str("LDAP_STAFF_GROUP"), env_str("LDAP_SUPERUSER_GROUP")
    if superuser:
        flags["is_superuser"] = superuser
    # A superuser who is not staff cannot open the admin: membership of either group makes staff.
    if staff and superuser:
        flags["is_staff"] = LDAPGroupQuery(staff) | LDAPGroupQuery(superuser)
    elif staff or superuser:
        flags["is_staff"] = staff or superuser
    return {
        "AUTH_LDAP_SERVER_URI": uri,
        "AUTH_LDAP_BIND_DN": env_str("LDAP_BIND_DN", ""),
        "AUTH_LDAP_BIND_PASSWORD": env_str("LDAP_BIND_PASSWORD", ""),
        "AUTH_LDAP_START_TLS": env_bool("LDAP_START_TLS", False),
        "AUTH_LDAP_USER_SEARCH": LDAPSearch(
            user_base, ldap.SCOPE_SUBTREE, env_str("LDAP_USER_FILTER", "(uid=%(user)s)")
        ),
        "AUTH_LDAP_USER_ATTR_MAP": {"first_name": "givenName", "last_name": "sn", "email": "mail"},
        "AUTH_LDAP_GROUP_SEARCH": LDAPSearch(group_base, ldap.SCOPE_SUBTREE, f"(objectClass={object_class})"),
        "AUTH_LDAP_GROUP_TYPE": _GROUP_TYPES[group_kind](name_attr="cn"),
        "AUTH_LDAP_MIRROR_GROUPS": True,
        "AUTH_LDAP_FIND_GROUP_PERMS": False,
        "AUTH_LDAP_USER_FLAGS_BY_GROUP": flags,
        "AUTH_LDAP_ALWAYS_UPDATE_USER": True,
        "AUTH_LDAP_CONNECTION_OPTIONS": {
            ldap.OPT_NETWORK_TIMEOUT: timeout,
            ldap.OPT_TIMEOUT: timeout,
            ldap.OPT_REFERRALS: 0,
        },
    }


def connect_signals() -> None:
    """Called from ``PortalConfig.ready``: remember a directory outage on the request for the login form, and
    which accounts come from the directory."""
    from django.contrib.auth import get_user_model
    from django.db.models.signals import post_save
    from django_auth_ldap.backend import ldap_error, populate_user

    ldap_error.connect(_on_ldap_error, dispatch_uid="portal-ldap-error")
    populate_user.connect(_on_populate, dispatch_uid="portal-ldap-populate")
    post_save.connect(_on_user_saved, sender=get_user_model(), dispatch_uid="portal-ldap-account")


def _on_populate(sender, user, ldap_user, **kwargs) -> None:
    # sent before the user is saved (a new one has no primary key yet): recorded by _on_user_saved
    user._directory_dn = ldap_user.dn


def _on_user_saved(sender, instance, raw=False, **kwargs) -> None:
    dn = getattr(instance, "_directory_dn", None)
    if raw or not dn:
        return
    from django.utils import timezone

    from portal.models import DirectoryAccount

    del instance._directory_dn
    DirectoryAccount.objects.update_or_create(user=instance, defaults={"dn": dn, "synced_at": timezone.now()})


def _on_ldap_error(sender, context, user, request=None, exception=None, **kwargs) -> None:
    if isinstance(exception, (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR)):
        logger.warning("LDAP unavailable during %s: %s", context, type(exception).__name__)
        if request is not None:
            request.ldap_unavailable = True
    else:
        logger.warning("LDAP error during %s: %s", context, type(exception).__name__)


@dataclass
class SyncReport:
    checked: int = 0
    deactivated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error: str = ""  # the directory could not be searched: the accounts not checked yet were left as they are


def _connect(config) -> ldap.ldapobject.LDAPObject:
    conn = ldap.initialize(config.AUTH_LDAP_SERVER_URI)
    for option, value in config.AUTH_LDAP_CONNECTION_OPTIONS.items():
        conn.set_option(option, value)
    if config.AUTH_LDAP_START_TLS:
        conn.start_tls_s()
    conn.simple_bind_s(config.AUTH_LDAP_BIND_DN, config.AUTH_LDAP_BIND_PASSWORD)
    return conn


def _in_directory(conn, search, username: str) -> bool:
    """Whether the user search finds ``username`` (raises ``ldap.LDAPError``: django-auth-ldap's own search
    takes an error for "no such user", which must never deactivate anyone)."""
    filterstr = search.filterstr % {"user": ldap.filter.escape_filter_chars(username)}
    entries = conn.search_s(search.base_dn, search.scope, filterstr, ["1.1"])
    return any(dn for dn, _attrs in entries)  # referrals come back without a DN


def ldap_sync() -> SyncReport:
    """Bring every active directory account (``DirectoryAccount``) up to date with the directory, as a login
    would: groups mirrored (m2m signals revoke the credentials a lost group gave), staff/superuser flags,
    names. An account the user search no longer finds is deactivated (``access.signals.user_saved`` revokes
    its credentials; its API tokens stop working). When the directory cannot be searched, the run stops and
    changes nothing more: an outage never deactivates anyone. A deactivated account is never reactivated
    here (an admin may have done it)."""
    from django.conf import settings

    from portal import audit
    from portal.models import DirectoryAccount

    report = SyncReport()
    if not getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
        report.error = "LDAP is not configured (LDAP_SERVER_URI)"
        return report
    try:
        conn = _connect(settings)
    except ldap.LDAPError as exc:
        report.error = f"the directory cannot be searched: {type(exc).__name__}"
        logger.warning("LDAP sync: %s", report.error)
        return report
    backend = LDAPBackend()
    try:
        accounts = DirectoryAccount.objects.filter(user__is_active=True).select_related("user").order_by("pk")
        for account in accounts:
            user = account.user
            username = user.get_username()
            try:
                present = _in_directory(conn, settings.AUTH_LDAP_USER_SEARCH, username)
            except ldap.LDAPError as exc:
                report.error = f"the directory cannot be searched: {type(exc).__name__}"
                logger.warning("LDAP sync stopped at %s: %s", username, report.error)
                break
            report.checked += 1
            if not present:
                user.is_active = False
                user.save(update_fields=["is_active"])
                audit.record(user, "action", message=f"deactivated: {account.dn} is no longer in the directory")
                logger.warning("LDAP sync: %s is no longer in the directory: account deactivated", username)
                report.deactivated.append(username)
            elif backend.populate_user(username) is None:  # an error half-way (logged by django-auth-ldap)
                report.failed.append(username)
    finally:
        conn.unbind_s()
    return report
