"""Celery canvases of the VLAN life-cycle: provisioning, teardown and compensation of a segment.

Each builder records one pending ``DeviceChange`` per device it will converge (the work the device tasks
claim) and returns a Signature for the caller to compose and start after its transaction commits::

    transaction.on_commit(lambda: chain(provision(seg.id), clusters_ready.si(cid)).on_error(fail.s(cid)).delay())

- ``provision``: every switch in parallel → every host in parallel → the segment is ACTIVE. If any device
  fails for good, ``compensate`` runs by itself (it is linked as the error callback of every step) and the
  failure (``DeviceChangeFailed``: device and the device's message) propagates to the caller's errbacks.
  Also used after ``segment_set_hosts``: the devices the segment left are converged too.
- ``teardown`` (after ``services.segment_delete``): hosts → switches → VLAN into quarantine, segment CLOSED.
- ``compensate``: converge back everything the segment touched, release the VLAN, FAILED with the reason.

A layer is one ``converge_devices`` task per ``DEVICE_BATCH_SIZE`` devices (and per worker queue: a
device's task goes to the queue of the worker that reaches it, a host's agent or its site's worker, see
``Switch.queue`` and ``Host.queue``); each converges its devices side by side, one
thread per device, with a fixed number of database queries (``network.convergence.converge_changes``).
Every task is a broker round trip and a worker slot, so a layer of 16 switches is one task, not 16.
A layer of one task is simply the next link of the chain; a layer of several is a ``group`` followed by a
join task (Celery makes it a chord), so the canvas works with any result backend that supports chords
(Redis natively, django-db through ``chord_unlock``); the last layer's join is the canvas's last task
itself (``segment_provisioned``/``segment_released``). The pending changes of all layers are recorded in
one INSERT.
"""

from __future__ import annotations

from celery import chain, group
from celery.canvas import Signature
from django.conf import settings

from network import convergence, selectors, tasks
from network.errors import SegmentClosed
from network.models import Host, Segment, Switch

Chunk = tuple[str, list[int]]  # (queue, "" for the default one; change ids)


def layer(pairs: list[tuple[Switch | Host, int]]) -> list[Chunk]:
    """The tasks of one layer: ``(device, change id)`` pairs in chunks of ``DEVICE_BATCH_SIZE``, each chunk
    on the queue of the worker that reaches its devices (``Switch.queue``, ``Host.queue``: a site's worker,
    a host's agent; "": the central worker)."""
    by_queue: dict[str, list[int]] = {}
    for device, change_id in pairs:
        by_queue.setdefault(device.queue, []).append(change_id)
    size = settings.DEVICE_BATCH_SIZE
    return [(queue, ids[i : i + size]) for queue, ids in by_queue.items() for i in range(0, len(ids), size)]


def _task(queue: str, layers: list[list[int]], finish: tuple | None = None, *, tolerate: bool = False) -> Signature:
    options: dict = {"then": layers[1:]} if len(layers) > 1 else {}
    if finish is not None:
        options["finish"] = list(finish)
    if tolerate:
        options["tolerate"] = True
    sig = tasks.converge_devices.si(layers[0], **options)
    return sig.set(queue=queue) if queue else sig


def layers(
    segment: Segment,
    steps: list[tuple[str, list[Chunk]]],
    finish: str,
    *,
    tolerate: bool = False,
    finish_args: tuple = (),
) -> list[Signature]:
    """One link per non-empty layer of ``steps`` (``(name, chunks)``), in order: its task, or ``group →
    join``; then ``finish`` (``provisioned``: ``segment_provisioned``, ``released``: ``segment_released``,
    ``compensated``: ``segment_compensated``), called with the segment's id and ``finish_args``. ``tolerate``:
    a device that fails stops neither its layer's other devices nor the next layers (a rollback).

    Consecutive layers of one task each on the same queue (switches, then hosts without an agent) become
    ONE task that converges them in turn, and when the last link is such a task on the default queue it
    runs ``finish`` itself: each link saved is a broker round trip. A last group joins straight into
    ``finish``."""
    steps = [(step, chunks) for step, chunks in steps if chunks]
    links: list[Signature | Chunk] = []
    for i, (step, chunks) in enumerate(steps):
        if len(chunks) == 1:
            queue, ids = chunks[0]
            if links and isinstance(links[-1], tuple) and links[-1][0] == queue:
                links[-1][1].append(ids)
            else:
                links.append((queue, [ids]))
            continue
        links.append(group(_task(queue, [ids], tolerate=tolerate) for queue, ids in chunks))
        if i < len(steps) - 1:
            links.append(tasks.segment_step.si(segment.pk, step))
    last = links[-1] if links else None

    def link(item):
        return _task(*item, tolerate=tolerate) if isinstance(item, tuple) else item

    if isinstance(last, tuple) and last[0] == "":
        last_task = _task(*last, finish=(finish, segment.pk, *finish_args), tolerate=tolerate)
        return [*(link(item) for item in links[:-1]), last_task]
    return [*(link(item) for item in links), tasks.FINISH[finish].si(segment.pk, *finish_args)]


def _changes(segment: Segment, devices: list[Switch | Host], cause: str) -> list[tuple]:
    """One pending change per device, recorded in one INSERT: [(device, change id)]."""
    return list(zip(devices, convergence.changes_create(devices=devices, segment=segment, cause=cause), strict=True))


def provision(segment_id: int, *, compensate_on_error: bool = True) -> Signature:
    """Converge every device the segment needs (and any it touched before) to the desired state:
    switches in parallel, then hosts in parallel, then mark the segment ACTIVE (unless what it needs changed
    again meanwhile, ``Segment.revision``: a later provisioning marks it, ``segment_provisioned``)."""
    segment = Segment.objects.get(pk=segment_id)
    if segment.state not in Segment.DESIRED_STATES:
        raise SegmentClosed(f"segment of {segment.owner_ref} is {segment.get_state_display()}; cannot provision")
    switches, hosts = selectors.segment_devices(segment)
    changes = _changes(segment, [*switches, *hosts], f"provision {segment.owner_ref}")
    steps = layers(
        segment,
        [
            ("switches", layer(changes[: len(switches)])),
            ("hosts", layer(changes[len(switches) :])),
        ],
        "provisioned",
        finish_args=(segment.revision,),
    )
    if compensate_on_error:
        errback = compensate(segment.pk)
        for step in steps:
            for sig in step.tasks if isinstance(step, group) else [step]:
                sig.link_error(errback.clone())
    return chain(*steps)


def teardown(segment_id: int) -> Signature:
    """Remove the segment from its devices (hosts first, then switches), then put its VLAN into
    quarantine and close it. The segment must have been marked by ``services.segment_delete``."""
    segment = Segment.objects.get(pk=segment_id)
    if segment.state in Segment.DESIRED_STATES:
        raise SegmentClosed(f"segment of {segment.owner_ref} is {segment.get_state_display()}: delete it first")
    switches, hosts = selectors.segment_devices(segment)
    changes = _changes(segment, [*hosts, *switches], tasks.teardown_cause(segment.owner_ref))
    return chain(
        *layers(
            segment,
            [
                ("hosts", layer(changes[: len(hosts)])),
                ("switches", layer(changes[len(hosts) :])),
            ],
            "released",
        )
    )


def compensate(segment_id: int) -> Signature:
    """The rollback of a failed provisioning, as one task (usable as an error callback:
    ``.on_error(compensate(seg_id))``)."""
    return tasks.segment_compensate.si(segment_id)
