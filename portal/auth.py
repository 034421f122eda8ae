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
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, field

import ldap
import ldap.cidict
import ldap.filter
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django_auth_ldap.backend import LDAPBackend
from django_auth_ldap.config import GroupOfNamesType, LDAPGroupQuery, LDAPSearch, PosixGroupType

from portal.env import env_bool, env_float, env_str, env_str_or_empty, is_loopback

logger = logging.getLogger(__name__)

LDAP_UNAVAILABLE_MESSAGE = (
    "The directory service (LDAP) cannot be reached, so LDAP accounts cannot log in right now. "
    "Please try again in a few minutes; if it persists, contact the operators."
)

#: the longest group name a portal group takes (django.contrib.auth's Group.name)
GROUP_NAME_MAX = 150


class _Mirrorable:
    """A group type whose groups with a name longer than a portal group's are left out (logged): mirrored, the
    database refused the name and every login of the group's members was a 500."""

    def group_name_from_info(self, group_info):
        name = super().group_name_from_info(group_info)
        if name is not None and len(name) > GROUP_NAME_MAX:
            logger.warning("LDAP: group %s… has a name longer than %d characters: left out", name[:40], GROUP_NAME_MAX)
            return None
        return name


class _PosixGroupType(_Mirrorable, PosixGroupType):
    pass


class _GroupOfNamesType(_Mirrorable, GroupOfNamesType):
    pass


_GROUP_TYPES = {"posix": _PosixGroupType, "groupofnames": _GroupOfNamesType}


class ActiveLDAPBackend(LDAPBackend):
    """django-auth-ldap's backend, except that a deactivated account (``ldap_sync``: gone from the directory)
    loses its browser sessions at once, as Django's own backend does: django-auth-ldap's ``get_user`` does not
    look at ``is_active``, so such a session stayed signed in for up to the session's lifetime."""

    def get_user(self, user_id):
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None

    def authenticate(self, request, username=None, password=None, **kwargs):
        """What a login changes from the directory (flags, groups) is the directory's, not "anonymous"'s (the
        actor of a request nobody is logged in to yet), in the audit log."""
        from portal.audit import audit_actor

        with audit_actor("ldap-login"):
            return super().authenticate(request, username=username, password=password, **kwargs)

    def get_or_build_user(self, username, ldap_user):
        """A local account in use (a password of its own, admin rights, or API tokens: a break-glass
        superuser, a scheduler's API account) is never taken over by a directory entry of the same name:
        django-auth-ldap would fill it in from the directory (flags, groups, and from then on the sync's,
        which may deactivate it and stop its tokens), so the login is refused. An account made beforehand
        with none of these (to give it a quota, say) becomes the directory's, as always."""
        from django.contrib.auth import get_user_model

        try:
            user, built = super().get_or_build_user(username, ldap_user)
        except get_user_model().MultipleObjectsReturned:
            # accounts whose names differ only in case (django-auth-ldap looks the name up in any case): the one
            # the directory's entry is linked to, or none (it raised: every login of the name and the whole sync
            # stopped there)
            user, built = _linked_account(username, ldap_user.dn), False
            if user is None:
                logger.warning(
                    "login: directory entry %s refused: several accounts are named %s", ldap_user.dn, username
                )
                raise ldap_user.AuthenticationFailed(f"several accounts are named {username}") from None
        if not built and _local_account_in_use(user):
            logger.warning(
                "login: directory entry %s refused: a local account is named %s", ldap_user.dn, user.get_username()
            )
            raise ldap_user.AuthenticationFailed(f"{user.get_username()} is a local account, not the directory's")
        if not built and _another_entry(user, entry_uuid(ldap_user.attrs)):
            # a login of the entry that holds the name now (its password proves it): the name's former holder
            # keeps their account, renamed and inactive, and this entry gets a new one — built, never looked up
            # again (another account of the name in another case may be a local one)
            _retire(user, ldap_user.dn)
            user, built = self._build_new(username), True
        return user, built

    def _build_new(self, username: str):
        """A new account for ``username``, as django-auth-ldap builds one (unsaved: it fills it in and saves it)."""
        model = self.get_user_model()
        return model(**{model.USERNAME_FIELD: username.lower()})


def entry_uuid(attrs) -> str:
    """The identity an entry's attributes ``attrs`` carry (``LDAP_USER_UUID_ATTR``: entryUUID by default), as
    recorded: ``attribute:value``; "" when there is none."""
    attr = getattr(settings, "LDAP_USER_UUID_ATTR", "")
    values = attrs.get(attr, ()) if attr and attrs is not None else ()
    if values and isinstance(values[0], bytes):  # (python-ldap's raw search results)
        values = [v.decode("utf-8", "replace") for v in values]
    return f"{attr.lower()}:{str(values[0]).strip().lower()}"[:100] if values else ""


def _another_entry(user, now: str) -> bool:
    """Whether ``now`` (the identity of the entry that holds ``user``'s name now) is not the entry ``user`` was
    linked to: the name was given to someone else (the old entry deleted, a new one made with its uid). Unknown on
    either side, or recorded under another attribute (``LDAP_USER_UUID_ATTR`` changed since): the same."""
    from portal.models import DirectoryAccount

    linked = DirectoryAccount.objects.filter(user=user).values_list("entry_uuid", flat=True).first() or ""
    same_kind = linked.partition(":")[0] == now.partition(":")[0]
    return bool(linked and now and same_kind and linked != now)


def _retire(user, dn: str) -> None:
    """The account of a name's former holder: renamed (``name+former<id>``) and deactivated — its credentials revoked,
    its tokens and sessions ended — so that the entry now holding the name gets an account of its own, and
    nothing of the former holder's (clusters, groups, admin rights, credentials)."""
    from portal import audit

    old = user.get_username()
    suffix = f"+former{user.pk}"
    field = user._meta.get_field(user.USERNAME_FIELD)
    user.username = f"{old[: field.max_length - len(suffix)]}{suffix}"
    user.is_active = False
    user.save(update_fields=["username", "is_active"])
    audit.record(
        user,
        "update",
        {"username": [old, user.username], "is_active": [True, False]},
        message=f"the directory gave the name {old} to another entry ({dn}): this account is its former holder's",
    )
    logger.warning("LDAP: %s is another directory entry's now (%s): the former account is %s", old, dn, user)


def _linked_account(username: str, dn: str):
    """Of the accounts named ``username`` in any case, the one linked to the directory entry ``dn`` (one
    linked to the directory at all, else); None when that is not exactly one."""
    from django.contrib.auth import get_user_model

    same = get_user_model().objects.filter(username__iexact=username)
    for linked in (same.filter(directory_account__dn__iexact=dn), same.filter(directory_account__isnull=False)):
        found = list(linked[:2])
        if len(found) == 1:
            return found[0]
    return None


def _local_account_in_use(user) -> bool:
    from portal.backends import is_directory_account
    from portal.models import ApiToken

    if is_directory_account(user):
        return False
    return (
        user.has_usable_password()
        or user.is_staff
        or user.is_superuser
        or ApiToken.objects.filter(user_id=user.pk).exists()
    )


def ldap_settings(*, debug: bool = True) -> dict:
    """AUTH_LDAP_* settings from the environment; empty when LDAP_SERVER_URI is not set. In production
    (``debug`` off) a plain ``ldap://`` to another machine needs ``LDAP_START_TLS``: the portal binds as the
    user, so every password would cross the network in clear (``LDAP_ALLOW_PLAINTEXT`` allows it anyway)."""
    uri = env_str("LDAP_SERVER_URI")
    if not uri:
        return {}
    # a list for fail-over, as libldap reads it: separated by spaces or commas, schemes in any case
    parts = [part for part in re.split(r"[\s,]+", uri) if part]
    if not all(part.lower().startswith(("ldap://", "ldaps://", "ldapi://")) for part in parts):
        raise ImproperlyConfigured(f"LDAP_SERVER_URI={uri!r} must start with ldap://, ldaps:// or ldapi://")
    start_tls = env_bool("LDAP_START_TLS", False)
    if not debug and not start_tls and not env_bool("LDAP_ALLOW_PLAINTEXT", False):
        plain = [urllib.parse.urlsplit(part) for part in parts if part.lower().startswith("ldap://")]
        if not all(is_loopback(part.hostname or "") for part in plain):
            raise ImproperlyConfigured(
                f"LDAP_SERVER_URI={uri!r} sends the users' passwords in clear: use ldaps://, or LDAP_START_TLS=true "
                "(LDAP_ALLOW_PLAINTEXT=true if the network to the directory is trusted)"
            )
    user_base = env_str("LDAP_USER_BASE", required=True)
    group_base = env_str("LDAP_GROUP_BASE", required=True)
    group_kind = (env_str("LDAP_GROUP_TYPE", "posix") or "").lower()
    if group_kind not in _GROUP_TYPES:
        raise ImproperlyConfigured(f"LDAP_GROUP_TYPE={group_kind!r} must be one of: {', '.join(_GROUP_TYPES)}")
    object_class = "posixGroup" if group_kind == "posix" else "groupOfNames"
    timeout = env_float("LDAP_TIMEOUT", 3.0, minimum=0.1)
    # the attribute that names a directory entry for good (a uid may be given to someone else later)
    uuid_attr = env_str_or_empty("LDAP_USER_UUID_ATTR", "entryUUID")  # (set and empty: off)
    if uuid_attr and not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,63}", uuid_attr):
        raise ImproperlyConfigured(f"LDAP_USER_UUID_ATTR={uuid_attr!r} must be an attribute name, or empty")
    # an operational attribute (entryUUID) is only returned when asked for by name
    attrlist = ["*", uuid_attr] if uuid_attr else None
    user_filter = env_str("LDAP_USER_FILTER", "(uid=%(user)s)") or ""
    try:  # the name goes in as %(user)s: without it the filter finds everyone (every login and sync the first one)
        filled = user_filter % {"user": "x"}
    except (KeyError, ValueError, TypeError):
        filled = ""
    if "%(user)s" not in user_filter or filled.count("(") != filled.count(")") or not filled.startswith("("):
        raise ImproperlyConfigured(
            f"LDAP_USER_FILTER={user_filter!r} must be an LDAP filter that names the user as %(user)s, "
            "e.g. (uid=%(user)s)"
        )
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
        "AUTH_LDAP_START_TLS": start_tls,
        "AUTH_LDAP_USER_SEARCH": LDAPSearch(user_base, ldap.SCOPE_SUBTREE, user_filter, attrlist=attrlist),
        "AUTH_LDAP_USER_ATTRLIST": attrlist,
        "LDAP_USER_UUID_ATTR": uuid_attr,
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


_FLAGS = ("is_staff", "is_superuser")
#: the account's columns only the portal changes (django-auth-ldap writes its whole row back at each update)
_PORTALS = ("is_active", "password")


def _on_populate(sender, user, ldap_user, **kwargs) -> None:
    # sent before the user is saved (a new one has no primary key yet): recorded by _on_user_saved, with the
    # flags as they were (django-auth-ldap has already set them from the groups on this object)
    user._directory_dn = ldap_user.dn
    user._directory_uuid = entry_uuid(ldap_user.attrs)
    # what the directory holds may be longer than the account's columns (a name anyone may edit in FreeIPA):
    # cut to fit — PostgreSQL refused the save, failing the login and, for everyone after it, the sync
    for name in ("first_name", "last_name", "email"):
        limit = type(user)._meta.get_field(name).max_length
        value = getattr(user, name) or ""
        if limit and len(value) > limit:
            setattr(user, name, "" if name == "email" else value[:limit])  # (a cut address is no address)
    stored = type(user)._default_manager.filter(pk=user.pk).values(*_FLAGS, *_PORTALS).first() if user.pk else None
    user._directory_flags_before = {flag: stored[flag] for flag in _FLAGS} if stored else dict.fromkeys(_FLAGS, False)
    if stored:
        # django-auth-ldap saves the whole row it loaded before its directory searches (round trips): what the
        # portal changed meanwhile — a deactivation, "lost my laptop"'s new unusable password that ends the other
        # sessions — would be written back as it was; the directory decides neither
        for name in _PORTALS:
            setattr(user, name, stored[name])


def _on_user_saved(sender, instance, raw=False, **kwargs) -> None:
    dn = getattr(instance, "_directory_dn", None)
    if raw or not dn:
        return
    from django.utils import timezone

    from portal import audit
    from portal.models import DirectoryAccount

    del instance._directory_dn
    linked = {"dn": dn, "synced_at": timezone.now()}
    uuid = instance.__dict__.pop("_directory_uuid", "")
    if uuid:  # (recorded once known: an account linked before, the first time it is seen since)
        linked["entry_uuid"] = uuid
    DirectoryAccount.objects.update_or_create(user=instance, defaults=linked)
    # Admin rights given or taken by a directory group (at a login or by the sync) are in the audit log like
    # any other change of rights: the user model itself is not audited.
    before = instance.__dict__.pop("_directory_flags_before", {})
    changes = {flag: [was, getattr(instance, flag)] for flag, was in before.items() if was != getattr(instance, flag)}
    if changes:
        audit.record(instance, "update", changes, message=f"staff/superuser flags follow the directory groups of {dn}")


#: LDAP errors of the user's own bind that say something of the user (a password policy), not of the directory.
_USERS_OWN = (ldap.INVALID_CREDENTIALS, ldap.CONSTRAINT_VIOLATION, ldap.INAPPROPRIATE_AUTH)


def _on_ldap_error(sender, context, user, request=None, exception=None, **kwargs) -> None:
    """django-auth-ldap reports an LDAP error (a wrong user password is not one: it is a plain failed login).
    The directory is not usable for this login — down, or refusing the portal's own service bind (an expired
    ``LDAP_BIND_PASSWORD``), its searches or its group reads — unless the error came from the user's own bind
    and says something of the user: the login page says the directory is unavailable, and the try is not
    counted as a wrong password (``portal.forms``)."""
    down = isinstance(exception, (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR))
    if down or not (context == "authenticate" and isinstance(exception, _USERS_OWN)):
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
    left: int = 0  # accounts not reached within the run's time: the next run starts with them
    # accounts whose entry carries no LDAP_USER_UUID_ATTR (at most NO_IDENTITY_LISTED named): they follow their
    # names alone, so a new entry given one of their names would take the account over
    no_identity: int = 0
    no_identity_names: list[str] = field(default_factory=list)


NO_IDENTITY_LISTED = 20


def _connect(config) -> ldap.ldapobject.LDAPObject:
    conn = ldap.initialize(config.AUTH_LDAP_SERVER_URI)
    for option, value in config.AUTH_LDAP_CONNECTION_OPTIONS.items():
        conn.set_option(option, value)
    if config.AUTH_LDAP_START_TLS:
        conn.start_tls_s()
    conn.simple_bind_s(config.AUTH_LDAP_BIND_DN, config.AUTH_LDAP_BIND_PASSWORD)
    return conn


def _in_directory(conn, search, username: str) -> tuple[bool | None, str]:
    """Whether the user search finds ``username``, None when it cannot tell (only a referral to another server
    came back: the entry may well be there; or several entries answer to the name); and the identity of the
    entry found (``entry_uuid``, "" if none). Raises ``ldap.LDAPError`` (django-auth-ldap's own search takes an
    error for "no such user", which must never deactivate anyone)."""
    from django.conf import settings

    filterstr = search.filterstr % {"user": ldap.filter.escape_filter_chars(username)}
    attr = getattr(settings, "LDAP_USER_UUID_ATTR", "")
    entries = conn.search_s(search.base_dn, search.scope, filterstr, [attr] if attr else ["1.1"])
    found = [(dn, attrs) for dn, attrs in entries if dn]
    if len(found) > 1:
        # two entries answer to the name (a copy in another branch of the base): which one is the person, the
        # login cannot tell either (it admits none) — it cannot tell, never a reason to retire the account as
        # another entry's (the first one returned decided)
        logger.warning("LDAP: the user search finds %d entries for %s (%s, …)", len(found), username, found[0][0])
        return None, ""
    if found:
        return True, entry_uuid(ldap.cidict.cidict(found[0][1] or {}))
    return (None if entries else False), ""  # referrals come back without a DN


def _directory_shows_accounts(conn, search) -> bool:
    """Whether the user search finds anyone at all (its filter with ``*`` for the name): an answer without
    a single account (a replica being rebuilt, an ACL hiding the users from the bind account) says nothing
    about who left."""
    try:
        entries = conn.search_ext_s(
            search.base_dn, search.scope, search.filterstr % {"user": "*"}, ["1.1"], sizelimit=1
        )
    except ldap.SIZELIMIT_EXCEEDED:  # more than the one asked for
        return True
    return any(dn for dn, _attrs in entries)


def ldap_sync() -> SyncReport:
    """Bring every active directory account (``DirectoryAccount``) up to date with the directory, as a login
    would: groups mirrored (m2m signals revoke the credentials a lost group gave), staff/superuser flags,
    names. An account the user search no longer finds is deactivated (``access.signals.user_saved`` revokes
    its credentials; its API tokens stop working). When the directory cannot be searched, the run stops and
    changes nothing more: an outage never deactivates anyone. A deactivated account is never reactivated
    here (an admin may have done it)."""
    from django.conf import settings
    from django.db.models import F
    from django.utils import timezone

    from portal import audit
    from portal.models import DirectoryAccount

    report = SyncReport()
    if not getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
        report.error = "LDAP is not configured (LDAP_SERVER_URI)"
        return report
    try:
        conn = _connect(settings)
    except ldap.LDAPError as exc:
        report.error = _unsearchable(exc)
        logger.warning("LDAP sync: %s", report.error)
        return report
    backend = ActiveLDAPBackend()  # (its own rules: the local account of the same name never taken over)
    search = settings.AUTH_LDAP_USER_SEARCH
    gone = []
    reassigned: list[tuple] = []  # (account, the DN that holds its name now): another entry has its name
    deadline = time.monotonic() + settings.LDAP_SYNC_TIME_BUDGET
    try:
        # the least recently synced first: a run that runs out of time leaves the others for the next one,
        # which starts with them (never the same tail left out run after run)
        accounts = list(
            DirectoryAccount.objects.filter(user__is_active=True)
            .select_related("user")
            .order_by(F("synced_at").asc(nulls_first=True), "pk")
        )
        for position, account in enumerate(accounts):
            if report.checked and time.monotonic() > deadline:
                report.left = len(accounts) - position
                logger.info("LDAP sync: %d account(s) left for the next run (LDAP_SYNC_TIME_BUDGET)", report.left)
                break
            user = account.user
            username = user.get_username()
            present, identity = _in_directory(conn, search, username)
            report.checked += 1
            if present and not identity and getattr(settings, "LDAP_USER_UUID_ATTR", ""):
                report.no_identity += 1
                if len(report.no_identity_names) < NO_IDENTITY_LISTED:
                    report.no_identity_names.append(username)
            if present is None:
                report.failed.append(username)  # referred elsewhere: neither gone nor updated
            elif not present:
                gone.append(account)
            elif _another_entry(user, identity):  # its former holder left: as good as gone (the newcomer's
                reassigned.append(account)  # account is made at their login)
                present = False
            elif not _populated(backend, username):  # an error half-way: this account, the others go on
                report.failed.append(username)
                DirectoryAccount.objects.filter(pk=account.pk).update(synced_at=timezone.now())  # (its turn came)
            if present is not True:  # its turn has come (a referral, an account about to go): the others next
                DirectoryAccount.objects.filter(pk=account.pk).update(synced_at=timezone.now())
        if (gone or reassigned) and not report.error:
            report.error = _why_not_deactivate(conn, search, len(gone) + len(reassigned), report.checked)
        if report.no_identity:
            logger.warning(
                "LDAP sync: %d entr(ies) carry no %s (LDAP_USER_UUID_ATTR), e.g. %s: their accounts follow their names "
                "alone, and a new entry given one of those names would take its account over. Set "
                "LDAP_USER_UUID_ATTR to the attribute the directory has (entryUUID, nsUniqueId, objectGUID, "
                "ipaUniqueID), or to empty to say names are never reused",
                report.no_identity,
                settings.LDAP_USER_UUID_ATTR,
                ", ".join(report.no_identity_names[:3]),
            )
    except ldap.LDAPError as exc:  # the run stops here: nothing more changes
        report.error = _unsearchable(exc)
        logger.warning("LDAP sync stopped after %d account(s): %s", report.checked, report.error)
        for account in [*gone, *reassigned]:  # not deactivated: first in line again (not a whole rotation later)
            DirectoryAccount.objects.filter(pk=account.pk).update(synced_at=account.synced_at)
    finally:
        conn.unbind_s()
    if report.error:
        if gone or reassigned:
            logger.warning(
                "LDAP sync: %d account(s) not found, %d whose name another entry holds now: none deactivated: %s",
                len(gone),
                len(reassigned),
                report.error,
            )
        return report
    for account in reassigned:
        report.deactivated.append(account.user.get_username())  # (the name it had)
        _retire(account.user, account.dn)
    for account in gone:  # only after a whole run that could tell, and within bounds
        user = account.user
        user.is_active = False
        user.save(update_fields=["is_active"])
        audit.record(user, "action", message=f"deactivated: {account.dn} is no longer in the directory")
        logger.warning("LDAP sync: %s is no longer in the directory: account deactivated", user.get_username())
        report.deactivated.append(user.get_username())
    return report


class RelinkError(Exception):
    """``ldap_relink`` could not run: LDAP off, no identity attribute, an unknown name, the directory unreachable."""


@dataclass
class RelinkReport:
    relinked: int = 0
    unchanged: int = 0
    not_found: list[str] = field(default_factory=list)
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (account, identity before, identity now)


def ldap_relink(names: list[str] | None = None, *, dry_run: bool = False) -> RelinkReport:
    """Record, for the active directory accounts ``names`` (default: all), the identity of the entry that holds
    their name now (``LDAP_USER_UUID_ATTR``), as if linked afresh: after a directory rebuilt with new entry
    identities (``manage.py ldap_relink``). Audited per account; all or nothing (an error half-way relinks
    nobody); ``dry_run``: only says which would be. Raises ``RelinkError``."""
    from django.db import transaction

    with transaction.atomic():
        report = _relink(names, dry_run=dry_run)
        if dry_run:
            transaction.set_rollback(True)
    return report


def _relink(names: list[str] | None, *, dry_run: bool) -> RelinkReport:
    from django.conf import settings

    from portal import audit
    from portal.models import DirectoryAccount

    if not getattr(settings, "AUTH_LDAP_SERVER_URI", ""):
        raise RelinkError("LDAP is not configured (LDAP_SERVER_URI)")
    if not getattr(settings, "LDAP_USER_UUID_ATTR", ""):
        raise RelinkError("LDAP_USER_UUID_ATTR is empty: accounts follow their names alone, nothing to relink")
    accounts = DirectoryAccount.objects.filter(user__is_active=True).select_related("user").order_by("pk")
    if names:
        accounts = accounts.filter(user__username__in=names)
        missing = sorted(set(names) - {a.user.get_username() for a in accounts})
        if missing:
            raise RelinkError(f"no active directory account named {', '.join(missing)}")
    try:
        conn = _connect(settings)
    except ldap.LDAPError as exc:
        raise RelinkError(f"the directory cannot be reached: {type(exc).__name__}") from None
    report = RelinkReport()
    try:
        for account in accounts:
            present, identity = _in_directory(conn, settings.AUTH_LDAP_USER_SEARCH, account.user.get_username())
            if not present or not identity:
                report.not_found.append(account.user.get_username())
            elif identity == account.entry_uuid:
                report.unchanged += 1
            else:
                before, account.entry_uuid = account.entry_uuid, identity
                report.changes.append((account.user.get_username(), before, identity))
                report.relinked += 1
                if not dry_run:
                    account.save(update_fields=["entry_uuid"])
                    changes = {"entry_uuid": [before, identity]}
                    audit.record(account, "update", changes, message="relinked (ldap_relink)")
    except ldap.LDAPError as exc:
        raise RelinkError(f"the directory cannot be searched: {type(exc).__name__}") from None
    finally:
        conn.unbind_s()
    return report


def _populated(backend, username: str) -> bool:
    """Bring one account up to date from the directory (django-auth-ldap's ``populate_user``, in a savepoint);
    whether it was. An error but the directory's own (a database one: a group name longer than Django's; any
    other django-auth-ldap lets through) fails this account only — it stopped the whole run, every run after
    it, and so every deactivation."""
    from django.db import transaction

    try:
        with transaction.atomic():
            return backend.populate_user(username) is not None  # (None: an error logged by django-auth-ldap)
    except ldap.LDAPError:
        raise  # the directory's: the run stops (``ldap_sync``)
    except Exception:  # noqa: BLE001 - any other: this account fails, said in the log, the sync goes on
        logger.exception("LDAP sync: %s could not be brought up to date", username)
        return False


def _unsearchable(exc: ldap.LDAPError) -> str:
    return f"the directory cannot be searched: {type(exc).__name__}"


def _why_not_deactivate(conn, search, gone: int, checked: int) -> str:
    """Why the accounts a run did not find must not be deactivated now ("" when they may): the directory
    shows no account at all, or more of them went than ``LDAP_SYNC_DEACTIVATE_MAX`` (a fraction of the
    accounts checked; at least 5 may always go) — a directory that lost its users by accident must not
    take every account, credential and token with it; an administrator can still deactivate them."""
    from django.conf import settings

    if not _directory_shows_accounts(conn, search):
        return f"the directory shows no account under {search.base_dn}: nobody was deactivated"
    limit = max(5, math.ceil(settings.LDAP_SYNC_DEACTIVATE_MAX * checked))
    if gone > limit:
        return (
            f"{gone} of {checked} accounts were not found (or their names are other entries' now, by "
            f"LDAP_USER_UUID_ATTR), more than LDAP_SYNC_DEACTIVATE_MAX allows ({limit}): nobody was deactivated "
            "(a directory rebuilt with new entry identities: `manage.py ldap_relink`)"
        )
    return ""
