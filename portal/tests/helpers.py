"""Shared by the test modules of every app: a browser session, and a transaction held open in another connection."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from django.test import Client


def logged_in(user) -> Client:
    """A browser (Django's test client) with ``user``'s session, as after a login."""
    client = Client()
    client.force_login(user)
    return client


@contextlib.contextmanager
def held_in_another_connection(work: Callable[[], object], *, hold: float = 1.0) -> Iterator[None]:
    """Run ``work()`` in a transaction of another connection (a thread), and the block while that transaction is
    still open: it commits ``hold`` seconds after ``work`` returned, so the block's statements meet its row locks
    (PostgreSQL; a test using it needs ``django_db(transaction=True)``). An error of ``work`` or of its commit is
    raised — at once when ``work`` failed, else after the block."""
    from django.db import connection, transaction

    ready, errors = threading.Event(), []

    def run() -> None:
        try:
            with transaction.atomic():
                work()
                ready.set()
                time.sleep(hold)
        except Exception as exc:  # noqa: BLE001 - raised in the test's thread
            errors.append(exc)
        finally:
            ready.set()
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10), "the other connection's work did not finish in 10 s"
        if errors:
            raise errors[0]
        yield
    finally:
        thread.join(20)
    if errors:
        raise errors[0]
