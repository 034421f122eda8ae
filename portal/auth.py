"""Identity from LDAP (django-auth-ldap over python-ldap). The only module that imports ``ldap``.

Users and their groups come from the directory (groups are mirrored into Django groups, which the
``clusters`` app maps to cluster membership); staff and superuser flags follow configured LDAP groups. A
local Django superuser keeps working as break-glass when the directory is down. A directory that cannot be
reached is reported to the person logging in as such, not as a wrong password.
"""

from __future__ import annotations

import logging

import ldap
from django.core.exceptions import ImproperlyConfigured
from django_auth_ldap.config import GroupOfNamesType, LDAPGroupQuery, LDAPSearch, PosixGroupType

from portal.env import env_bool, env_float, env_str

logger = logging.getLogger(__name__)

LDAP_UNAVAILABLE_MESSAGE = (
    "The directory service (LDAP) cannot be reached, so LDAP accounts cannot log in right now. "
    "Please try again in a few minutes; if it persists, contact the operators."
)

_GROUP_TYPES = {"posix": PosixGroupType, "groupofnames": GroupOfNamesType}


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
    """Called from ``PortalConfig.ready``: remember a directory outage on the request for the login form."""
    from django_auth_ldap.backend import ldap_error

    ldap_error.connect(_on_ldap_error, dispatch_uid="portal-ldap-error")


def _on_ldap_error(sender, context, user, request=None, exception=None, **kwargs) -> None:
    if isinstance(exception, (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR)):
        logger.warning("LDAP unavailable during %s: %s", context, type(exception).__name__)
        if request is not None:
            request.ldap_unavailable = True
    else:
        logger.warning("LDAP error during %s: %s", context, type(exception).__name__)
