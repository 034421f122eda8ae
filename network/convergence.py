"""Making one device match the desired state, under a lock per device, with every operation recorded.

``converge_change(change_id)`` is what a Celery task calls. It takes the device's lock, then claims *every*
pending change of that device (a conditional UPDATE: pending → running, one batch id), computes the
device's whole desired state at that moment, and applies it in one session: several segments' changes for
one switch cost one session and one commit, and a later task for an already-applied change finds its row
settled (networking-generic-switch's lesson: switches rate-limit sessions and lock their config database).
Claiming before computing matters: a change recorded after our claim is applied by its own task later.

``converge_changes(change_ids)`` does the same for many devices at once, which is how a workflow converges
one layer (switches, then hosts): the locks, the claim, the desired state and the settlement are a fixed
number of queries whatever the number of devices, and the device sessions (which only wait on the network)
run side by side on the worker process's session threads (``_session_pool``: kept between layers, so a
layer does not pay for starting a thread per device, and a new thread does not wait for the GIL while the
first sessions already run). The threads never touch the database.

The lock is a PostgreSQL session advisory lock (released by the server when the worker's connection dies,
so a killed worker never leaves a switch locked) or, on SQLite (one machine), an ``flock`` on a file under
``DATA_DIR/locks`` (released by the kernel when the process dies). Holding the lock also means any change
of the device still marked "running" belongs to a worker that died: it is claimed again (acks_late
redelivery) — converging is idempotent, so redoing it is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from network import selectors, specs
from network.drivers import (
    DeviceError,
    PermanentDeviceError,
    TemporaryDeviceError,
    VlansRefused,
    host_session,
    switch_session,
)
from network.errors import DeviceChangeFailed
from network.models import DeviceChange, DeviceKind, Drift, Host, Segment, Switch
from network.vlanranges import format_ranges
from portal import audit

PERIODIC_RECONCILER = "network.reconcile"  # the audit actor of the periodic reconciler's repairs

Status = DeviceChange.Status

logger = logging.getLogger(__name__)

# Advisory lock namespaces (first int4 of pg_advisory_lock(int4, int4)); arbitrary but fixed.
_LOCK_SPACES = {DeviceKind.SWITCH: 0x56430001, DeviceKind.HOST: 0x56430002, "segment": 0x56430003}


# --- locks ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def device_lock(kind: str, pk: int, *, wait: float | None = None) -> Iterator[bool]:
    """Hold the lock of one device (or segment). Yields True when held; False when ``wait`` seconds passed
    (``wait=0``: do not wait). ``None`` waits up to the task time limit."""
    deadline = time.monotonic() + (float(settings.CELERY_TASK_SOFT_TIME_LIMIT) / 2 if wait is None else wait)
    while True:
        held, release = _lock_devices([(kind, int(pk))])
        if held:
            break
        release()
        if time.monotonic() >= deadline:
            yield False
            return
        time.sleep(0.02)
    try:
        yield True
    finally:
        release()


def _lock_devices(keys: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """Try the locks of ``keys`` (kind, pk) without waiting: (the ones now held, how to release them).
    PostgreSQL: one query per kind, whatever the number of devices."""
    kinds = sorted({kind for kind, _pk in keys})
    if connection.vendor == "postgresql":
        held: list[tuple[str, int]] = []
        with connection.cursor() as cursor:
            for kind in kinds:
                cursor.execute(
                    "SELECT k FROM unnest(%s::int[]) AS k WHERE pg_try_advisory_lock(%s, k)",
                    [[pk for k, pk in keys if k == kind], _LOCK_SPACES[kind]],
                )
                held += [(kind, row[0]) for row in cursor.fetchall()]

        def release() -> None:
            with connection.cursor() as cursor:
                for kind in kinds:
                    pks = [pk for k, pk in held if k == kind]
                    if pks:
                        cursor.execute(
                            "SELECT pg_advisory_unlock(%s, k) FROM unnest(%s::int[]) AS k", [_LOCK_SPACES[kind], pks]
                        )

        return held, release
    stack = contextlib.ExitStack()
    held = [(kind, pk) for kind, pk in keys if stack.enter_context(_file_lock(_LOCK_SPACES[kind], int(pk)))]
    return held, stack.close


@contextlib.contextmanager
def _file_lock(space: int, key: int) -> Iterator[bool]:
    """SQLite (one machine): an ``flock`` on a file under ``DATA_DIR/locks``, tried once; yields whether held."""
    folder = settings.DATA_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{space:x}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- one device -------------------------------------------------------------------------------------------------


def _device_filter(kind: str, device) -> dict:
    return {"switch": device} if kind == DeviceKind.SWITCH else {"host": device}


def _change(device: Switch | Host, cause: str, segment: Segment | None) -> DeviceChange:
    kind = DeviceKind.SWITCH if isinstance(device, Switch) else DeviceKind.HOST
    return DeviceChange(
        kind=kind, device=device.name, segment=segment, cause=cause[:200], **_device_filter(kind, device)
    )


def change_create(*, device: Switch | Host, cause: str, segment: Segment | None = None) -> DeviceChange:
    """Record a pending change of ``device`` (the work a converge task will claim)."""
    change = _change(device, cause, segment)
    change.save()
    return change


_INSERT_CHANGES = """
INSERT INTO {table} (kind, switch_id, host_id, device, segment_id, cause, status, diff, attempts, created_at, error,
    refused)
SELECT v.kind, v.switch_id, v.host_id, v.device, %s, %s, %s, '', 0, %s, '', false
FROM unnest(%s::varchar[], %s::bigint[], %s::bigint[], %s::varchar[]) WITH ORDINALITY
    AS v(kind, switch_id, host_id, device, n)
ORDER BY v.n
RETURNING id, kind, switch_id, host_id
"""


def changes_create(*, devices: list[Switch | Host], cause: str, segment: Segment | None = None) -> list[int]:
    """``change_create`` for several devices in one INSERT; the ids, in the order of ``devices``. PostgreSQL:
    the rows come from ``unnest(arrays)`` (a 16-site cluster records 32 changes on the path of its request:
    ``bulk_create`` spent ~0.1 ms of Python per row making and compiling models)."""
    if connection.vendor != "postgresql" or not devices:
        return [row.pk for row in DeviceChange.objects.bulk_create([_change(d, cause, segment) for d in devices])]
    keys = [(DeviceKind.SWITCH if isinstance(d, Switch) else DeviceKind.HOST, d.pk) for d in devices]
    created_at = DeviceChange._meta.get_field("created_at").get_db_prep_value(timezone.now(), connection)
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERT_CHANGES.format(table=connection.ops.quote_name(DeviceChange._meta.db_table)),
            [
                segment.pk if segment is not None else None,
                cause[:200],
                DeviceChange.Status.PENDING,
                created_at,
                [kind for kind, _pk in keys],
                [pk if kind == DeviceKind.SWITCH else None for kind, pk in keys],
                [pk if kind == DeviceKind.HOST else None for kind, pk in keys],
                [d.name for d in devices],
            ],
        )
        ids = {(kind, switch_id or host_id): pk for pk, kind, switch_id, host_id in cursor.fetchall()}
    return [ids[key] for key in keys]


def _settled(change: DeviceChange) -> DeviceChange:
    if change.status == Status.FAILED:
        raise DeviceChangeFailed(change.device, change.error or "failed", change.pk)
    return change


def converge_change(change_id: int) -> DeviceChange:
    """Apply change ``change_id`` (and every other pending change of its device) and return it settled.

    Raises ``TemporaryDeviceError`` when the device may work on a retry (the change is pending again) and
    ``DeviceChangeFailed`` when it failed for good (the change is failed, with the device's message).

    Queries are pinned by a test: the change with its device in one query, the lock, the claim and the
    claimed rows, the desired state, the settlement, the unlock and the final read; a change already
    settled (by another task's batch) costs one query and opens no session."""
    outcome = converge_changes([change_id])
    if change_id not in outcome.changes:
        raise DeviceChange.DoesNotExist(f"no device change {change_id}")
    if change_id in outcome.temporary:
        raise outcome.temporary[change_id]
    if outcome.failed:
        raise outcome.failed[0]
    return outcome.changes[change_id]


def change_fail(change_id: int, message: str) -> DeviceChange:
    """Give up on a change (its retries are spent): failed, with the last message."""
    now = timezone.now()
    DeviceChange.objects.filter(pk=change_id).exclude(status__in=DeviceChange.FINAL).update(
        status=Status.FAILED, error=message, finished_at=now
    )
    return _settled(DeviceChange.objects.get(pk=change_id))


def changes_abandon_stale(*, older_than: timedelta) -> int:
    """Open changes that no task will settle any more fail, saying so: recorded, and last claimed, longer ago
    than ``older_than`` — more than their workflow's tasks take with every retry (the later layers of a
    workflow whose earlier layer failed for good, a sibling that failed temporarily while another failed for
    good). The device itself is the reconciler's from then on; the lists and the open-work metrics show only
    work under way. Returns how many."""
    horizon = timezone.now() - older_than
    stale = DeviceChange.objects.filter(status__in=DeviceChange.OPEN, created_at__lt=horizon).filter(
        Q(started_at=None) | Q(started_at__lt=horizon)
    )
    seconds = int(older_than.total_seconds())
    return stale.update(
        status=Status.FAILED,
        error=f"not converged within {seconds} s: its workflow ended without it",
        finished_at=timezone.now(),
    )


def apply_locked(kind: str, device: Switch | Host, *, session) -> None:
    """With the device's lock held and a driver session open on it (the reconciler's): claim its pending
    changes, converge it to the desired state through that session, settle the claimed changes. Raises
    like ``converge_change``: ``TemporaryDeviceError`` or ``DeviceChangeFailed``; and what interrupted the
    session (the task's soft time limit, a shutdown), once the claimed changes settled as interrupted."""
    claimed, orphaned = _claim([(kind, device)])
    w = _Device(kind, device, claimed=claimed.get((kind, device.pk), []))
    if not _skip_if_disabled(w) and not _skip_if_crash_looping(w, orphaned.get((kind, device.pk), 0)):
        if kind == DeviceKind.SWITCH:
            w.desired = selectors.switch_desired([device.pk])[device.pk]
        else:
            w.desired = selectors.host_desired([device.pk])[device.pk]
        try:
            _drive(w, session=session)
        except BaseException as exc:  # the task's time limit, a worker shutdown: never leave a change running
            _interrupted([w], exc)
            _settle([w])
            raise
    _settle([w])
    if isinstance(w.exc, TemporaryDeviceError):
        raise w.exc
    if w.exc is not None:
        raise DeviceChangeFailed(device.name, w.error)
    if w.refused_vlans:  # the rest converged; what was refused is the repair's failure
        raise DeviceChangeFailed(device.name, VlansRefused.describe(w.refused_vlans))


def _host_kept(name: str, desired: frozenset[int], result) -> frozenset[int]:
    """A host's converge result, checked: a VLAN still missing is permanent; returns the VLANs it kept
    although not desired, for their VM ports (the VMs must go first: see ``_hold_back_kept``)."""
    carried = frozenset().union(*result.after.values()) if result.after else frozenset()
    missing = desired - carried
    if missing:
        raise PermanentDeviceError(name, f"VLAN {format_ranges(missing)} missing after converge")
    return carried - desired


def _segment_vids(work: list[_Device]) -> dict[int, tuple[int | None, int | None]]:
    """The claimed changes of ``work``: change id → (its segment, the segment's VLAN); (None, None) for a
    reconciler's repair, which belongs to no segment."""
    rows = DeviceChange.objects.filter(pk__in=[pk for w in work for pk in w.claimed]).values_list(
        "pk", "segment_id", "segment__vid"
    )
    return {pk: (segment_id, vid) for pk, segment_id, vid in rows}


def _fail_refused(work: list[_Device]) -> None:
    """Hosts that refused some VLANs and converged the rest (``VlansRefused``: the host's own network, a clash):
    the changes of the refused VLANs' segments fail with the host's message — their workflows roll back — and a
    reconciler's repair fails naming them; every other change of the batch is done."""
    hit = [w for w in work if w.refused_vlans and w.status in (Status.OK, Status.NOOP)]
    segments = _segment_vids(hit) if hit else {}
    for w in hit:
        everything = VlansRefused.describe(w.refused_vlans)
        for pk in w.claimed:
            segment_id, vid = segments.get(pk, (None, None))
            if segment_id is None:
                w.per_change[pk] = (Status.FAILED, everything)
            elif vid in w.refused_vlans:
                w.per_change[pk] = (Status.FAILED, w.refused_vlans[vid])


def _hold_back_kept(work: list[_Device]) -> None:
    """Hosts that kept bridges for their VM ports: the changes that wanted one of those VLANs off (the
    teardown or rollback of its segment) stay pending with the reason, to be retried once the VM manager has
    detached the VMs (the device counts as a temporary failure for them), and a reconciler's repair fails
    with it; every other change of the batch is done — a VM left on an ended cluster's bridge never holds
    back another cluster's work on that host."""
    held = [w for w in work if w.kept and w.status in (Status.OK, Status.NOOP)]
    wanted_off = _segment_vids(held) if held else {}
    for w in held:
        reason = f"VLAN {format_ranges(w.kept)} kept: VM ports still attached"
        for pk in w.claimed:
            segment_id, vid = wanted_off.get(pk, (None, None))
            if segment_id is None:
                w.per_change[pk] = (Status.FAILED, reason)
            elif vid in w.kept:
                w.per_change[pk] = (Status.PENDING, reason)
                w.exc = TemporaryDeviceError(w.device.name, reason)


# --- many devices at once ---------------------------------------------------------------------------------------


@dataclass
class BatchOutcome:
    """What ``converge_changes`` did: every change asked for (settled, or pending again), the permanent
    failures (device and the device's own message) and the temporary ones (to retry), in the order asked."""

    changes: dict[int, DeviceChange]
    failed: list[DeviceChangeFailed] = field(default_factory=list)
    temporary: dict[int, TemporaryDeviceError] = field(default_factory=dict)  # change id → error


@dataclass
class _Device:
    """One device of a batch: what its worker thread needs, computed before (the spec, the desired state), and
    its outcome. The thread reads only loaded fields of ``device``: it never queries the database."""

    kind: str
    device: Switch | Host
    claimed: list[int] = field(default_factory=list)
    spec: object = None
    desired: object = None
    status: str = ""
    diff: str = ""
    error: str = ""
    finished_at: object = None
    exc: DeviceError | None = None
    refused: bool = False  # a switch refused the change outright: it did not take it (see ``_drive``)
    kept: frozenset[int] = frozenset()  # a host's VLANs kept, not desired, for their VM ports
    refused_vlans: dict[int, str] = field(default_factory=dict)  # a host's VLANs it refused → why (VlansRefused)
    per_change: dict[int, tuple[str, str]] = field(default_factory=dict)  # claimed change → (status, error)


def converge_changes(change_ids: Sequence[int], *, wait: float | None = None) -> BatchOutcome:
    """Apply changes ``change_ids`` (and every other pending change of their devices), the devices side by
    side. A device whose lock another operation holds is waited for (up to ``wait`` s; default half the
    task's soft time limit, so that the task is not cut by its limit first and can retry later) while the
    others go on; one still locked then counts as a temporary error."""
    ids = list(dict.fromkeys(change_ids))
    # a host agent converges hosts only, and may not read a switch's credentials (network.agentdb)
    rows = DeviceChange.objects.select_related(*(("host",) if settings.AGENT else ("switch", "host"))).in_bulk(ids)
    todo: dict[tuple[str, int], Switch | Host] = {}
    gone = []
    for change in rows.values():
        if change.status in DeviceChange.FINAL:
            continue
        device = change.switch if change.kind == DeviceKind.SWITCH else change.host
        if device is None:
            gone.append(change.pk)
        else:
            todo[(change.kind, device.pk)] = device
    if not todo and not gone:  # all settled already (by another task's batch): no lock, no session
        return _outcome(ids, rows, {})
    if gone:
        DeviceChange.objects.filter(pk__in=gone).exclude(status__in=DeviceChange.FINAL).update(
            status=Status.FAILED, error="the device no longer exists in the inventory", finished_at=timezone.now()
        )
    temporary: dict[tuple[str, int], TemporaryDeviceError] = {}  # (kind, device id) → error (a name may change)
    deadline = time.monotonic() + (float(settings.CELERY_TASK_SOFT_TIME_LIMIT) / 2 if wait is None else wait)
    waited = False
    while todo:
        held, release = _lock_devices(list(todo))
        try:
            if held:
                devices = [(kind, todo.pop((kind, pk))) for kind, pk in held]
                if waited:  # a device disabled while this waited for its lock is not touched
                    _refresh_enabled(devices)
                for device in _apply_devices(devices):
                    if isinstance(device.exc, TemporaryDeviceError):
                        temporary[(device.kind, device.device.pk)] = device.exc
        finally:
            release()
        if todo:
            if time.monotonic() >= deadline:
                for (kind, pk), device in todo.items():
                    temporary[(kind, pk)] = TemporaryDeviceError(device.name, "another operation holds the device lock")
                break
            time.sleep(0.02)
            waited = True
    return _outcome(ids, DeviceChange.objects.in_bulk(ids), temporary)


def _refresh_enabled(devices: list[tuple[str, Switch | Host]]) -> None:
    """Read again whether each of ``devices`` is enabled (one query per kind)."""
    for kind, model in ((DeviceKind.SWITCH, Switch), (DeviceKind.HOST, Host)):
        mine = {device.pk: device for k, device in devices if k == kind}
        if mine:
            for pk, enabled in model.objects.filter(pk__in=mine).values_list("pk", "enabled"):
                mine[pk].enabled = enabled


def _outcome(ids: list[int], rows: dict[int, DeviceChange], temporary: dict[tuple[str, int], TemporaryDeviceError]):
    outcome = BatchOutcome(changes={pk: rows[pk] for pk in ids if pk in rows})
    for pk, change in outcome.changes.items():
        key = (change.kind, change.switch_id if change.kind == DeviceKind.SWITCH else change.host_id)
        if change.status == Status.FAILED:
            outcome.failed.append(DeviceChangeFailed(change.device, change.error or "failed", pk))
        elif change.status not in DeviceChange.FINAL and key in temporary:
            outcome.temporary[pk] = temporary[key]
    return outcome


def _claim(
    devices: list[tuple[str, Switch | Host]],
) -> tuple[dict[tuple[str, int], list[int]], dict[tuple[str, int], int]]:
    """Pending → running for every pending (or orphaned running) change of ``devices`` (one batch id), in
    ONE statement that returns the rows it claimed (``UPDATE … RETURNING``: PostgreSQL, SQLite ≥ 3.35);
    returns the claimed change ids per device, and per device the most times one of them was found still
    running (``orphaned``, counted here: its claimer died in the session before)."""
    meta = DeviceChange._meta
    names = ("id", "kind", "switch", "host", "status", "batch", "started_at", "attempts", "orphaned", "error")
    col = {name: connection.ops.quote_name(meta.get_field(name).column) for name in names}
    reach, reach_params = [], []
    for kind, key in ((DeviceKind.SWITCH, "switch"), (DeviceKind.HOST, "host")):
        ids = [d.pk for k, d in devices if k == kind]
        if ids:
            reach.append(f"({col['kind']} = %s AND {col[key]} IN ({', '.join(['%s'] * len(ids))}))")
            reach_params += [kind, *ids]
    if not reach:
        return {}
    # identifiers come from the model, values are parameters
    sql = (
        f"UPDATE {connection.ops.quote_name(meta.db_table)} SET {col['status']} = %s, {col['batch']} = %s, "  # noqa: S608
        f"{col['started_at']} = %s, {col['attempts']} = {col['attempts']} + 1, {col['error']} = '', "
        # (the right-hand sides read the row as it was: a change still running when claimed is an orphan)
        f"{col['orphaned']} = {col['orphaned']} + CASE WHEN {col['status']} = %s THEN 1 ELSE 0 END "
        f"WHERE {col['status']} IN (%s, %s) AND ({' OR '.join(reach)}) "
        f"RETURNING {col['id']}, {col['kind']}, {col['switch']}, {col['host']}, {col['orphaned']}"
    )
    params = [
        Status.RUNNING,
        meta.get_field("batch").get_db_prep_value(uuid.uuid4(), connection),
        meta.get_field("started_at").get_db_prep_value(timezone.now(), connection),
        Status.RUNNING,
        Status.PENDING,
        Status.RUNNING,
        *reach_params,
    ]
    claimed: dict[tuple[str, int], list[int]] = {}
    orphaned: dict[tuple[str, int], int] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for pk, kind, switch_id, host_id, times in sorted(cursor.fetchall()):
            key = (kind, switch_id if kind == DeviceKind.SWITCH else host_id)
            claimed.setdefault(key, []).append(pk)
            orphaned[key] = max(orphaned.get(key, 0), times)
    return claimed, orphaned


#: a device whose change has been found still running this many times (each time the worker of the session before
#: died in it) is not driven again: its claimed changes fail. A driver that crashes its process on one device (out
#: of memory on its answer, a segfault) would otherwise crash worker after worker for good, the message going back
#: to the queue each time (``reject_on_worker_lost``). One or two deaths — a worker killed, a machine rebooted — are
#: taken in stride: the work is done again.
ORPHANED_MAX = 3


def _skip_if_crash_looping(w: _Device, orphaned: int) -> bool:
    """A device whose claimed changes were orphaned more than ``ORPHANED_MAX`` times is not driven again: they
    fail, saying why. Whether ``w`` was."""
    if orphaned <= ORPHANED_MAX:
        return False
    w.status, w.finished_at = Status.FAILED, timezone.now()
    w.error = (
        f"found still running {orphaned} times: the worker converging this device died every time (a driver "
        "crashing its process on it?); not tried again — see the worker's log"
    )
    w.exc = PermanentDeviceError(w.device.name, w.error)
    return True


def _skip_if_disabled(w: _Device) -> bool:
    """A disabled device is never touched: its claimed changes settle as no-ops. Whether ``w`` was."""
    if w.device.enabled:
        return False
    w.status, w.error, w.finished_at = Status.NOOP, DeviceChange.NOT_TOUCHED, timezone.now()
    return True


def _apply_devices(devices: list[tuple[str, Switch | Host]]) -> list[_Device]:
    """With the devices' locks held: claim their pending changes, converge the devices that have some (side
    by side on the session threads), settle every claimed change (one batch of statements)."""
    claimed, orphaned = _claim(devices)
    work = [
        _Device(kind, device, claimed=claimed[(kind, device.pk)])
        for kind, device in devices
        if (kind, device.pk) in claimed
    ]
    if not work:
        return []
    active = [
        w
        for w in work
        if not _skip_if_disabled(w) and not _skip_if_crash_looping(w, orphaned.get((w.kind, w.device.pk), 0))
    ]
    if active:
        switches = [w.device.pk for w in active if w.kind == DeviceKind.SWITCH]
        hosts = [w.device.pk for w in active if w.kind == DeviceKind.HOST]
        segments = selectors.desired_segments(switch_ids=switches, host_ids=hosts)
        port_statics: dict[int, dict[str, frozenset[int]]] = {}
        per_switch = (
            selectors.switch_desired(switches, segments=segments, port_statics=port_statics) if switches else {}
        )
        per_host = selectors.host_desired(hosts, segments=segments) if hosts else {}
        for w in active:
            if w.kind == DeviceKind.SWITCH:
                w.desired = per_switch[w.device.pk]
                w.spec = specs.switch_spec(
                    w.device, owned_ports=w.desired.keys(), port_static_vlans=port_statics.get(w.device.pk, {})
                )
            else:
                w.desired = per_host[w.device.pk]
                w.spec = specs.host_spec(w.device)
        try:
            if len(active) == 1:
                _drive(active[0])
            else:
                _run_sessions(active)
        except BaseException as exc:  # the task's time limit, a worker shutdown: never leave a change running
            _interrupted(active, exc)
            _settle(work)
            raise
    _settle(work)
    return work


def _interrupted(work: list[_Device], exc: BaseException) -> None:
    """The devices of ``work`` whose session did not end: failed, interrupted by ``exc``."""
    name, text = type(exc).__name__, str(exc)
    message = f"{name}: {text}" if text and not text.startswith(name) else name
    for w in work:
        if not w.status:
            w.status, w.error, w.finished_at = Status.FAILED, f"interrupted: {message}", timezone.now()


_POOL: dict[int, ThreadPoolExecutor] = {}  # process id → the session threads (a forked child makes its own)
_POOL_LOCK = threading.Lock()


def _session_pool() -> ThreadPoolExecutor:
    """This process's device-session threads: started on demand up to ``DEVICE_SESSION_THREADS`` and kept
    idle between layers."""
    pid = os.getpid()
    with _POOL_LOCK:
        pool = _POOL.get(pid)
        if pool is None:
            _POOL.clear()  # inherited from the parent through fork: its threads do not exist here
            pool = _POOL[pid] = ThreadPoolExecutor(
                max_workers=settings.DEVICE_SESSION_THREADS, thread_name_prefix="converge"
            )
        return pool


def _run_sessions(active: list[_Device]) -> None:
    """``_drive`` every device on the session threads and wait for all. When the wait is interrupted (a time
    limit, a shutdown) or a session raises something other than an error (recorded in its ``_Device``), the
    sessions not started yet are cancelled and the running ones finish before this raises: no session goes
    on after the caller releases the device locks."""
    futures = [_session_pool().submit(_drive, w) for w in active]
    try:
        for future in as_completed(futures):
            future.result()  # in completion order: an interruption is seen at once
    except BaseException:
        for future in futures:
            future.cancel()
        wait_futures(futures)
        raise


def _settle(work: list[_Device]) -> None:
    """Every claimed change gets its device's outcome. PostgreSQL: ONE statement for the whole layer (an
    ``UPDATE … FROM unnest(arrays)``: its cost hardly grows with the number of devices, where a pipelined
    ``executemany`` cost ~0.7 ms per change and ``bulk_update``'s CASE expressions more); SQLite (one
    machine, small batches): one statement per change. The changes a host's kept bridges hold back are
    sorted out first (``_hold_back_kept``), and those of the VLANs a host refused (``_fail_refused``), whatever ended
    the batch."""
    _hold_back_kept(work)
    _fail_refused(work)
    finished = DeviceChange._meta.get_field("finished_at")
    table = connection.ops.quote_name(DeviceChange._meta.db_table)
    rows = []
    for w in work:
        for pk in w.claimed:
            status, error = w.per_change.get(pk, (w.status, w.error))
            at = None if status == Status.PENDING else w.finished_at
            rows.append((status, w.diff, error, finished.get_db_prep_value(at, connection), w.refused, pk))
    if not rows:
        return
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"UPDATE {table} AS c SET status = v.status, diff = v.diff, error = v.error, "  # noqa: S608
                "finished_at = v.finished_at, refused = v.refused FROM unnest(%s::text[], %s::text[], %s::text[], "
                "%s::timestamptz[], %s::boolean[], %s::bigint[]) AS v(status, diff, error, finished_at, refused, id) "
                "WHERE c.id = v.id",
                [list(column) for column in zip(*rows, strict=True)],
            )
        else:
            cursor.executemany(
                f"UPDATE {table} SET status = %s, diff = %s, error = %s, finished_at = %s, refused = %s "  # noqa: S608
                "WHERE id = %s",
                rows,
            )


def _drive(w: _Device, session=None) -> None:
    """One device session (in a worker thread: drivers only, no database); ``session``: an open one to use
    instead. Records the outcome, and the error, in ``w``."""
    name = w.device.name
    try:
        if session is None:
            opener = switch_session(w.spec) if w.kind == DeviceKind.SWITCH else host_session(w.spec)
        else:
            opener = contextlib.nullcontext(session)
        with opener as opened:
            try:
                result = opened.converge(w.desired)
            except VlansRefused as exc:  # a host: these VLANs refused, the others converged
                result, w.refused_vlans = exc.result, exc.refused
            if w.kind == DeviceKind.HOST:
                w.kept = _host_kept(name, w.desired - frozenset(w.refused_vlans), result)
    except TemporaryDeviceError as exc:  # back to pending: a retry claims it again
        w.status, w.error, w.exc = Status.PENDING, exc.message, exc
        return
    except DeviceError as exc:
        w.status, w.error, w.exc, w.finished_at = Status.FAILED, exc.message, exc, timezone.now()
        # a switch that refused the change outright did not take it; a host's failure may come half-way
        # through its VLANs, and an error raised after a commit that could not be undone says so
        w.refused = w.kind == DeviceKind.SWITCH and not exc.may_have_applied
        return
    except SoftTimeLimitExceeded:  # the task's time is up: not the device's fault (see ``_apply_devices``)
        raise
    except Exception as exc:  # a driver bug: fail the change, never leave it running
        message = f"{type(exc).__name__}: {exc}"
        w.status, w.error, w.finished_at = Status.FAILED, message, timezone.now()
        w.exc = PermanentDeviceError(name, message)
        return
    w.status = Status.OK if result.changed else Status.NOOP
    w.diff, w.finished_at = result.diff, timezone.now()


# --- dry run and drift ------------------------------------------------------------------------------------------


def _host_diff(current: frozenset[int], desired: frozenset[int]) -> str:
    lines = [f"+ vlan {vid}" for vid in sorted(desired - current)]
    lines += [f"- vlan {vid}" for vid in sorted(current - desired)]
    return "\n".join(lines)


#: How long a dry run waits for a convergence or reconcile of the device to end (``plan``).
PLAN_LOCK_WAIT = 5.0


def plan(kind: str, device: Switch | Host) -> str:
    """The diff converging ``device`` would apply now; nothing is changed. Under the device's lock, as every
    session: a dry run beside a commit would overwrite its candidate (NAPALM's IOS driver loads every merge into
    one file on flash, and its discard empties it) and would read the desired state mid-change. A device busy
    for ``PLAN_LOCK_WAIT`` seconds is a TemporaryDeviceError (try again)."""
    with device_lock(kind, device.pk, wait=PLAN_LOCK_WAIT) as held:
        if not held:
            raise TemporaryDeviceError(device.name, "busy: a convergence or reconcile holds it; try the plan again")
        if kind == DeviceKind.SWITCH:
            desired = selectors.switch_desired([device.pk])[device.pk]
            with switch_session(specs.switch_spec(device)) as session:
                return session.plan(desired)
        desired = selectors.host_desired([device.pk])[device.pk]
        with host_session(specs.host_spec(device)) as session:
            return _host_diff(host_carried(session, desired), desired)


def host_carried(session, expected: frozenset[int]) -> frozenset[int]:
    """The VLANs the host carries, as the reconciler and a plan compare them with ``expected``: a wanted VLAN the
    driver says is broken (``broken()``: its bridge there but the VLAN not reaching it) is missing — a repair
    makes it whole; one not wanted counts while anything of it is there, so that a repair removes it."""
    found = session.vlans()
    broken = getattr(session, "broken", None)
    return found - (broken() & expected) if broken is not None and found & expected else found


@dataclass
class ReconcileReport:
    """What one reconcile pass found on one device."""

    device: str
    kind: str
    busy: bool = False
    drifts: list[Drift] = field(default_factory=list)
    repaired: bool = False
    error: str = ""


HOSTS_OWN = "host's own"  # the drift "port" of a host's own VLANs on its uplink (``own_vlans``)


def _compare(expected: dict[str, frozenset[int]], actual: dict[str, frozenset[int]]):
    extras = {v for port in expected for v in actual.get(port, frozenset()) - expected[port]}
    known = selectors.known_vids(extras)  # (no query when nothing is extra)
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
    lock is held (a convergence is running) is skipped: that convergence brings it to the desired state. So is
    one a workflow has work recorded for and not done yet (a provisioning's or a teardown's change, queued, in its
    backoff, or waiting for the lock): the desired state is ahead of the device by that work, which is no drift —
    recorded as "removed by hand?" and repaired as the reconciler's, it was. For one interval of the reconciler
    at most: work recorded longer ago than that is a workflow's that ended without it (a failed update's later
    layer): the device is reconciled, and its repair does that work."""
    report = ReconcileReport(device.name, kind)
    if not device.enabled:
        return report
    with device_lock(kind, device.pk, wait=0) as held:
        queued = DeviceChange.objects.filter(
            status__in=DeviceChange.OPEN,
            segment__isnull=False,
            created_at__gt=timezone.now() - timedelta(seconds=settings.RECONCILE_INTERVAL),
            **_device_filter(kind, device),
        ).exists()
        if not held or queued:  # a convergence is running or to come: it verifies the device against the desired state
            report.busy = True
            type(device).objects.filter(pk=device.pk).update(last_reconciled_at=timezone.now())
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
                    short = [port for port, want in expected.items() if want - actual.get(port, frozenset())]
                    down = getattr(session, "down_ports", None)
                    for port in down(short) if short and down is not None else ():
                        # a port that is down shows none of its VLANs on some platforms: not a VLAN removed
                        actual[port] = actual.get(port, frozenset()) | expected[port]
                else:
                    expected = {"": selectors.host_desired([device.pk])[device.pk]}
                    actual = {"": host_carried(session, expected[""])}
                    own = getattr(session, "own_vlans", None)
                    if own is not None:  # the host's own VLANs the portal keeps on its uplink (OVS hosts)
                        expected[HOSTS_OWN], actual[HOSTS_OWN] = own()
                report.drifts = _record_drift(kind, device, list(_compare(expected, actual)))
                if report.drifts and repair:
                    _refresh_enabled([(kind, device)])  # (disabled meanwhile: never touched, the drift stays open)
                if report.drifts and repair and device.enabled:
                    summary = "; ".join(str(d) for d in report.drifts)
                    # who asked, unless the periodic reconciler did: an admin's "reconcile now", manage.py
                    who = audit.current().actor
                    asked = "" if who in (PERIODIC_RECONCILER, "system") else f" ({who})"
                    change = change_create(device=device, cause=f"reconcile{asked}: {summary}")
                    apply_locked(kind, device, session=session)
                    change.refresh_from_db()
                    if change.status in (Status.OK, Status.NOOP):
                        Drift.objects.filter(pk__in=[d.pk for d in report.drifts]).update(
                            repaired_at=timezone.now(), repair=change
                        )
                        report.repaired = True
        except (DeviceError, DeviceChangeFailed) as exc:
            report.error = str(exc)
            logger.warning("reconcile %s %s: %s", kind, device.name, report.error)
    done = {"reconcile_error": report.error[:2000]}
    if not report.error:
        done["last_reconciled_at"] = timezone.now()
    type(device).objects.filter(pk=device.pk).update(**done)
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
