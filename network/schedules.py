"""Celery beat entries of the network app, importable from settings (no Django models imported here).

In ``portal/settings.py``::

    from network.schedules import beat_schedule
    CELERY_BEAT_SCHEDULE.update(beat_schedule(RECONCILE_INTERVAL))
"""

from __future__ import annotations

from portal.schedules import every


def beat_schedule(reconcile_interval: int) -> dict:
    """The reconciler, and the retry of rollbacks that kept their VLAN, every ``reconcile_interval`` seconds;
    a run that waited longer than one interval (a minute at least) in the queue is dropped (the next one is due
    anyway)."""
    return {
        "network-reconcile": every("network.reconcile", reconcile_interval),
        "network-retry-rollbacks": every("network.retry_rollbacks", reconcile_interval),
    }
