"""The periodic tasks (celery beat's ``CELERY_BEAT_SCHEDULE``) and how each last ended (``PeriodicRun``): the
worker records every run (``portal.celery``'s signals), ``/metrics`` exports the age of the last success."""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.utils import timezone

logger = logging.getLogger(__name__)


def beat_intervals() -> dict[str, float]:
    """Each periodic task's name → how often beat runs it (seconds; the shortest, should two entries run it)."""
    intervals: dict[str, float] = {}
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        intervals[entry["task"]] = min(float(entry["schedule"]), intervals.get(entry["task"], math.inf))
    return intervals


def run_record(task_name: str, *, error: str | None) -> None:
    """A run of ``task_name`` ended, well (``error`` None) or not; nothing for a task beat does not run. Never
    raises: the task itself is done, a database that cannot take the record is logged."""
    if task_name not in beat_intervals():
        return
    from portal.models import PeriodicRun

    now = timezone.now()
    fields = {"last_success_at": now} if error is None else {"last_failure_at": now, "last_error": error[:2000]}
    try:
        if not PeriodicRun.objects.filter(task=task_name).update(**fields):
            PeriodicRun.objects.get_or_create(task=task_name, defaults=fields)
    except Exception:  # noqa: BLE001 - only the record is lost
        logger.exception("could not record the run of periodic task %s", task_name)
