"""Rate limits of the API's costly writes, per user (``API_THROTTLE_RATES``): a runaway script or scheduler gets
429 with ``Retry-After`` instead of keeping the CA, the database and the workers busy for everyone.

A view names its ``throttle_scope``; only unsafe methods count (reads, long polls and the gateways' pulls never
do). The counters live in Django's cache (``CACHE_URL``: Redis in production, shared by every web worker); when
the cache cannot be reached the request is let through — a limit is a protection, not a dependency.

Scopes: ``credentials`` (VPN profiles, SSH user certificates: a fresh key and a signature each, API and
browser), ``host-certificates`` (a node's boot script; a scheduler starting a large cluster sends one per node)
and ``cluster-writes`` (creating and changing clusters and images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from types import SimpleNamespace

from django.conf import settings
from django.contrib import messages
from django.http import HttpResponse
from rest_framework.permissions import SAFE_METHODS
from rest_framework.throttling import SimpleRateThrottle

logger = logging.getLogger(__name__)


class ScopedThrottle(SimpleRateThrottle):
    """Per user (per client address without one), with the rate of the view's ``throttle_scope`` read from the
    settings at each request; counted atomically in the cache (``add`` + ``incr``: one Redis ``INCR``), by a
    sliding window estimated from two fixed ones (this window's count and the previous one's, weighted by how
    much of it still falls within the last ``duration``). DRF's own throttle reads a history and writes it back:
    parallel requests each read the same history, and each got through — a limit multiplied by the concurrency
    of a runaway script, the case it is there for."""

    cache_format = "throttle:%(scope)s:%(ident)s"

    def __init__(self):  # (the rate depends on the view: set in allow_request)
        self._wait = None

    def allow_request(self, request, view) -> bool:
        self.scope = getattr(view, "throttle_scope", None)
        if not self.scope or request.method in SAFE_METHODS:
            return True
        self.rate = settings.API_THROTTLE_RATES.get(self.scope)
        if not self.rate:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        try:
            return self._counted(self.get_cache_key(request, view))
        except Exception as exc:  # noqa: BLE001 (the cache is down: let it through, say so)
            logger.warning("rate limit %s not checked: the cache failed: %s", self.scope, exc)
            return True

    def _counted(self, base: str) -> bool:
        now = self.timer()
        window, into = divmod(now, self.duration)
        key, previous_key = f"{base}:{int(window)}", f"{base}:{int(window) - 1}"
        self.cache.add(key, 0, timeout=2 * self.duration + 1)  # (no-op when it is there: then incr counts)
        current = self.cache.incr(key)
        previous = self.cache.get(previous_key) or 0
        share = 1 - into / self.duration  # of the previous window, what is still within the last ``duration``
        if previous * share + current <= self.num_requests:
            return True
        self.cache.decr(key)  # a refused request is not counted (as DRF's does not)
        current -= 1
        if current >= self.num_requests:  # this window alone is full: until it ends
            self._wait = self.duration - into
        else:  # until the previous window's weight has fallen enough for one more
            needed_share = (self.num_requests - current - 1) / previous if previous else 0
            self._wait = max(0.0, (share - max(needed_share, 0.0)) * self.duration)
        return False

    def wait(self):
        return self._wait

    def get_cache_key(self, request, view) -> str:
        user = getattr(request, "user", None)
        ident = f"user{user.pk}" if user is not None and user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


def refused(request, scope: str) -> int | None:
    """For a view outside DRF (a browser download): None when the request is within ``scope``'s rate (and counted),
    else the seconds to wait."""
    throttle = ScopedThrottle()
    if throttle.allow_request(request, SimpleNamespace(throttle_scope=scope)):
        return None
    return max(1, round(throttle.wait() or 1))


def limited(scope: str, what: str, page: Callable[[object], HttpResponse]):
    """A browser view counted in ``scope`` (unsafe requests only, as in the API): past its rate, ``page(request)``
    — the page the view belongs to, rendered with status 429 — with "Too many ``what``…" above it and
    ``Retry-After``; the view itself does nothing."""

    def decorate(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            wait = refused(request, scope)
            if wait is None:
                return view(request, *args, **kwargs)
            messages.error(request, f"Too many {what} in a short time: try again in {wait} seconds.")
            response = page(request)
            response["Retry-After"] = str(wait)
            return response

        return wrapper

    return decorate
