"""Portal-wide tasks."""

from celery import shared_task


@shared_task(name="portal.ping")
def ping(nonce: str) -> str:
    """Round trip through broker, worker and result backend (the embedded-default smoke test)."""
    return f"pong:{nonce}"
