"""What the workflows' error callbacks share: the failure as a person reads it, and where they run.

Celery runs an error callback that takes ``(request, exc, traceback, …)`` in the worker whose task failed: a
host's agent too, whose database role may not write the portal's tables (``network.agentdb``). There the
callback would fail with "permission denied" and the workflow's failure would go unrecorded: ``handed_on``
sends it on to the central worker instead, with the failure as text (``describe``)."""

from __future__ import annotations

import contextlib
import re

from celery.exceptions import ChordError
from celery.result import AsyncResult
from django.conf import settings

from network.errors import DeviceChangeFailed

_DEPENDENCY = re.compile(r"^Dependency (\S+) raised ")


def cause(exc):
    """The exception a workflow really failed with: a chord's header that failed reaches the errback as
    Celery's ``ChordError`` ("Dependency <task id> raised DeviceChangeFailed(...)"); the failed task's own
    exception, with its device, is in the result backend."""
    if isinstance(exc, ChordError):
        match = _DEPENDENCY.match(str(exc))
        if match:
            with contextlib.suppress(Exception):  # the backend may have lost it: the wrapper is all there is
                inner = AsyncResult(match[1]).result
                if isinstance(inner, BaseException):
                    return inner
    return exc


def describe(exc) -> str:
    """A failure as the scheduler reads it: "<device>: <the device's own message>" for a device that failed
    (``DeviceChangeFailed``), "<type>: <message>" otherwise; a failure already described (handed on by
    ``handed_on``) as it is."""
    if isinstance(exc, str):
        return exc
    exc = cause(exc)
    if exc is None:
        return "unknown error"
    if isinstance(exc, DeviceChangeFailed):
        return str(exc)
    device = getattr(exc, "device", None)
    message = getattr(exc, "message", None) or str(exc)
    text = f"{type(exc).__name__}: {message}"
    return f"{text} (device {device})" if device and device not in message else text


def handed_on(task, request, exc, *args) -> bool:
    """Called by Celery as an error callback in a host's agent (``request``: the failed task's): ``task`` is
    sent to the central worker's queue with the failure described, to run there as ``task(None, description,
    None, *args)``; True. Anywhere else (or run that way): False, the callback runs here."""
    if not settings.AGENT or request is None:
        return False
    task.apply_async((None, describe(exc), None, *args), queue=settings.CELERY_TASK_DEFAULT_QUEUE)
    return True
