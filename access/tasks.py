"""Celery tasks of the access service."""

from __future__ import annotations

from celery import shared_task

from access import services


@shared_task(name="access.sweep_credentials")
def sweep_credentials() -> int:
    """Periodic: revoke live credentials of clusters that ended without their revocation having run."""
    return services.credentials_sweep()


@shared_task(name="access.mail_expiring")
def mail_expiring() -> list[int]:
    """Periodic (hourly): an e-mail to the holder of each publish profile that ends within a week while its
    clusters live on (nothing without ``EMAIL_URL``)."""
    return services.credentials_mail_expiring()
