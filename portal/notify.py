"""Waiting for a row to change without polling the database: PostgreSQL ``LISTEN``/``NOTIFY``.

A trigger (a migration of the app that owns the table) sends ``pg_notify(channel, payload)`` when a row
changes; ``wait_for`` listens on the channel and re-checks only when a notification with the awaited payload
arrives, so a waiting request costs no queries while nothing happens. A notification is delivered when the
changing transaction commits, and the check runs after ``LISTEN``, so no change is missed between the two.

Where notifications cannot arrive, it polls: on SQLite (the embedded demo) and inside a transaction (a
``LISTEN`` takes effect only at commit, and a notification only between transactions).

A waiting request holds a web server thread and a database connection. At most ``LONG_POLL_SLOTS`` wait at
once in one process; any more are answered at once, as with ``timeout`` 0, and ``answered_early()`` says so (the
API adds ``Retry-After: 1``: their callers ask again a second later): a caller with many long polls open — a
scheduler following many clusters, or one that misbehaves — never takes every thread, and a create or a
teardown always finds one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import connection

T = TypeVar("T")

POLL_INTERVAL = 0.1  # seconds between checks where notifications cannot arrive

_slots: tuple[int, threading.BoundedSemaphore] | None = None  # (LONG_POLL_SLOTS, its semaphore) of this process
_slots_lock = threading.Lock()
_thread = threading.local()  # .early: this thread's last wait found no free slot


def answered_early() -> bool:
    """Whether this thread's last ``wait_for`` answered without waiting because every slot was taken."""
    return getattr(_thread, "early", False)


def _long_poll_slots() -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None or _slots[0] != settings.LONG_POLL_SLOTS:  # (a changed setting: the tests)
            _slots = (settings.LONG_POLL_SLOTS, threading.BoundedSemaphore(settings.LONG_POLL_SLOTS))
        return _slots[1]


def _listening() -> bool:
    return connection.vendor == "postgresql" and not connection.in_atomic_block


def wait_for(check: Callable[[], T | None], *, channel: str, payload: str | None, timeout: float) -> T | None:
    """Call ``check`` until it returns something other than None, at most ``timeout`` seconds; between calls,
    sleep until ``channel`` carries ``payload`` (any payload when None; or ``POLL_INTERVAL``, see the module
    docstring). Returns what ``check`` returned, or None when the time ran out (``check`` is always called at
    least once; without a free long-poll slot, only once)."""
    _thread.early = False
    if timeout <= 0:
        return check()
    slots = _long_poll_slots()
    if not slots.acquire(blocking=False):
        _thread.early = True
        return check()  # every slot waits already: answer now, the caller asks again
    try:
        return _wait(check, channel=channel, payload=payload, timeout=timeout)
    finally:
        slots.release()


def _wait(check: Callable[[], T | None], *, channel: str, payload: str | None, timeout: float) -> T | None:
    deadline = time.monotonic() + timeout
    listening = _listening()
    quoted = connection.ops.quote_name(channel)
    if listening:
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {quoted}")
    try:
        while True:
            found = check()
            remaining = deadline - time.monotonic()
            if found is not None or remaining <= 0:
                return found
            if not listening:
                time.sleep(min(POLL_INTERVAL, remaining))
                continue
            for note in connection.connection.notifies(timeout=remaining):
                if note.channel == channel and (payload is None or note.payload == payload):
                    break
    finally:
        if listening:
            with connection.cursor() as cursor:
                cursor.execute(f"UNLISTEN {quoted}")
