"""Failed logins (``portal.models.LoginFailure``), counted per account and client address.

``LOGIN_FAILURES_MAX`` failures of one account from one address within ``LOGIN_FAILURE_WINDOW`` refuse that
account's logins from that address until the oldest leaves the window: whoever types a wrong password at
the break-glass superuser cannot lock the administrators out from their own machines. Guessing from many
addresses is held by a ceiling across all of them, ``LOGIN_FAILURES_ACCOUNT_MAX`` (10 × the per-address
limit by default), which refuses the account's logins from everywhere. A success clears the failures from
its own address only: the ones from elsewhere still count towards the ceiling. A soft limit: logins racing
each other may each be counted after the check.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from portal import audit
from portal.models import LoginFailure

# how the audit log's entries of sign-ins begin (written here, listed by ``sign_ins``)
LOGGED_IN, FAILED = "logged in", "failed login"
SIGN_INS_SHOWN = 15


def account_key(username: str) -> str:
    return (username or "").strip().lower()[: LoginFailure._meta.get_field("username").max_length]


def client_address(request) -> str | None:
    """The address a login comes from. Behind the TLS proxy (``BEHIND_TLS_PROXY``) that is the last entry of
    ``X-Forwarded-For``, the one the proxy appended (nginx: ``$proxy_add_x_forwarded_for``): ``REMOTE_ADDR``
    is the proxy itself there, which would make every client one — but only for a request from the proxy
    (``TRUSTED_PROXIES``): one that reached the portal another way would name whatever address it likes. None when
    unknown (no request)."""
    if request is None:
        return None
    remote = request.META.get("REMOTE_ADDR") or None
    if from_trusted_proxy(request):
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            return remote
    return remote


def from_trusted_proxy(request) -> bool:
    """Whether ``request`` came through the TLS proxy (``BEHIND_TLS_PROXY``, from ``TRUSTED_PROXIES``): only then
    are the headers the proxy sets (``X-Forwarded-For``, ``X-Request-ID``) the proxy's, not the client's."""
    return bool(settings.BEHIND_TLS_PROXY) and _from_trusted_proxy(request.META.get("REMOTE_ADDR") or None)


def _from_trusted_proxy(remote: str | None) -> bool:
    try:
        peer = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    peer = getattr(peer, "ipv4_mapped", None) or peer
    return any(peer in network for network in settings.TRUSTED_PROXY_NETWORKS)


def _window() -> timedelta:
    return timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)


def client_key(address: str | None):
    """What counts as one client for the failures' limit: an IPv4 address, or an IPv6 address's /64 (one host
    is given a /64: counted by address it would have 2**64 times the tries, and would set off the account-wide
    ceiling, which locks the owner out from everywhere, alone)."""
    if not address:
        return None
    ip = ipaddress.ip_address(address)
    # an IPv4 client of a dual-stack listener (gunicorn on [::]) arrives as ::ffff:a.b.c.d: its IPv4 address
    # (as a /64 every IPv4 client in the world was one, and locked the others out)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ipaddress.ip_network((ip, 64), strict=False) if ip.version == 6 else ip


def _failures(name: str, now) -> list[tuple]:
    """(when, client key) of ``name``'s failures in the window, oldest first."""
    recent = LoginFailure.objects.filter(username=name, at__gt=now - _window()).order_by("at")
    return [(at, client_key(address)) for at, address in recent.values_list("at", "address")]


def _wait(times: list, limit: int, now) -> int | None:
    """Minutes until fewer than ``limit`` of the failures at ``times`` (in the window, oldest first) are left in
    the window; None when there are fewer already (or ``limit`` is 0: no limit)."""
    if not limit:
        return None
    if len(times) < limit:
        return None
    freed = times[len(times) - limit]  # once this one has left, limit - 1 remain
    return max(1, -(-int((freed + _window() - now).total_seconds()) // 60))


def refused_for(name: str, address: str | None) -> str | None:
    """Why ``name``'s logins from ``address`` are refused now (None: they are not)."""
    if not name:
        return None
    now = timezone.now()
    failures, client = _failures(name, now), client_key(address)
    minutes = _wait([at for at, key in failures if key == client], settings.LOGIN_FAILURES_MAX, now)
    if minutes is not None:
        return f"Too many failed logins for this account: try again in {minutes} minute(s)."
    minutes = _wait([at for at, _key in failures], settings.LOGIN_FAILURES_ACCOUNT_MAX, now)
    if minutes is not None:
        return f"Too many failed logins for this account from many addresses: try again in {minutes} minute(s)."
    return None


def local_account_named(name: str) -> bool:
    """Whether a local account (not the directory's) is named ``name``, in any case: one whose password the
    local accounts' backend checks while the directory is down."""
    field = get_user_model().USERNAME_FIELD
    accounts = get_user_model().objects.filter(**{f"{field}__iexact": name}, directory_account__isnull=True)
    return bool(name) and accounts.exists()


def login_failed(name: str, address: str | None) -> None:
    """Count a failed login of ``name`` from ``address`` (and forget those that left the window); an account of
    that name gets the first failure from an address in the window, and the one that reaches
    ``LOGIN_FAILURES_MAX``, in the audit log (the count leaves with the window; a guesser's flood writes two
    entries a window). Refused logins (too many failures) are not counted again, nor audited."""
    if name:
        now = timezone.now()
        LoginFailure.objects.filter(at__lte=now - _window()).delete()
        LoginFailure.objects.create(username=name, address=address, at=now)
        client = client_key(address)
        count = sum(1 for _at, key in _failures(name, now) if key == client)
        if count not in (1, settings.LOGIN_FAILURES_MAX):  # (a guesser's flood writes two entries a window)
            return
        model = get_user_model()
        # the account of that name: exactly, or the one account that name stands for in any case (two accounts
        # "Bob" and "bob": neither gets the other's failures)
        field = model.USERNAME_FIELD
        account = model.objects.filter(**{field: name}).first()
        if account is None:
            alike = list(model.objects.filter(**{f"{field}__iexact": name})[:2])
            account = alike[0] if len(alike) == 1 else None
        if account is not None:
            where = address or "an unknown address"
            locked = f" ({count} in a row: refused from there for the window)" if count > 1 else ""
            with audit.audit_actor(f"login from {where}"):
                audit.record(account, "action", message=f"{FAILED} from {where}{locked}")


def login_succeeded(name: str, address: str | None) -> None:
    """A success clears the failures of its client (``client_key``: an IPv6 address's /64 as one)."""
    client = client_key(address)
    rows = LoginFailure.objects.filter(username=name).values_list("pk", "address")
    LoginFailure.objects.filter(pk__in=[pk for pk, a in rows if client_key(a) == client]).delete()


def login_audit(user, request, how: str) -> None:
    """The audit log's entry of a login (``how``: "password", "single sign-on"), with the client's address."""
    address = client_address(request) or "an unknown address"
    with audit.audit_actor(user.get_username(), user=user):
        audit.record(user, "action", message=f"{LOGGED_IN} ({how}) from {address}")


def sign_ins(user) -> dict:
    """The account's latest sign-ins and, apart, its latest failed ones, from the audit log: its holder spots one
    that was not theirs — failures anyone can cause never push the sign-ins out of sight."""
    from django.contrib.contenttypes.models import ContentType

    from portal.models import AuditEntry

    kind = ContentType.objects.get_for_model(user._meta.model)
    mine = AuditEntry.objects.filter(content_type=kind, object_id=str(user.pk)).order_by("-timestamp", "-id")
    return {
        "ok": list(mine.filter(message__startswith=LOGGED_IN)[:SIGN_INS_SHOWN]),
        "failed": list(mine.filter(message__startswith=FAILED)[:SIGN_INS_SHOWN]),
    }
