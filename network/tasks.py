"""Celery tasks of the VLAN life-cycle service.

Tasks take ids, load, claim their work with a conditional UPDATE and call ``network.convergence`` or
``network.services``. Device tasks are ``acks_late`` (a worker killed mid-task leaves the message for the
next worker; converging is idempotent, so redoing it is safe), retry only temporary device errors with
exponential backoff (``DEVICE_RETRY_MAX``, ``DEVICE_RETRY_BACKOFF``) and fail at once on permanent ones,
raising ``DeviceChangeFailed`` with the device and the device's own message. ``converge_devices`` (a layer
of a workflow: many devices side by side) is what the workflows send; ``converge_switch``/``converge_host``
converge the device of one change. The canvases that string these tasks together are built in
``network.workflows``.
"""

from __future__ import annotations

import contextlib
import logging
import time

from celery import chain, shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from network import convergence, errbacks, selectors, services
from network.drivers import DeviceError, TemporaryDeviceError
from network.errors import DeviceChangeFailed, SegmentClosed
from network.models import DeviceChange, DeviceKind, Host, Segment, SegmentMember, Switch
from portal import audit
from portal.audit import audit_actor

logger = logging.getLogger(__name__)

_DEVICE_TASK = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,  # counted against DEVICE_RETRY_MAX in _retry_pending
    "soft_time_limit": settings.CELERY_TASK_SOFT_TIME_LIMIT,
    "time_limit": settings.CELERY_TASK_TIME_LIMIT,
}


def _backoff(retries: int) -> float:
    return settings.DEVICE_RETRY_BACKOFF * (2**retries)


def _run_change(task, change_id: int) -> dict:
    try:
        change = convergence.converge_change(change_id)
    except TemporaryDeviceError as exc:
        _retry_pending(task, {change_id: exc})
    except DeviceChangeFailed as exc:
        raise DeviceChangeFailed(exc.device, exc.message, change_id) from None
    return {"change": change.pk, "device": change.device, "status": change.status}


@shared_task(name="network.converge_switch", **_DEVICE_TASK)
def converge_switch(self, change_id: int) -> dict:
    """Make the switch of change ``change_id`` match the desired state (batching its pending changes)."""
    with audit_actor("network.converge_switch"):
        return _run_change(self, change_id)


@shared_task(name="network.converge_host", **_DEVICE_TASK)
def converge_host(self, change_id: int) -> dict:
    """Make the host of change ``change_id`` carry exactly its desired VLAN bridges."""
    with audit_actor("network.converge_host"):
        return _run_change(self, change_id)


@shared_task(name="network.converge_devices", **_DEVICE_TASK)
def converge_devices(
    self,
    change_ids: list[int],
    then: list[list[int]] | None = None,
    finish: list | None = None,
    tolerate: bool = False,
    retries_before: int = 0,
) -> dict:
    """Make the devices of changes ``change_ids`` match the desired state, side by side (one layer of a
    workflow, or a chunk of it), then those of each layer in ``then``, in turn (consecutive layers the
    same worker runs: one task instead of a broker round trip per layer), then, with ``finish`` =
    ``["provisioned" | "released", segment id, *more arguments]``, what ``segment_provisioned``/``segment_released``
    do, returning their result (the workflow's last step, without a round trip of its own).

    Settled changes are skipped, so a retry (or a redelivery after a worker died) redoes only what is
    still pending. A permanent failure of any device fails the task (after the others of its layer
    finished; later layers are not started) with that device and its message; temporary ones retry the
    task with backoff. With ``tolerate`` (a rollback: every device must be tried) a device that fails, at
    once or after the retries, is recorded as failed and the others, and the later layers, go on.

    Each layer has retries of its own (``DEVICE_RETRY_MAX``, backoff from the first step): a retry goes on from
    the layer that asked for it, with ``retries_before`` the task's retries when that layer began — the
    switches' retries never leave the hosts none. A later layer waits for device locks only as long as this
    task's time leaves its device sessions theirs; with none left it goes on in a task of its own."""
    done = []
    layers = [change_ids, *(then or [])]
    started = time.monotonic()
    for index, layer in enumerate(layers):
        before = retries_before if index == 0 else (self.request.retries or 0)
        rest = {"then": layers[index + 1 :], "finish": finish, "tolerate": tolerate, "retries_before": before}
        wait = None  # the first layer: half the soft time limit for a device lock
        if index:
            # a later layer has what is left of this task's time, less one device session's: a lock waited for
            # must not take the time the device itself needs (the soft limit would cut it, failing the layer
            # with no device to blame); none left: the layer goes on in a task of its own, at once, with retries
            # of its own (not one of the previous layer's)
            left = settings.CELERY_TASK_SOFT_TIME_LIMIT - (time.monotonic() - started) - _session_time()
            if left <= 0:
                rest["retries_before"] = (self.request.retries or 0) + 1
                raise self.retry(args=[layer], kwargs=rest, countdown=0, max_retries=None)
            wait = min(left, settings.CELERY_TASK_SOFT_TIME_LIMIT / 2)
        with audit_actor("network.converge"):
            outcome = convergence.converge_changes(layer, wait=wait)
        if outcome.failed and not tolerate:
            raise outcome.failed[0]
        if outcome.temporary and tolerate and _retries_spent(self, before):
            _fail_pending(outcome.temporary)  # recorded as failed; the rollback goes on
            outcome = convergence.BatchOutcome(changes=DeviceChange.objects.in_bulk(layer))
        elif outcome.temporary:
            _retry_pending(self, outcome.temporary, before=before, args=[layer], kwargs=rest)
        done += [{"change": c.pk, "device": c.device, "status": c.status} for c in outcome.changes.values()]
    if finish:
        kind, segment_id, *more = finish
        return FINISH[kind](segment_id, *more)
    return {"changes": done}


def _session_time() -> float:
    """How long one layer's device sessions may take once their locks are held: the device timeout (an OVSDB
    transport adds 5 s to it), with a margin for the database."""
    return settings.DEVICE_TIMEOUT + 10


def _retries_spent(task, before: int = 0) -> bool:
    """Whether ``task`` has retried ``DEVICE_RETRY_MAX`` times since it had retried ``before`` times."""
    return (task.request.retries or 0) - before >= settings.DEVICE_RETRY_MAX


def _fail_pending(pending: dict[int, TemporaryDeviceError]) -> None:
    """Changes that failed temporarily on every attempt fail for good, with their device's last message."""
    for pk, error in pending.items():
        with contextlib.suppress(DeviceChangeFailed):
            convergence.change_fail(pk, error.message)


def _retry_pending(
    task, pending: dict[int, TemporaryDeviceError], *, before: int = 0, args=None, kwargs: dict | None = None
):
    """Retry ``task`` with backoff (with ``args`` and ``kwargs``, when given) for changes that failed temporarily,
    or fail them once the retries since ``before`` are spent (raising ``DeviceChangeFailed`` with the first device
    and its message)."""
    retries = (task.request.retries or 0) - before
    change_id, exc = next(iter(pending.items()))
    if _retries_spent(task, before):
        _fail_pending(pending)
        raise DeviceChangeFailed(exc.device, exc.message, change_id)
    logger.warning("%s changes pending (%s); retry %s in %.1fs", len(pending), exc, retries + 1, _backoff(retries))
    raise task.retry(
        args=args,
        kwargs=kwargs,
        countdown=_backoff(retries),
        max_retries=None,
        exc=DeviceChangeFailed(exc.device, exc.message, change_id),
    )


@shared_task(name="network.segment_step", acks_late=True)
def segment_step(segment_id: int, step: str) -> dict:
    """The join point after a parallel layer of device tasks (the body of the layer's chord)."""
    return {"segment": segment_id, "step": step}


@shared_task(name="network.segment_provisioned", acks_late=True)
def segment_provisioned(segment_id: int, revision: int | None = None) -> dict:
    """Every device reported success: the segment is active (unless it was deleted meanwhile). A segment on the
    gateway trunks is its owner's way in now: its VLAN id may be in the gateways' maps from here on.

    Not when a device was disabled between the provisioning's recording its change and running it (the change
    settled untouched): that device never got the VLAN, and the nodes behind it would have no network — the
    provisioning fails with the device named, and is rolled back.

    ``revision``: the segment's revision this provisioning converged (``Segment.revision``). The hosts (or the
    gateway) changed again since: the segment stays PENDING for the later provisioning's last step to mark — this
    one's devices are done, the segment is not — and this one is "superseded" (no failure: a device the later
    one will configure is not this one's to fail on)."""
    if revision is not None and _superseded(segment_id, revision):
        return _superseded_result(segment_id)
    untouched = selectors.left_untouched(segment_id)
    if untouched is not None:
        device, change_id = untouched
        raise DeviceChangeFailed(device, "disabled while the network was being provisioned: not configured", change_id)
    pending = Segment.objects.filter(pk=segment_id, state=Segment.State.PENDING)
    if revision is not None:
        pending = pending.filter(revision=revision)
    pending.update(state=Segment.State.ACTIVE, error="")
    if revision is not None and _superseded(segment_id, revision):  # (changed between the check and the update)
        return _superseded_result(segment_id)
    seg = Segment.objects.get(pk=segment_id)
    if seg.state != Segment.State.ACTIVE:
        raise SegmentClosed(f"segment of {seg.owner_ref} is {seg.get_state_display()}, not active")
    if seg.gateway and seg.allocation_id:
        services.vlan_map_to_gateways(allocation_id=seg.allocation_id)
    return {"segment": seg.pk, "owner": seg.owner_ref, "vid": seg.vid, "state": seg.state}


def _superseded(segment_id: int, revision: int) -> bool:
    """Whether the PENDING segment waits for a provisioning of a later revision than ``revision``."""
    return Segment.objects.filter(pk=segment_id, state=Segment.State.PENDING).exclude(revision=revision).exists()


def _superseded_result(segment_id: int) -> dict:
    seg = Segment.objects.get(pk=segment_id)
    if seg.gateway and seg.allocation_id:  # (as the later one will: only ever delays the VLAN's reuse)
        services.vlan_map_to_gateways(allocation_id=seg.allocation_id)
    return {"segment": seg.pk, "owner": seg.owner_ref, "vid": seg.vid, "state": seg.state, "superseded": True}


@shared_task(name="network.segment_released", acks_late=True)
def segment_released(segment_id: int) -> dict:
    """Teardown's last step: every enabled device is clean, so the segment is closed and its VLAN goes into
    quarantine — unless a disabled device may still carry it (``selectors.vlan_holders``): then the
    segment keeps it (the reason in ``error``) and ``retry_rollbacks`` tears it down again once that device
    is enabled. Idempotent."""
    with audit_actor("network.teardown"), transaction.atomic():
        seg = Segment.objects.select_for_update(of=("self",)).select_related("allocation__pool").get(pk=segment_id)
        if seg.state != Segment.State.CLOSED:
            if seg.state != Segment.State.DELETING:
                raise SegmentClosed(f"segment of {seg.owner_ref} is {seg.get_state_display()}, not being deleted")
            holders = selectors.vlan_holders(seg)
            uncleaned = selectors.vlan_not_cleaned(seg, teardown_cause(seg.owner_ref))
            owned = seg.allocation is not None and seg.allocation.owner == seg.owner_ref
            if holders and owned:
                seg.error = (
                    f"VLAN {seg.vid} kept: {', '.join(holders)} disabled and may still carry it; released once "
                    "enabled again and cleaned"
                )
            elif uncleaned and owned:
                seg.error = (
                    f"VLAN {seg.vid} kept: {', '.join(uncleaned)} enabled again during the teardown and not "
                    "cleaned by it; released once torn down again"
                )
            else:
                seg.error = ""
                if owned:
                    services.vlan_release(allocation=seg.allocation)
            seg.state = Segment.State.CLOSED
            seg.save(update_fields=["state", "error", "updated_at"])
            audit.delete_rows(SegmentMember.objects.filter(segment=seg), related=SegmentMember.TEXT_RELATED)
    return {"segment": seg.pk, "owner": seg.owner_ref, "vid": seg.vid, "state": seg.state}


# A workflow's last step by name: a task of its own, or run by the last ``converge_devices`` (``finish``).
FINISH = {"provisioned": segment_provisioned, "released": segment_released}


@shared_task(name="network.segment_compensate", **_DEVICE_TASK)
def segment_compensate(self, segment_id: int, retry: bool = False) -> dict:
    """Roll a failed provisioning back: every device the segment needs or touched is converged to the
    state without it, then the VLAN is released and the segment is FAILED with the reason (the device and
    its own message). Used as the error callback of ``workflows.provision``; running it twice is harmless
    (the second finds the rollback claimed and does nothing).

    The VLAN is kept (not released) when a device could not be rolled back (it may carry the VLAN): handing
    the id to another owner while a switch still carries it would join two clusters. ``retry_rollbacks`` (every
    reconcile period) runs the rollback of such a segment again (``retry``), and of one that stalled, until
    every device is clean and the VLAN goes back to the pool.

    Each device is converged by the worker that reaches it (``Switch.queue``, ``Host.queue``): this task is
    replaced by a chain of layers on their queues (hosts, then switches; ``tolerate``: a device that fails stops
    neither the others nor the next layer; layers of the central worker merged into one task) ending in
    ``segment_compensated``, and whatever followed this task follows that. Never inline: a device that does not
    answer takes its retries (each attempt a task of its own, within its time limit); converging every layer
    here ran the whole rollback within ONE task's time limit, which a host timing out on every retry
    exceeded before the switches were rolled back."""
    from network import workflows

    with audit_actor("network.compensate"), convergence.device_lock("segment", segment_id, wait=0) as held:
        if not held:
            return {"segment": segment_id, "state": "being compensated elsewhere"}
        # Claim the rollback (one only: Celery may call a workflow's errback twice, from the failed task and
        # from its chord) — of a failed provisioning, or (``retry``) of a rollback that kept the VLAN or
        # stalled (``services.segment_rollback_again``).
        claimed = Segment.objects.filter(pk=segment_id, state__in=Segment.DESIRED_STATES).update(
            state=Segment.State.COMPENSATING, updated_at=timezone.now()
        )
        if not claimed and retry:
            claimed = services.segment_rollback_again(segment_id=segment_id)
        seg = Segment.objects.get(pk=segment_id)
        if not claimed:
            busy = seg.state == Segment.State.COMPENSATING
            return {"segment": seg.pk, "state": "being compensated elsewhere" if busy else seg.state}
        switches, hosts = convergence.selectors.segment_devices(seg)
        devices = [*hosts, *switches]  # reverse order of provisioning: hosts, then switches
        ids = convergence.changes_create(devices=devices, segment=seg, cause=_compensation_cause(seg))
        pairs = list(zip(devices, ids, strict=True))
        steps = workflows.layers(
            seg,
            [("hosts", workflows.layer(pairs[: len(hosts)])), ("switches", workflows.layer(pairs[len(hosts) :]))],
            "compensated",
            tolerate=True,
        )
    return self.replace(chain(*steps))


teardown_cause = selectors.teardown_cause  # (the workflows and the clusters' sweeps name it here)


def _compensation_cause(seg: Segment) -> str:
    return selectors.compensation_cause(seg.owner_ref)


@shared_task(name="network.segment_compensated", acks_late=True)
def segment_compensated(segment_id: int) -> dict:
    """A rollback's last step, when every device has been tried: the segment is FAILED with the first
    device's failure as the reason, and its VLAN released unless a device could not be converged back (it
    may carry the VLAN: then the reason says which, and ``retry_rollbacks`` tries again). Idempotent."""
    with audit_actor("network.compensate"):
        seg = Segment.objects.select_related("allocation__pool").get(pk=segment_id)
        if seg.state != Segment.State.COMPENSATING:
            return {"segment": seg.pk, "state": seg.state, "error": seg.error}
        cause = _compensation_cause(seg)
        changes = DeviceChange.objects.filter(segment=seg)
        earlier, rollback = changes.exclude(cause=cause), changes.filter(cause=cause)
        first = earlier.filter(status=DeviceChange.Status.FAILED).order_by("finished_at", "pk").first()
        reason = f"{first.device}: {first.error}" if first else "provisioning failed"
        # Each device's last rollback attempt (a retry supersedes). One that did not end OK leaves a device
        # that may carry the VLAN — unless every change this segment asked of it was refused by the device
        # itself: a commit whose answer was lost (a timeout) may have taken effect, and the segment was in the
        # desired state from its creation on, so a reconciler's repair may have put the VLAN there first. A
        # device that left the inventory is no longer ours.
        latest: dict[tuple, DeviceChange] = {}
        for change in rollback.order_by("pk"):
            if change.switch_id is not None or change.host_id is not None:
                latest[(change.kind, change.switch_id, change.host_id)] = change
        asked: dict[tuple, list[bool]] = {}  # device → whether each earlier change of it was refused
        for kind, switch_id, host_id, refused in earlier.values_list("kind", "switch_id", "host_id", "refused"):
            asked.setdefault((kind, switch_id, host_id), []).append(refused)
        settled = (DeviceChange.Status.OK, DeviceChange.Status.NOOP)
        failed = [
            (device, change)
            for device, change in latest.items()
            if change.status not in settled and not all(asked.get(device) or [False])
        ]
        not_rolled_back = [f"{change.device}: {change.error or change.get_status_display()}" for _d, change in failed]
        not_rolled_back += [f"{holder}: disabled, not touched" for holder in selectors.vlan_holders(seg)]
        reported = [(kind, switch_id or host_id) for (kind, switch_id, host_id), _change in failed]
        uncleaned = selectors.vlan_not_cleaned(seg, cause, known=reported)
        not_rolled_back += [f"{device}: enabled again during the rollback, not touched" for device in uncleaned]
        with transaction.atomic():
            # the segment's row first, then its VLAN's (as a teardown locks them: no deadlock between the two),
            # and still rolling back: one that a teardown took meanwhile releases its VLAN itself, once clean
            locked = Segment.objects.select_for_update().filter(pk=seg.pk, state=Segment.State.COMPENSATING)
            if not list(locked.values_list("pk", flat=True)):
                seg.refresh_from_db()
                return {"segment": seg.pk, "state": seg.state, "error": seg.error}
            if not_rolled_back:
                reason += selectors.NOT_ROLLED_BACK + "; ".join(not_rolled_back)
            elif seg.allocation is not None and seg.allocation.owner == seg.owner_ref:
                services.vlan_release(allocation=seg.allocation)
            locked.update(state=Segment.State.FAILED, error=reason[:5000])
        seg.refresh_from_db()
        return {"segment": seg.pk, "state": seg.state, "error": seg.error, "released": not not_rolled_back}


FINISH["compensated"] = segment_compensated


@shared_task(name="network.retry_rollbacks")
def retry_rollbacks() -> list[int]:
    """Periodic (with the reconciler): every segment whose rollback kept its VLAN (a device that took it
    could not be converged back), or stalled (its worker died before it could hand the work on), is rolled
    back again — each device by its own worker — until every device is clean and the VLAN goes back to the
    pool; and every closed segment that kept its VLAN for a disabled device is torn down again once no such
    device is left disabled, as is one whose teardown stalled (``services.segments_holding_vlan``); a
    teardown sent again that fails closes its segment again, holding the VLAN, with why
    (``segment_release_failed``), for a later run. A segment waiting for a disabled device is left alone
    (nothing would change). Returns the segments sent."""
    from network import workflows

    retried = []
    for segment in services.segments_to_roll_back_again():
        if segment.state == Segment.State.COMPENSATING or not selectors.vlan_holders(segment):
            segment_compensate.delay(segment.pk, retry=True)
            retried.append(segment.pk)
    for segment in services.segments_holding_vlan().order_by("pk"):
        if not selectors.vlan_holders(segment) and services.segment_release_again(segment_id=segment.pk):
            try:
                workflows.teardown(segment.pk).on_error(segment_release_failed.s(segment.pk)).delay()
            except Exception:  # not sent (the broker went away): held again, so that the next run sends it
                services.segment_release_undo(segment_id=segment.pk)
                raise
            retried.append(segment.pk)
    return sorted(retried)


@shared_task(name="network.segment_release_failed")
def segment_release_failed(request, exc, traceback, segment_id: int) -> None:
    """The error callback of a teardown ``retry_rollbacks`` sent again (a device could not be cleaned): the
    segment is closed again, holding its VLAN, with why, for a later run to try again."""
    if errbacks.handed_on(segment_release_failed, request, exc, segment_id):
        return
    reason = f"VLAN kept: teardown failed again ({errbacks.describe(exc)})"
    services.segment_release_undo(segment_id=segment_id, reason=reason)


# --- reconciler -------------------------------------------------------------------------------------------------


@shared_task(name="network.reconcile")
def reconcile(repair: bool | None = None) -> dict:
    """Periodic (celery beat, every ``RECONCILE_INTERVAL`` s): one reconcile task per enabled device; the
    device changes no workflow will settle any more (open for longer than a stalled rollback) fail."""
    convergence.changes_abandon_stale(older_than=services.rollback_stalled_after())
    expires = settings.RECONCILE_INTERVAL
    switches = list(Switch.objects.filter(enabled=True).select_related("site"))
    hosts = list(Host.objects.filter(enabled=True).select_related("site"))
    for kind, devices in ((DeviceKind.SWITCH, switches), (DeviceKind.HOST, hosts)):
        for device in devices:
            reconcile_later(kind, device, repair, expires=expires)
    return {"switches": len(switches), "hosts": len(hosts)}


_GONE = "the device no longer exists in the inventory"


def _device(kind: str, device_id: int) -> Switch | Host | None:
    """The switch or host a task was given by id (None: it left the inventory meanwhile)."""
    return (Switch if kind == DeviceKind.SWITCH else Host).objects.filter(pk=device_id).first()


@shared_task(name="network.plan_device", soft_time_limit=settings.CELERY_TASK_SOFT_TIME_LIMIT)
def plan_device(kind: str, device_id: int) -> dict:
    """The diff convergence would apply to one device now (nothing is changed), or the device's error."""
    device = _device(kind, device_id)
    if device is None:
        return {"diff": "", "error": _GONE}
    try:
        return {"diff": convergence.plan(kind, device), "error": ""}
    except DeviceError as exc:
        return {"diff": "", "error": str(exc)}


def plan_devices(kind: str, devices: list[Switch | Host], *, timeout: float | None = None) -> list[dict]:
    """``plan_device`` for each device (``{"device", "diff", "error"}``, in order), asked of the worker that
    reaches it, all at once (``on_device_workers``; default timeout ``DEVICE_TIMEOUT`` + 10 s)."""
    timeout = settings.DEVICE_TIMEOUT + 10 if timeout is None else timeout
    return on_device_workers(plan_device, kind, devices, timeout=timeout, blank={"diff": ""})


def reconcile_devices(
    kind: str, devices: list[Switch | Host], repair: bool | None = None, *, actor: str, timeout: float | None = None
) -> list[dict]:
    """``reconcile_device`` for each device (its result with ``"device"``, in order), asked of the worker
    that reaches it, all at once and waited for (default timeout: the task's time limit + 10 s); audited
    as ``actor``."""
    timeout = settings.CELERY_TASK_TIME_LIMIT + 10 if timeout is None else timeout
    blank = {"busy": False, "drift": [], "repaired": False}
    return on_device_workers(reconcile_device, kind, devices, repair, actor, timeout=timeout, blank=blank)


def on_device_workers(task, kind: str, devices: list[Switch | Host], *args, timeout: float, blank: dict) -> list[dict]:
    """Run ``task(kind, device id, *args)`` (a task that returns a dict with ``"error"``) for each device on
    the worker that reaches it (``device.queue``), all at once, and collect the answers in order as
    ``{"device": name, **answer}``; the central worker's devices run here, side by side (``_run_here``). A
    device whose worker cannot be asked (the broker is down), does not answer within ``timeout`` s (for them
    all) or whose task failed is a row of ``blank`` with the reason in ``"error"``, never a failure of the whole
    run."""
    from celery.exceptions import TimeoutError as ResultTimeout

    sent = {}
    for device in devices:
        if device.queue:
            try:
                sent[device.pk] = task.apply_async((str(kind), device.pk, *args), queue=device.queue)
            except Exception as exc:  # the broker is unreachable: that device's row says so
                sent[device.pk] = f"could not ask queue {device.queue}: {type(exc).__name__}: {exc}"
    deadline = time.monotonic() + timeout
    here = _run_here(task, kind, [device for device in devices if not device.queue], *args)
    rows = []
    for device in devices:
        error = ""
        if not device.queue:
            row = here[device.pk]
            if isinstance(row, str):
                error = row
        elif isinstance(sent[device.pk], str):
            error = sent[device.pk]
        else:
            try:
                row = sent[device.pk].get(timeout=max(0.1, deadline - time.monotonic()))
            except ResultTimeout:
                error = f"no answer from a worker of queue {device.queue} in {timeout:.0f} s"
            except Exception as exc:  # the worker's task failed: say so in the device's row
                error = f"{type(exc).__name__}: {exc}"
        rows.append({**blank, **({"error": error} if error else row), "device": device.name})
    return rows


def _run_here(task, kind: str, devices: list[Switch | Host], *args) -> dict[int, dict | str]:
    """``task(kind, device id, *args)`` in this process for each of ``devices`` (the central worker's), side by
    side on up to ``DEVICE_SESSION_THREADS`` threads — one after another, twenty switches' sessions took minutes
    and the admin's page timed out at the proxy; by id: its answer, or why it failed. One at a time within a
    transaction (a thread's connection would not see its rows) or on SQLite."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection, connections

    def one(device, threaded: bool) -> dict | str:
        try:
            return task(str(kind), device.pk, *args)
        except Exception as exc:  # e.g. driver arguments its driver cannot use: that device's row says so
            logger.exception("%s of %s %s failed", task.name, kind, device.name)
            return f"{type(exc).__name__}: {exc}"
        finally:
            if threaded:
                connections.close_all()  # (this thread's)

    if len(devices) < 2 or connection.vendor != "postgresql" or connection.in_atomic_block:
        return {device.pk: one(device, False) for device in devices}
    with ThreadPoolExecutor(max_workers=min(len(devices), settings.DEVICE_SESSION_THREADS)) as pool:
        # each with a copy of this context: who asked (the audit's actor) goes along
        futures = {d.pk: pool.submit(contextvars.copy_context().run, one, d, True) for d in devices}
        return {pk: future.result() for pk, future in futures.items()}


def reconcile_later(
    kind: str,
    device: Switch | Host,
    repair: bool | None = None,
    *,
    actor: str = convergence.PERIODIC_RECONCILER,
    **options,
) -> None:
    """Send ``reconcile_device`` for ``device`` to the queue of the worker that reaches it (its repairs audited as
    ``actor``)."""
    if device.queue:
        options["queue"] = device.queue
    reconcile_device.apply_async((str(kind), device.pk, repair, actor), **options)


@shared_task(
    name="network.reconcile_agent_hosts_at_start",
    bind=True,
    max_retries=20,
    soft_time_limit=settings.CELERY_TASK_SOFT_TIME_LIMIT,
)
def reconcile_agent_hosts_at_start(self, queues: list[str]) -> list[str]:
    """Sent by a worker as it starts, to one of its own ``queues``: ``reconcile_agent_hosts`` for them, again
    (2 s, 4 s, … up to a minute apart, some 15 minutes in all; the message expires after 20) while the database
    cannot be reached."""
    from django.db import InterfaceError, OperationalError, close_old_connections

    try:
        hosts = reconcile_agent_hosts(set(queues))
    except (OperationalError, InterfaceError) as exc:  # (not reachable yet; a refusal of its role would stay)
        close_old_connections()
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1))) from None
    if hosts:
        logging.getLogger("network.agent").info("reconciling this agent's hosts at start: %s", ", ".join(hosts))
    return hosts


def reconcile_agent_hosts(queues: set[str]) -> list[str]:
    """Send ``reconcile_device`` (repairing as ``RECONCILE_REPAIR`` says) for every enabled host whose
    ``agent_queue`` is one of ``queues`` — a worker's, as it starts. Their names."""
    hosts = list(Host.objects.filter(enabled=True, agent_queue__in=sorted(q for q in queues if q)).order_by("name"))
    for host in hosts:
        reconcile_later(DeviceKind.HOST, host, None, expires=settings.RECONCILE_INTERVAL)
    return [h.name for h in hosts]


@shared_task(name="network.reconcile_device", acks_late=True, soft_time_limit=settings.CELERY_TASK_SOFT_TIME_LIMIT)
def reconcile_device(
    kind: str, device_id: int, repair: bool | None = None, actor: str = convergence.PERIODIC_RECONCILER
) -> dict:
    """Compare one device with the desired state; record drift; repair when ``repair`` (default
    ``RECONCILE_REPAIR``), audited as ``actor``."""
    repair = settings.RECONCILE_REPAIR if repair is None else repair
    device = _device(kind, device_id)
    if device is None:
        return {"device": None, "busy": False, "drift": [], "repaired": False, "error": _GONE}
    with audit_actor(actor):
        report = convergence.reconcile_device(kind, device, repair=repair)
    return {
        "device": report.device,
        "busy": report.busy,
        "drift": [str(d) for d in report.drifts],
        "repaired": report.repaired,
        "error": report.error,
    }


@shared_task(name="network.prune_history")
def prune_history() -> dict[str, int]:
    """Periodic (hourly): the device history older than ``HISTORY_RETENTION`` days that nothing reads any more."""
    return services.history_prune()
