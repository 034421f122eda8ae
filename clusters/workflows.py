"""The cluster workflows as Celery canvases (paper §3 "VLAN life cycle"; DESIGN "Flow of a cluster").

provision: begin → network provision (switches in parallel → hosts in parallel) → gateway leg → READY;
any failure → compensation (every touched device converged back, VLAN released) → FAILED with the reason.
teardown:  network teardown (hosts → switches → VLAN to quarantine) → TORN_DOWN → credentials revoked.
update:    (nodes added/removed, migration, connectivity change) network converge → READY.

Each callback carries the cluster's workflow generation, so a late callback of an older workflow does
nothing.
"""

from __future__ import annotations

import functools
import logging

from celery import chain
from django.db import transaction

from clusters import services, tasks
from clusters.models import VirtualCluster
from network import workflows as net_workflows

logger = logging.getLogger(__name__)


def _never_raise(func):
    """Workflows start after commit, outside the request's transaction: a broker outage must not turn a
    created cluster into a 500. The cluster keeps its state and ``clusters.expire`` restarts it (a rollback
    that was not sent: the provisioning deadline ends the cluster FAILED, then its network's rollback is sent
    again, ``services.clusters_roll_back_abandoned_networks``)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            func(*args, **kwargs)
        except Exception:
            logger.exception("could not start %s%r; the periodic task will retry", func.__name__, args)

    return wrapper


@_never_raise
def start_provision(cluster_id: int, generation: int) -> None:
    """Runs after the create request committed. Every stage of a canvas is a broker round trip (≈ 10-20 ms
    on a loaded worker), so the cluster's own bookkeeping is not a stage of its own: PROVISIONING is marked
    here, before the workflow is sent (and undone if it cannot be sent, so that ``clusters.expire`` sends
    it again), and the gateway leg and READY are one last task."""
    segment_id = VirtualCluster.objects.values_list("segment_id", flat=True).get(pk=cluster_id)
    with transaction.atomic():  # the device changes the canvas records: one commit, not one per device
        step = services.cluster_provisioning_started(cluster_id=cluster_id, generation=generation)
        if step is None:  # a later generation took the cluster over (a sweep resumed it): it sends its own
            return
        network = net_workflows.provision(segment_id, compensate_on_error=False)
    try:
        chain(
            network,
            tasks.provision_finish.si(cluster_id, generation),
        ).on_error(tasks.provision_failed.s(cluster_id, generation)).apply_async()
    except Exception:
        services.cluster_provisioning_not_started(cluster_id=cluster_id, generation=generation, step=step)
        raise
    services.cluster_workflow_sent(cluster_id=cluster_id, generation=generation)


@_never_raise
def start_compensation(cluster_id: int, generation: int, reason: str) -> None:
    segment_id = VirtualCluster.objects.values_list("segment_id", flat=True).get(pk=cluster_id)
    chain(
        net_workflows.compensate(segment_id),
        tasks.failed.si(cluster_id, generation, reason),
    ).on_error(tasks.compensation_failed.s(cluster_id, generation, reason)).apply_async()


def roll_back_network(segment_id: int) -> None:
    """Send the rollback of a failed cluster's network alone (its cluster has ended already); raises when it
    cannot be sent."""
    net_workflows.compensate(segment_id).apply_async()


@_never_raise
def start_teardown(cluster_id: int, generation: int) -> None:
    segment_id = VirtualCluster.objects.values_list("segment_id", flat=True).get(pk=cluster_id)
    steps = [tasks.teardown_begin.si(cluster_id, generation)]
    if segment_id is not None:
        steps.append(net_workflows.teardown(segment_id))
    steps.append(tasks.teardown_done.si(cluster_id, generation))
    chain(*steps).on_error(tasks.teardown_failed.s(cluster_id, generation)).apply_async()
    services.cluster_workflow_sent(cluster_id=cluster_id, generation=generation)


@_never_raise
def start_update(cluster_id: int, generation: int, step_id: int) -> None:
    segment_id = VirtualCluster.objects.values_list("segment_id", flat=True).get(pk=cluster_id)
    chain(
        net_workflows.provision(segment_id, compensate_on_error=False),
        tasks.update_done.si(cluster_id, generation, step_id),
    ).on_error(tasks.update_failed.s(cluster_id, generation, step_id)).apply_async()
    services.cluster_workflow_sent(cluster_id=cluster_id, generation=generation)
