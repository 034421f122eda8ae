"""Portal-wide tasks."""

from celery import shared_task


@shared_task(name="portal.ping")
def ping(nonce: str) -> str:
    """Round trip through broker, worker and result backend (the embedded-default smoke test)."""
    return f"pong:{nonce}"


@shared_task(name="portal.ldap_sync")
def ldap_sync() -> dict:
    """Periodic: directory accounts follow the directory (groups, flags; gone → deactivated)."""
    from dataclasses import asdict

    from portal.auth import ldap_sync as sync

    return asdict(sync())
