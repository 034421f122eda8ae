"""Strict reading of the environment.

django-environ parses the common formats (database and cache URLs, lists); this module wraps it so that a
variable that is present but malformed is an ``ImproperlyConfigured`` naming the variable, never a silent
default (healthchecks' ``envbool`` lesson).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import environ
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_env = environ.Env()


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str | None = None, *, required: bool = False) -> str | None:
    value = _raw(name)
    if value is None or value == "":
        if required:
            raise ImproperlyConfigured(f"{name} must be set")
        return default
    return value


def env_str_or_empty(name: str, default: str) -> str:
    """``name`` as set — set and empty is "" (a feature turned off) — or ``default`` when it is not set at all."""
    value = _raw(name)
    return default if value is None else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use one of: 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):  # nan compares false with every bound, inf has none: a timeout of forever
        raise ImproperlyConfigured(f"{name}={value!r} is not a finite number")
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
    return number


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """One of ``choices``, as spelled there whatever the case typed (``LOG_LEVEL=debug`` is ``DEBUG``)."""
    value = _raw(name)
    if value is None or value == "":
        return default
    spelled = {choice.lower(): choice for choice in choices}
    if value.lower() not in spelled:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return spelled[value.lower()]


def env_fernet_key(name: str) -> str | None:
    """A Fernet key (32 url-safe base64-encoded bytes), checked at start-up: otherwise a wrong one passes
    ``manage.py check`` and fails only when a secret is first stored or read. The value never goes into the
    message (it is a key)."""
    from cryptography.fernet import Fernet

    value = env_str(name)
    if value is None:
        return None
    try:
        Fernet(value.encode())
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} is not a valid Fernet key (32 url-safe base64-encoded bytes; make one with: "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        ) from None
    return value


def without_password(url: str) -> str:
    """``url`` (or several joined by ``;``) fit to print: the password of each ``user:password@`` replaced by
    ``***`` (a user name alone is kept)."""

    def masked(match: re.Match) -> str:
        user, colon, _password = match.group(1).partition(":")
        return f"://{user}{':***' if colon else ''}@"

    return re.sub(r"://([^@;]*)@", masked, url)


def env_broker_url(name: str, default: str) -> str:
    """A kombu broker URL (``redis://…``, ``amqp://…``, ``filesystem://``; several for fail-over joined by
    ``;``): a scheme kombu does not know, or a bad port, is refused at start-up rather than by the first
    ``delay()`` (kombu takes a bare word for a host name). The message names only the scheme, as the URL may
    hold a password."""
    from kombu.transport import TRANSPORT_ALIASES
    from kombu.utils.url import parse_url

    value = _raw(name) or default
    for url in value.split(";"):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in TRANSPORT_ALIASES:
            shown = f"names the unknown transport {scheme!r}" if scheme else "is not a URL (scheme://…)"
            raise ImproperlyConfigured(
                f"{name} {shown}: use e.g. redis://host:6379/0, amqp://user:password@host:5672//, filesystem://"
            )
        try:
            parse_url(url)
        except ValueError:  # (its message may quote a piece of the password: "… as 'Xy7'")
            raise ImproperlyConfigured(
                f"{name} ({scheme}://…) is not a valid URL (a password with /, # or ? must be %-encoded)"
            ) from None
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine: ``localhost`` or a loopback address."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_networks(name: str) -> list:
    """Comma-separated IP addresses or networks (``10.0.0.5, 192.0.2.0/24``) as networks; empty: none."""
    import ipaddress

    networks = []
    for item in env_list(name, []):
        try:
            network = ipaddress.ip_network(item)  # strict: 10.0.0.5/8 is a typo, not the whole /8
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} is not an IP address or network") from None
        if network.prefixlen == 0:
            raise ImproperlyConfigured(f"{name}: {item!r} is every address")
        networks.append(network)
    return networks


def env_db(name: str, default: str) -> dict:
    value = _raw(name) or default
    scheme = value.split("://", 1)[0] if "://" in value else ""
    # PostgreSQL, or SQLite on one machine: the device changes are claimed with UPDATE … RETURNING and devices
    # locked with PostgreSQL's advisory locks (SQLite: file locks), which other databases do not have
    known = ("postgres", "postgresql", "sqlite")
    # (the messages name the variable and the scheme only: the URL may hold a password)
    if scheme not in known:
        raise ImproperlyConfigured(
            f"{name} ({scheme or 'no scheme'}://…) names an unsupported database scheme (use one of: "
            f"{', '.join(known)})"
        )
    try:
        config = _env.db_url_config(value)
    except Exception as exc:  # django-environ raises a bare exception type on unknown schemes
        raise ImproperlyConfigured(f"{name} ({scheme}://…) is not a database URL: {type(exc).__name__}") from None
    if not config.get("ENGINE"):
        raise ImproperlyConfigured(f"{name} ({scheme}://…) names an unsupported database scheme")
    return config
