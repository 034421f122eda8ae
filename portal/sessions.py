"""The browsers signed in to an account (``portal.models.BrowserSession``): recorded at each login (password or
single sign-on), listed on the account's page, and signed out all but the current one on the holder's word or
when a lost device's credential is revoked. A session is ended in the session store itself (any engine with
keys: database, cache), so the browser is signed out at its next request whatever kind of account it is."""

from __future__ import annotations

from importlib import import_module

from django.conf import settings
from django.utils import timezone

from portal import audit
from portal.models import BrowserSession

SESSIONS_LISTED = 20


def _store(key: str | None = None):
    return import_module(settings.SESSION_ENGINE).SessionStore(session_key=key)


def _browser(request) -> str:
    agent = request.META.get("HTTP_USER_AGENT", "")
    return "".join(ch for ch in agent if ch.isprintable())[: BrowserSession._meta.get_field("browser").max_length]


def session_started(sender, request, user, **kwargs) -> None:
    """``user_logged_in``: record the request's session (its key is the new one ``login`` cycled to)."""
    from portal.logins import client_address

    key = getattr(getattr(request, "session", None), "session_key", None)
    if not key:
        return
    BrowserSession.objects.update_or_create(
        session_key=key,
        defaults={
            "user": user,
            "signed_in_at": timezone.now(),
            "address": client_address(request),
            "browser": _browser(request),
        },
    )


def session_ended(sender, request, user, **kwargs) -> None:
    """``user_logged_out``: forget the request's session (``logout`` flushes it right after)."""
    key = getattr(getattr(request, "session", None), "session_key", None)
    if key:
        BrowserSession.objects.filter(session_key=key).delete()


def sessions_of(user) -> list[BrowserSession]:
    """``user``'s browsers signed in now, the latest first (at most ``SESSIONS_LISTED``); rows whose session has
    ended (logged out elsewhere, expired, the store flushed) are deleted on the way."""
    store, live, ended = _store(), [], []
    for row in BrowserSession.objects.filter(user=user).order_by("-signed_in_at", "-pk"):
        (live if store.exists(row.session_key) else ended).append(row)
    BrowserSession.objects.filter(pk__in=[row.pk for row in ended]).delete()
    return live[:SESSIONS_LISTED]


def stay_signed_in(request, account) -> None:
    """Keep the request's session signed in to ``account`` after ``sign_out_elsewhere`` changed its session hash
    (``update_session_auth_hash``, which gives the session a new key: its record follows)."""
    from django.contrib.auth import update_session_auth_hash

    before = request.session.session_key
    update_session_auth_hash(request, account)
    BrowserSession.objects.filter(session_key=before).update(session_key=request.session.session_key)


def sign_out_elsewhere(*, user, keep: str | None, why: str):
    """End ``user``'s other browser sessions: every recorded one but ``keep`` (the current session's key) is ended
    in the session store. Django also ties a session to the account's password hash: a directory account has no
    password here (an unusable one), so a new unusable one ends those no record names too (made before sessions
    were recorded) — the caller keeps its own with ``update_session_auth_hash`` and the account returned (None for
    an account with a password of its own, whose hash stays). Audited with ``why``."""
    from django.contrib.auth import get_user_model

    account = get_user_model().objects.get(pk=user.pk)
    others = list(BrowserSession.objects.filter(user=account).exclude(session_key=keep or ""))
    for row in others:
        _store(row.session_key).delete(row.session_key)
    BrowserSession.objects.filter(pk__in=[row.pk for row in others]).delete()
    audit.record(account, "action", message=f"signed out of every other session ({why})")
    if account.has_usable_password():
        return None
    account.set_unusable_password()
    account.save(update_fields=["password"])
    return account
