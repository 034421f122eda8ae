"""Whether the portal can provision now — for schedulers (``GET /api/status/``), which hold their jobs instead of
burning walltime on a cluster that would wait out ``CLUSTER_PROVISION_TIMEOUT``.

- the broker: a created cluster's workflow is sent through it (unreachable: clusters stay requested);
- the workers: every queue the devices need has a worker consuming it now (asked by a broadcast of at most a
  second); a host whose agent, or whose site's switch worker, is missing cannot get a cluster's network;
- beat: ``clusters.expire`` (which sends what waited, tears expired clusters down) succeeded within three intervals.

``down``: nothing is provisioned (no broker, or no worker on the central queue); ``degraded``: some hosts cannot be
used, or beat is late; ``ok``. The answer is kept ``STATUS_CACHE_SECONDS`` (10 s) in the shared cache: schedulers
polling it do not each broadcast to the workers."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

logger = logging.getLogger(__name__)

CACHE_KEY = "virtcloud:provisioning-status"
STATUS_CACHE_SECONDS = 10
BEAT_TASK = "clusters.expire"


def provisioning_status(*, fresh: bool = False) -> dict:
    """The status (see the module), from the cache unless ``fresh`` or older than ``STATUS_CACHE_SECONDS``. When it
    is due, one request asks the workers (it takes a short claim in the cache); the others wait for its answer,
    up to two seconds, rather than each broadcasting."""
    if not fresh:
        cached = _cached()
        if cached is not None:
            return cached
        try:
            claimed = cache.add(CACHE_KEY + ":asking", 1, 5)
        except Exception:  # noqa: BLE001 - a cache that is down: ask now
            claimed = True
        if not claimed:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                time.sleep(0.05)
                cached = _cached()
                if cached is not None:
                    return cached
    status = _check()
    try:
        cache.set(CACHE_KEY, status, STATUS_CACHE_SECONDS)
        cache.delete(CACHE_KEY + ":asking")
    except Exception:  # noqa: BLE001
        logger.warning("status: the cache is unreachable; the next request asks the workers again")
    return status


def _cached() -> dict | None:
    try:
        return cache.get(CACHE_KEY)
    except Exception:  # noqa: BLE001 - a cache that is down: ask now
        return None


def _check() -> dict:
    from network.models import Host, Switch
    from network.selectors import queue_name
    from portal.broker import reachable
    from portal.celery import app, queue_consumers
    from portal.models import PeriodicRun
    from portal.periodic import beat_intervals

    now = timezone.now()
    central = settings.CELERY_TASK_DEFAULT_QUEUE
    broker = reachable(app)
    consumers: dict[str, list[str]] = {}
    if broker:
        try:
            consumers = queue_consumers(timeout=1.0)
        except Exception as exc:  # noqa: BLE001 - the broadcast failed: as if no worker answered
            logger.warning("status: could not ask the workers: %s", exc)
    site = ("site__name", "site__worker_queue")
    switches = list(Switch.objects.filter(enabled=True).select_related("site").only("name", "worker_queue", *site))
    hosts = list(Host.objects.filter(enabled=True).select_related("site").only("name", "agent_queue", *site))
    needed = {central} | {queue_name(d) for d in (*switches, *hosts)}
    missing = sorted(q for q in needed if q not in consumers)
    sites_missing = {s.site.name for s in switches if queue_name(s) in missing}
    blocked = sorted(h.name for h in hosts if queue_name(h) in missing or h.site.name in sites_missing)

    interval = beat_intervals().get(BEAT_TASK)
    last = PeriodicRun.objects.filter(task=BEAT_TASK).values_list("last_success_at", flat=True).first()
    age = (now - last).total_seconds() if last else None
    beat_ok = None if interval is None or age is None else age <= 3 * interval  # (None: not run yet, or no beat)

    if not broker or central in missing:
        state = "down"
    elif missing or beat_ok is False:
        state = "degraded"
    else:
        state = "ok"
    return {
        "status": state,
        "checked_at": now,
        "broker": broker,
        "queues_without_worker": missing,
        "hosts_unusable": blocked,
        "beat": {"ok": beat_ok, "last_success_age": age, "interval": interval},
    }
