"""Celery beat entries, importable from settings (no Django imported here)."""

from __future__ import annotations


def every(task: str, seconds: float) -> dict:
    """A beat entry: ``task`` every ``seconds``; a run still queued after that long (a minute at least: a queue
    busy for a few seconds, or clocks a little apart, drop nothing) is dropped — the next is due anyway, and a
    central worker down for an hour does not find hundreds of stale runs ahead of the workflows."""
    return {"task": task, "schedule": float(seconds), "options": {"expires": max(float(seconds), 60.0)}}
