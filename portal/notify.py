"""Waiting for a row to change without polling the database: PostgreSQL ``LISTEN``/``NOTIFY``.

A trigger (a migration of the app that owns the table) sends ``pg_notify(channel, payload)`` when a row
changes; ``wait_for`` listens on the channel and re-checks only when a notification with the awaited payload
arrives, so a waiting request costs no queries while nothing happens. A notification is delivered when the
changing transaction commits, and the check runs after ``LISTEN``, so no change is missed between the two.

Where notifications cannot arrive, it polls: on SQLite (the embedded demo) and inside a transaction (a
``LISTEN`` takes effect only at commit, and a notification only between transactions).

A waiting request holds a web server thread and a database connection. At most ``LONG_POLL_SLOTS`` wait at
once in one process, the last free one kept for a caller that waits nowhere else yet; any more are answered at
once, as with ``timeout`` 0, and ``answered_early()`` says so (the API adds ``Retry-After: 1``: their callers
ask again a second later): a caller with many long polls open — a scheduler following many clusters, or one
that misbehaves — never takes every thread (a create or a teardown always finds one), nor every slot.
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

_held: dict[str, int] = {}  # long polls waiting now in this process, by holder (the caller)
_slots_lock = threading.Lock()
_thread = threading.local()  # .early: this thread's last wait found no free slot


def answered_early() -> bool:
    """Whether this thread's last ``wait_for`` answered without waiting because no slot was free for it."""
    return getattr(_thread, "early", False)


def slots_in_use() -> int:
    with _slots_lock:
        return sum(_held.values())


def _take_slot(holder: str) -> bool:
    """A long-poll slot for ``holder``, if one is free for it: the last free one only for a holder that waits
    nowhere else yet, so that one caller's many long polls never leave another caller none."""
    with _slots_lock:
        free = settings.LONG_POLL_SLOTS - sum(_held.values())
        if free <= 0 or (free == 1 and _held.get(holder)):
            return False
        _held[holder] = _held.get(holder, 0) + 1
        return True


def _give_back_slot(holder: str) -> None:
    with _slots_lock:
        _held[holder] -= 1
        if not _held[holder]:
            del _held[holder]


def _listening() -> bool:
    return connection.vendor == "postgresql" and not connection.in_atomic_block


def wait_for(
    check: Callable[[], T | None], *, channel: str, payload: str | None, timeout: float, holder: str = ""
) -> T | None:
    """Call ``check`` until it returns something other than None, at most ``timeout`` seconds; between calls,
    sleep until ``channel`` carries ``payload`` (any payload when None; or ``POLL_INTERVAL``, see the module
    docstring). Returns what ``check`` returned, or None when the time ran out (``check`` is always called at
    least once; without a long-poll slot free for ``holder`` — the caller — only once)."""
    _thread.early = False
    if timeout <= 0:
        return check()
    if not _take_slot(holder):
        _thread.early = True
        return check()  # no slot for this caller: answer now, it asks again
    try:
        return _wait(check, channel=channel, payload=payload, timeout=timeout)
    finally:
        _give_back_slot(holder)


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
