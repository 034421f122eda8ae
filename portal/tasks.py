"""Portal-wide tasks."""

from celery import shared_task


@shared_task(name="portal.ping")
def ping(nonce: str) -> str:
    """Round trip through broker, worker and result backend (the embedded-default smoke test)."""
    return f"pong:{nonce}"


@shared_task(name="portal.ldap_sync")
def ldap_sync() -> dict:
    """Periodic: directory accounts follow the directory (groups, flags; gone → deactivated). Its changes are
    the sync's in the audit log ("ldap-sync"), told apart from other system work."""
    from dataclasses import asdict

    from portal.audit import audit_actor
    from portal.auth import ldap_sync as sync

    with audit_actor("ldap-sync"):
        return asdict(sync())
