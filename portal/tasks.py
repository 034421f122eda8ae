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
        report = sync()
    if report.error:  # a failed run (the periodic tasks' metrics and admin page show it), not a success
        raise LdapSyncFailed(asdict(report))
    return asdict(report)


class LdapSyncFailed(RuntimeError):
    """The LDAP sync could not do its work (the directory unreachable, the service bind refused, more accounts
    gone than ``LDAP_SYNC_DEACTIVATE_MAX`` allows): the accounts it could not check or deactivate stay as they
    are, so the run is a failure for the periodic tasks' records and alerts. ``report``: what it did."""

    def __init__(self, report: dict):
        super().__init__(f"LDAP sync failed: {report.get('error')} (checked {report.get('checked')})")
        self.report = report


@shared_task(name="portal.prune_audit")
def prune_audit() -> int:
    """Periodic (hourly): the audit entries older than ``AUDIT_RETENTION`` days (0: none go). How many went."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from portal.models import AuditEntry
    from portal.pruning import delete_in_batches

    if not settings.AUDIT_RETENTION:
        return 0
    horizon = timezone.now() - timedelta(days=settings.AUDIT_RETENTION)
    return delete_in_batches(AuditEntry.objects.filter(timestamp__lt=horizon))


@shared_task(name="portal.prune_sessions")
def prune_sessions() -> int:
    """Periodic (hourly): the session store's expired sessions (Django's ``clearsessions``) and the records of
    browsers whose session is gone (``portal.sessions``). How many records went."""
    from importlib import import_module

    from django.conf import settings

    from portal.models import BrowserSession
    from portal.pruning import delete_in_batches

    engine = import_module(settings.SESSION_ENGINE)
    engine.SessionStore.clear_expired()
    model = getattr(engine.SessionStore, "get_model_class", None)
    if model is None:  # (a cache-only store: its sessions expire on their own, and sessions_of drops the rows)
        return 0
    return delete_in_batches(BrowserSession.objects.exclude(session_key__in=model().objects.values("session_key")))
