"""Failed logins (``portal.models.LoginFailure``), counted per account and client address.

``LOGIN_FAILURES_MAX`` failures of one account from one address within ``LOGIN_FAILURE_WINDOW`` refuse that
account's logins from that address until the oldest leaves the window: whoever types a wrong password at
the break-glass superuser cannot lock the administrators out from their own machines. Guessing from many
addresses is held by a ceiling across all of them, ``LOGIN_FAILURES_ACCOUNT_MAX`` (10 × the per-address
limit by default), which refuses the account's logins from everywhere — but from the browsers its owner
signed in with before (a signed cookie, ``LOGIN_KNOWN_BROWSER_DAYS``, the "device cookie" of OWASP's
authentication cheat sheet): a guesser with many addresses (an IPv6 /48 is 65536 clients) cannot lock the
owner out of their own browser. Password spraying — a few guesses at each of many names — is held by
``LOGIN_FAILURES_CLIENT_MAX`` failures from one client whatever the names, which refuse that client's logins
(again but for its known browsers' accounts). A success clears the failures from its own address only: the
ones from elsewhere still count towards the ceiling. A soft limit: logins racing each other may each be counted
after the check.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.utils import timezone
from django.utils.crypto import salted_hmac

from portal import audit
from portal.models import LoginFailure

# how the audit log's entries of sign-ins begin (written here, listed by ``sign_ins``)
LOGGED_IN, FAILED = "logged in", "failed login"
SIGN_INS_SHOWN = 15
# the cookie that names the accounts signed in with in this browser (digests, not the names), how many it keeps
KNOWN_BROWSER_COOKIE, KNOWN_BROWSER_SALT, KNOWN_ACCOUNTS_KEPT = "portal_known", "portal.logins.known-browser", 5


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


def client_text(address: str | None) -> str:
    """``client_key`` as stored in ``LoginFailure.client`` ("": the address is unknown)."""
    key = client_key(address)
    return "" if key is None else str(key)


def _in_window(failures, now) -> list:
    """When each of ``failures`` (a LoginFailure queryset) in the window happened, oldest first."""
    return list(failures.filter(at__gt=now - _window()).order_by("at").values_list("at", flat=True))


def _wait(times: list, limit: int, now) -> int | None:
    """Minutes until fewer than ``limit`` of the failures at ``times`` (in the window, oldest first) are left in
    the window; None when there are fewer already (or ``limit`` is 0: no limit)."""
    if not limit:
        return None
    if len(times) < limit:
        return None
    freed = times[len(times) - limit]  # once this one has left, limit - 1 remain
    return max(1, -(-int((freed + _window() - now).total_seconds()) // 60))


def refused_for(name: str, address: str | None, *, known: bool = False) -> str | None:
    """Why ``name``'s logins from ``address`` are refused now (None: they are not). ``known``: the browser signed
    in to ``name`` before (``known_browser``): neither the ceiling across addresses nor the client's limit across
    names refuses it — only its own address's failures at this account do."""
    if not name:
        return None
    now, client = timezone.now(), client_text(address)
    mine = LoginFailure.objects.filter(username=name)
    minutes = _wait(_in_window(mine.filter(client=client), now), settings.LOGIN_FAILURES_MAX, now)
    if minutes is not None:
        return f"Too many failed logins for this account: try again in {minutes} minute(s)."
    if known:
        return None
    if client:
        everyone = LoginFailure.objects.filter(client=client)
        minutes = _wait(_in_window(everyone, now), settings.LOGIN_FAILURES_CLIENT_MAX, now)
        if minutes is not None:
            return f"Too many failed logins from this address: try again in {minutes} minute(s)."
    minutes = _wait(_in_window(mine, now), settings.LOGIN_FAILURES_ACCOUNT_MAX, now)
    if minutes is not None:
        return f"Too many failed logins for this account from many addresses: try again in {minutes} minute(s)."
    return None


def _account_digest(name: str) -> str:
    return salted_hmac(KNOWN_BROWSER_SALT, name, algorithm="sha256").hexdigest()[:32]


def _known_digests(request) -> list[str]:
    """The accounts the request's browser signed in to (``LOGIN_KNOWN_BROWSER_DAYS`` since the last), as digests;
    a cookie that is forged, too old or of another secret key names none."""
    raw = request.COOKIES.get(KNOWN_BROWSER_COOKIE) if request is not None else None
    days = settings.LOGIN_KNOWN_BROWSER_DAYS
    if not raw or not days:
        return []
    try:
        digests = signing.loads(raw, salt=KNOWN_BROWSER_SALT, max_age=days * 86400)
    except (signing.BadSignature, ValueError):
        return []
    return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []


def known_browser(request, name: str) -> bool:
    """Whether the request's browser signed in to the account ``name`` (``account_key``) with its password."""
    return bool(name) and _account_digest(name) in _known_digests(request)


def remember_browser(request, name: str) -> None:
    """Mark the response to ``request`` to tell its browser it is known to ``name`` (``known_browser_middleware``
    sets the cookie: the login form has no response)."""
    if settings.LOGIN_KNOWN_BROWSER_DAYS and name:
        request.known_browser_for = name


def known_browser_middleware(get_response):
    """Sets the known-browser cookie on the response to a successful password login (``remember_browser``): the
    account's digest is added to those the cookie names (the latest ``KNOWN_ACCOUNTS_KEPT``), and its age starts
    again."""

    def middleware(request):
        response = get_response(request)
        name = getattr(request, "known_browser_for", None)
        if name:
            digest = _account_digest(name)
            digests = [d for d in _known_digests(request) if d != digest][-(KNOWN_ACCOUNTS_KEPT - 1) :] + [digest]
            response.set_cookie(
                KNOWN_BROWSER_COOKIE,
                signing.dumps(digests, salt=KNOWN_BROWSER_SALT, compress=True),
                max_age=settings.LOGIN_KNOWN_BROWSER_DAYS * 86400,
                secure=settings.SESSION_COOKIE_SECURE,
                httponly=True,
                samesite="Lax",
            )
        return response

    return middleware


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
        now, client = timezone.now(), client_text(address)
        LoginFailure.objects.filter(at__lte=now - _window()).delete()
        LoginFailure.objects.create(username=name, address=address, client=client, at=now)
        count = len(_in_window(LoginFailure.objects.filter(username=name, client=client), now))
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
    """A success clears the failures of its client (``client_key``: an IPv6 address's /64 as one) at its account."""
    LoginFailure.objects.filter(username=name, client=client_text(address)).delete()


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
