"""Failed logins per account (``portal.models.LoginFailure``): ``LOGIN_FAILURES_MAX`` within
``LOGIN_FAILURE_WINDOW`` refuse the account's logins until the oldest leaves the window; a success clears
them. A soft limit: logins racing each other may each be counted after the check."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from portal.models import LoginFailure


def account_key(username: str) -> str:
    return (username or "").strip().lower()[: LoginFailure._meta.get_field("username").max_length]


def _window() -> timedelta:
    return timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)


def refused_for(name: str) -> str | None:
    """Why ``name``'s logins are refused now (None: they are not)."""
    now = timezone.now()
    recent = LoginFailure.objects.filter(username=name, at__gt=now - _window()).order_by("at")
    if not name or not settings.LOGIN_FAILURES_MAX or recent.count() < settings.LOGIN_FAILURES_MAX:
        return None
    oldest = recent.values_list("at", flat=True)[0]
    minutes = max(1, -(-int((oldest + _window() - now).total_seconds()) // 60))
    return f"Too many failed logins for this account: try again in {minutes} minute(s)."


def login_failed(name: str) -> None:
    """Count a failed login of ``name`` (and forget those that left the window)."""
    if name:
        now = timezone.now()
        LoginFailure.objects.filter(at__lte=now - _window()).delete()
        LoginFailure.objects.create(username=name, at=now)


def login_succeeded(name: str) -> None:
    LoginFailure.objects.filter(username=name).delete()
