"""E-mail to users (SMTP): the settings from one URL, and sending one message.

``EMAIL_URL`` names the relay: ``smtp://host[:25]`` (plain, a relay on the same machine or network),
``smtp+starttls://user:password@host[:587]``, ``smtps://user:password@host[:465]`` (TLS from the start), or
``console://`` (messages printed to the log: the demo). Empty: no e-mail is sent. A user name and password
over plain ``smtp://`` to another machine would cross the network in clear: refused unless DEBUG.
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

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
    if (user or password) and not (starttls or tls or debug or _loopback(parts.hostname)):
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def send(*, to: str, subject: str, body: str) -> bool:
    """Send one plain-text message to ``to``; whether it went (a relay that refuses or does not answer is
    logged, never raised: the caller's work is done either way and may try again later)."""
    from django.conf import settings
    from django.core.mail import EmailMessage

    if not settings.EMAIL_ENABLED or not to:
        return False
    try:
        EmailMessage(subject=subject, body=body, from_email=settings.DEFAULT_FROM_EMAIL, to=[to]).send()
    except Exception as exc:  # smtplib's errors, OSError (refused, timed out), TLS errors
        logger.warning("mail to %s (%s) not sent: %s: %s", to, subject, type(exc).__name__, exc)
        return False
    return True
