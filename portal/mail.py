"""E-mail to users (SMTP): the settings from one URL, and sending one message.

``EMAIL_URL`` names the relay: ``smtp://host[:25]`` (plain, a relay on the same machine or network),
``smtp+starttls://user:password@host[:587]``, ``smtps://user:password@host[:465]`` (TLS from the start), or
``console://`` (messages printed to the log: the demo). Empty: no e-mail is sent. A user name and password
over plain ``smtp://`` to another machine would cross the network in clear: refused unless DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

from portal.env import is_loopback

logger = logging.getLogger(__name__)

_SCHEMES = {"smtp": (25, False, False), "smtp+starttls": (587, True, False), "smtps": (465, False, True)}


def settings_from_url(url: str, *, debug: bool) -> dict:
    """Django's e-mail settings for ``EMAIL_URL`` (see the module's doc)."""
    if not url:
        return {"EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend", "EMAIL_ENABLED": False}
    parts = urlsplit(url)
    if parts.scheme == "console":
        return {"EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend", "EMAIL_ENABLED": True}
    if parts.scheme not in _SCHEMES:
        raise ImproperlyConfigured(
            f"EMAIL_URL: scheme {parts.scheme!r} is not one of smtp, smtp+starttls, smtps, console"
        )
    try:
        port = parts.port
    except ValueError:
        raise ImproperlyConfigured(f"EMAIL_URL: the port of {parts.hostname or '?'} is not a number 1-65535") from None
    if not parts.hostname:
        raise ImproperlyConfigured("EMAIL_URL: no host (e.g. smtp+starttls://user:password@mail.example.org)")
    default_port, starttls, tls = _SCHEMES[parts.scheme]
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if (user or password) and not (starttls or tls or debug or is_loopback(parts.hostname)):
        raise ImproperlyConfigured(
            "EMAIL_URL: a user name and password over plain smtp:// would cross the network in clear: use "
            "smtp+starttls:// or smtps://"
        )
    return {
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_ENABLED": True,
        "EMAIL_HOST": parts.hostname,
        "EMAIL_PORT": port or default_port,
        "EMAIL_HOST_USER": user,
        "EMAIL_HOST_PASSWORD": password,
        "EMAIL_USE_TLS": starttls,
        "EMAIL_USE_SSL": tls,
        "EMAIL_TIMEOUT": 10,
    }


#: seconds one periodic run may spend sending (the task's soft time limit is well above it)
BUDGET = 60.0


class Budget:
    """``while budget.left(): …`` — the run stops sending after ``BUDGET`` s; the rest waits for the next run."""

    def __init__(self, seconds: float = BUDGET):
        self.until = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.until


SENT, RETRY, FAILED = "sent", "retry", "failed"


def send(*, to: str, subject: str, body: str) -> str:
    """Send one plain-text message to ``to``: ``SENT``; ``FAILED`` when the relay refused this address or this
    message for good (a 5xx to RCPT or DATA, an address that is not one: trying again would only be refused
    again); ``RETRY`` otherwise (a 4xx, a relay that cannot be reached or refuses our login or sender: try
    again later). Logged, never raised; anything else (a task's time limit) goes through."""
    import smtplib

    from django.conf import settings
    from django.core.mail import EmailMessage

    if not settings.EMAIL_ENABLED or not to:
        return FAILED
    try:
        EmailMessage(subject=subject, body=body, from_email=settings.DEFAULT_FROM_EMAIL, to=[to]).send()
    except smtplib.SMTPRecipientsRefused as exc:  # the address: refused for good (5xx) or for now (4xx)
        codes = [code for code, _message in exc.recipients.values()]
        outcome, why = (RETRY if any(400 <= code < 500 for code in codes) else FAILED), f"refused: {exc.recipients}"
    except smtplib.SMTPDataError as exc:  # the message itself
        outcome, why = (RETRY if 400 <= exc.smtp_code < 500 else FAILED), f"{exc.smtp_code} {exc.smtp_error!r}"
    except (smtplib.SMTPException, OSError) as exc:
        # the relay, not this message: unreachable, timed out, TLS, our login (535) or sender (553) refused — a
        # relay set up wrong refuses every message alike, and each is tried again once it is put right
        outcome, why = RETRY, f"{type(exc).__name__}: {exc}"
        logger.error("mail: the relay %s refuses or cannot be reached: %s", settings.EMAIL_HOST, why)
    except ValueError as exc:  # an address or header Django refuses
        outcome, why = FAILED, f"{type(exc).__name__}: {exc}"
    else:
        return SENT
    then = "will retry" if outcome == RETRY else "given up"
    logger.warning("mail to %s (%s) not sent (%s): %s", to, subject, then, why)
    return outcome


def send_claimed(*, give_back: Callable[[], object], to: str, subject: str, body: str) -> bool:
    """Send a message the caller claimed first (a row marked as mailed, so that two runs never send it twice):
    ``give_back()`` undoes the claim when the relay cannot take it now, or the run is cut short (a task's time
    limit), and the next run tries again; a message sent, or refused for good, keeps it. Whether it was sent."""
    try:
        outcome = send(to=to, subject=subject, body=body)
    except BaseException:
        give_back()
        raise
    if outcome == RETRY:
        give_back()
    return outcome == SENT
