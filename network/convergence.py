"""Making one device match the desired state, under a lock per device, with every operation recorded.

``converge_change(change_id)`` is what a Celery task calls. It takes the device's lock, then claims *every*
pending change of that device (a conditional UPDATE: pending → running, one batch id), computes the
device's whole desired state at that moment, and applies it in one session: several segments' changes for
one switch cost one session and one commit, and a later task for an already-applied change finds its row
settled (networking-generic-switch's lesson: switches rate-limit sessions and lock their config database).
Claiming before computing matters: a change recorded after our claim is applied by its own task later.

The lock is a PostgreSQL session advisory lock (released by the server when the worker's connection dies,
so a killed worker never leaves a switch locked) or, on SQLite (one machine), an ``flock`` on a file under
``DATA_DIR/locks`` (released by the kernel when the process dies). Holding the lock also means any change
of the device still marked "running" belongs to a worker that died: it is claimed again (acks_late
redelivery) — converging is idempotent, so redoing it is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection
from django.db.models import F
from django.utils import timezone

from network import selectors, specs
from network.drivers import DeviceError, PermanentDeviceError, TemporaryDeviceError, host_session, switch_session
from network.errors import DeviceChangeFailed
from network.models import DeviceChange, DeviceKind, Drift, Host, Segment, Switch
from network.vlanranges import format_ranges

Status = DeviceChange.Status

# Advisory lock namespaces (first int4 of pg_advisory_lock(int4, int4)); arbitrary but fixed.
_LOCK_SPACES = {DeviceKind.SWITCH: 0x56430001, DeviceKind.HOST: 0x56430002, "segment": 0x56430003}


# --- locks ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def device_lock(kind: str, pk: int, *, wait: float | None = None) -> Iterator[bool]:
    """Hold the lock of one device (or segment). Yields True when held; False when ``wait`` seconds passed
    (``wait=0``: do not wait). ``None`` waits up to the task time limit."""
    if wait is None:
        wait = float(settings.CELERY_TASK_SOFT_TIME_LIMIT)
    if connection.vendor == "postgresql":
        lock = _pg_lock
    else:
        lock = _file_lock
    with lock(_LOCK_SPACES[kind], int(pk), wait) as held:
        yield held


@contextlib.contextmanager
def _pg_lock(space: int, key: int, wait: float) -> Iterator[bool]:
    deadline = time.monotonic() + wait
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [space, key])
            if cursor.fetchone()[0]:
                break
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.02)
    try:
        yield True
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [space, key])


@contextlib.contextmanager
def _file_lock(space: int, key: int, wait: float) -> Iterator[bool]:
    folder = settings.DATA_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{space:x}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.02)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- one device -------------------------------------------------------------------------------------------------


def _device(kind: str, pk: int) -> Switch | Host | None:
    model = Switch if kind == DeviceKind.SWITCH else Host
    return model.objects.filter(pk=pk).first()


def _device_filter(kind: str, device) -> dict:
    return {"switch": device} if kind == DeviceKind.SWITCH else {"host": device}


def change_create(*, device: Switch | Host, cause: str, segment: Segment | None = None) -> DeviceChange:
    """Record a pending change of ``device`` (the work a converge task will claim)."""
    kind = DeviceKind.SWITCH if isinstance(device, Switch) else DeviceKind.HOST
    return DeviceChange.objects.create(
        kind=kind, device=device.name, segment=segment, cause=cause[:200], **_device_filter(kind, device)
    )


def changes_create(*, devices: list[Switch | Host], cause: str, segment: Segment | None = None) -> list[int]:
    """``change_create`` for several devices in one INSERT; the ids, in the order of ``devices``."""
    rows = []
    for device in devices:
        kind = DeviceKind.SWITCH if isinstance(device, Switch) else DeviceKind.HOST
        rows.append(
            DeviceChange(
                kind=kind, device=device.name, segment=segment, cause=cause[:200], **_device_filter(kind, device)
            )
        )
    return [row.pk for row in DeviceChange.objects.bulk_create(rows)]


def _settled(change: DeviceChange) -> DeviceChange:
    if change.status == Status.FAILED:
        raise DeviceChangeFailed(change.device, change.error or "failed", change.pk)
    return change


def converge_change(change_id: int) -> DeviceChange:
    """Apply change ``change_id`` (and every other pending change of its device) and return it settled.

    Raises ``TemporaryDeviceError`` when the device may work on a retry (the change is pending again) and
    ``DeviceChangeFailed`` when it failed for good (the change is failed, with the device's message).

    Queries are pinned by a test (this runs once per device per workflow): the change with its device in
    one query, the lock, the claim, the desired state, the settlement, the unlock and the final read."""
    change = DeviceChange.objects.select_related("switch", "host").get(pk=change_id)
    if change.status in DeviceChange.FINAL:
        return _settled(change)
    device = change.switch if change.kind == DeviceKind.SWITCH else change.host
    if device is None:
        return change_fail(change_id, "the device no longer exists in the inventory")
    with device_lock(change.kind, device.pk) as held:
        if not held:
            raise TemporaryDeviceError(device.name, "another operation holds the device lock")
        # No re-read of the change here: the claim takes every pending change of the device; when it takes
        # none, ours was settled by another task's batch while we waited, and there is nothing to do.
        apply_locked(change.kind, device, skip_if_none=True)
    return _settled(DeviceChange.objects.get(pk=change_id))


def change_fail(change_id: int, message: str) -> DeviceChange:
    """Give up on a change (its retries are spent): failed, with the last message."""
    now = timezone.now()
    DeviceChange.objects.filter(pk=change_id).exclude(status__in=DeviceChange.FINAL).update(
        status=Status.FAILED, error=message, finished_at=now
    )
    return _settled(DeviceChange.objects.get(pk=change_id))


@dataclass
class Applied:
    """The outcome of one device session."""

    batch: uuid.UUID
    changes: int
    status: str
    diff: str = ""
    error: str = ""
    desired: dict = field(default_factory=dict)


def apply_locked(kind: str, device: Switch | Host, *, session=None, skip_if_none: bool = False) -> Applied:
    """With the device's lock held: claim its pending changes, converge it to the desired state, settle
    the claimed changes. ``session`` reuses an open driver session (the reconciler's); ``skip_if_none``:
    when no change was pending, do not open a session at all."""
    batch = uuid.uuid4()
    now = timezone.now()
    claimed = DeviceChange.objects.filter(
        status__in=[Status.PENDING, Status.RUNNING], **_device_filter(kind, device)
    ).update(status=Status.RUNNING, batch=batch, started_at=now, attempts=F("attempts") + 1, error="")
    if skip_if_none and not claimed:
        return Applied(batch, 0, Status.NOOP)
    rows = DeviceChange.objects.filter(batch=batch)

    if not device.enabled:
        rows.update(status=Status.NOOP, error="device disabled: not touched", finished_at=timezone.now())
        return Applied(batch, claimed, Status.NOOP, error="device disabled")
    try:
        if kind == DeviceKind.SWITCH:
            desired = selectors.switch_desired([device.pk])[device.pk]
            result = _converge_switch(device, desired, session)
        else:
            desired = selectors.host_desired([device.pk])[device.pk]
            result = _converge_host(device, desired, session)
    except TemporaryDeviceError as exc:
        # Back to pending: the retry (of this task or of another change's task) claims it again.
        rows.update(status=Status.PENDING, error=exc.message)
        raise
    except DeviceError as exc:
        rows.update(status=Status.FAILED, error=exc.message, finished_at=timezone.now())
        raise DeviceChangeFailed(device.name, exc.message) from exc
    except Exception as exc:  # a driver bug or the soft time limit: fail the change, never leave it running
        message = f"{type(exc).__name__}: {exc}"
        rows.update(status=Status.FAILED, error=message, finished_at=timezone.now())
        raise DeviceChangeFailed(device.name, message) from exc
    status = Status.OK if result.changed else Status.NOOP
    rows.update(status=status, diff=result.diff, finished_at=timezone.now())
    shown = desired if isinstance(desired, dict) else {device.name: desired}
    return Applied(batch, claimed, status, diff=result.diff, desired={k: sorted(v) for k, v in shown.items()})


def _converge_switch(switch: Switch, desired, session):
    if session is not None:
        return session.converge(desired)
    with switch_session(specs.switch_spec(switch)) as opened:
        return opened.converge(desired)


def _converge_host(host: Host, desired: frozenset[int], session):
    if session is None:
        with host_session(specs.host_spec(host)) as opened:
            result = opened.converge(desired)
    else:
        result = session.converge(desired)
    carried = frozenset().union(*result.after.values()) if result.after else frozenset()
    kept = carried - desired
    if kept:
        # The driver keeps a bridge that still has VM ports: the VMs must go first; retry later.
        raise TemporaryDeviceError(host.name, f"VLAN {format_ranges(kept)} kept: VM ports still attached")
    missing = desired - carried
    if missing:
        raise PermanentDeviceError(host.name, f"VLAN {format_ranges(missing)} missing after converge")
    return result


# --- dry run and drift ------------------------------------------------------------------------------------------


def _host_diff(current: frozenset[int], desired: frozenset[int]) -> str:
    lines = [f"+ vlan {vid}" for vid in sorted(desired - current)]
    lines += [f"- vlan {vid}" for vid in sorted(current - desired)]
    return "\n".join(lines)


def plan(kind: str, device: Switch | Host) -> str:
    """The diff converging ``device`` would apply now; nothing is changed."""
    if kind == DeviceKind.SWITCH:
        desired = selectors.switch_desired([device.pk])[device.pk]
        with switch_session(specs.switch_spec(device)) as session:
            return session.plan(desired)
    desired = selectors.host_desired([device.pk])[device.pk]
    with host_session(specs.host_spec(device)) as session:
        return _host_diff(session.vlans(), desired)


@dataclass
class ReconcileReport:
    """What one reconcile pass found on one device."""

    device: str
    kind: str
    busy: bool = False
    drifts: list[Drift] = field(default_factory=list)
    repaired: bool = False
    error: str = ""


def _compare(expected: dict[str, frozenset[int]], actual: dict[str, frozenset[int]], known: frozenset[int]):
    for port in sorted(expected):
        want, have = expected[port], actual.get(port, frozenset())
        missing = want - have
        if missing:
            yield port, Drift.Kind.MISSING, missing, want, have
        extra = have - want
        stale = frozenset(v for v in extra if v in known)
        if stale:
            yield port, Drift.Kind.STALE, stale, want, have
        if extra - stale:
            yield port, Drift.Kind.FOREIGN, extra - stale, want, have


def reconcile_device(kind: str, device: Switch | Host, *, repair: bool) -> ReconcileReport:
    """Compare ``device`` with the desired state, record drift, repair it when ``repair``. A device whose
    lock is held (a convergence is running) is skipped: that convergence brings it to the desired state."""
    report = ReconcileReport(device.name, kind)
    if not device.enabled:
        return report
    with device_lock(kind, device.pk, wait=0) as held:
        if not held:
            report.busy = True
            return report
        try:
            if kind == DeviceKind.SWITCH:
                opener = switch_session(specs.switch_spec(device))
            else:
                opener = host_session(specs.host_spec(device))
            with opener as session:
                if kind == DeviceKind.SWITCH:
                    expected = selectors.switch_desired([device.pk])[device.pk]
                    actual = session.port_vlans()
                else:
                    expected = {"": selectors.host_desired([device.pk])[device.pk]}
                    actual = {"": session.vlans()}
                report.drifts = _record_drift(kind, device, list(_compare(expected, actual, selectors.known_vids())))
                if report.drifts and repair:
                    summary = "; ".join(str(d) for d in report.drifts)
                    change = change_create(device=device, cause=f"reconcile: {summary}")
                    apply_locked(kind, device, session=session)
                    change.refresh_from_db()
                    if change.status in (Status.OK, Status.NOOP):
                        Drift.objects.filter(pk__in=[d.pk for d in report.drifts]).update(
                            repaired_at=timezone.now(), repair=change
                        )
                        report.repaired = True
        except (DeviceError, DeviceChangeFailed) as exc:
            report.error = str(exc)
    return report


def _record_drift(kind: str, device, found) -> list[Drift]:
    """Open drift rows for what was found now (one per device, port and kind); close the ones no longer
    there (repaired by a convergence or by hand)."""
    now = timezone.now()
    device_filter = _device_filter(kind, device)
    open_rows = {(d.port, d.kind): d for d in Drift.objects.filter(repaired_at=None, **device_filter)}
    seen = []
    for port, drift_kind, vids, want, have in found:
        values = {"vlans": format_ranges(vids), "expected": format_ranges(want), "actual": format_ranges(have)}
        row = open_rows.pop((port, drift_kind), None)
        if row is None:
            row = Drift.objects.create(
                device_kind=kind, device=device.name, port=port, kind=drift_kind, **values, **device_filter
            )
        else:
            for key, value in values.items():
                setattr(row, key, value)
            row.save(update_fields=[*values, "last_seen_at"])
        seen.append(row)
    if open_rows:
        Drift.objects.filter(pk__in=[d.pk for d in open_rows.values()]).update(repaired_at=now)
    return seen
