"""Strict reading of the environment.

django-environ parses the common formats (database and cache URLs, lists); this module wraps it so that a
variable that is present but malformed is an ``ImproperlyConfigured`` naming the variable, never a silent
default (healthchecks' ``envbool`` lesson).
"""

from __future__ import annotations

import math
import os

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


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_db(name: str, default: str) -> dict:
    value = _raw(name) or default
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in environ.Env.DB_SCHEMES:
        known = ", ".join(
            sorted(s for s in environ.Env.DB_SCHEMES if s in ("postgres", "postgresql", "sqlite", "mysql"))
        )
        raise ImproperlyConfigured(f"{name}={value!r} names an unsupported database scheme (use one of: {known})")
    try:
        config = _env.db_url_config(value)
    except Exception as exc:  # django-environ raises a bare exception type on unknown schemes
        raise ImproperlyConfigured(f"{name}={value!r} is not a database URL: {exc}") from None
    if not config.get("ENGINE"):
        raise ImproperlyConfigured(f"{name}={value!r} names an unsupported database scheme")
    return config
