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


RECORDED = "portal.sessions.recorded"  # the session key its record was made for, kept in the session itself


def _details(request) -> dict:
    from portal.logins import client_address

    return {"address": client_address(request), "browser": _browser(request)}


def session_started(sender, request, user, **kwargs) -> None:
    """``user_logged_in``: record the request's session. ``login`` may have flushed it (signing in over another
    account's session): it is saved now, to have its key."""
    session = getattr(request, "session", None)
    if session is None:
        return
    if not session.session_key:
        session.save()
    key = session.session_key
    if not key:
        return
    BrowserSession.objects.update_or_create(
        session_key=key, defaults={"user": user, "signed_in_at": timezone.now(), **_details(request)}
    )
    session[RECORDED] = key


def recording_middleware(get_response):
    """Every signed-in session is recorded, whatever made it or changed its key: a password changed (Django gives
    the session a new key), a session from before the records (its first request after the upgrade), a login the
    signal could not see. One comparison per request (the key its record was made for, kept in the session);
    a write only when they differ. Sessions without a record were not signed out by "sign out all other
    sessions"."""

    def middleware(request):
        session = getattr(request, "session", None)
        user = getattr(request, "user", None)
        key = getattr(session, "session_key", None)
        before = session.get(RECORDED) if key else None
        if key and before != key and user is not None and user.is_authenticated:
            mine = BrowserSession.objects.filter(session_key=before, user=user)
            if not (before and mine.update(session_key=key)):  # (the record follows the key, or is made)
                BrowserSession.objects.get_or_create(session_key=key, defaults={"user": user, **_details(request)})
            session[RECORDED] = key
        return get_response(request)

    return middleware


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
