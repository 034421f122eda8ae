"""Celery tasks of the access service."""

from __future__ import annotations

from celery import shared_task

from access import services


@shared_task(name="access.sweep_credentials")
def sweep_credentials() -> int:
    """Periodic: revoke live credentials of clusters that ended without their revocation having run."""
    return services.credentials_sweep()
