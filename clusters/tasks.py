"""Celery tasks of the cluster workflows. They take ids, claim their work with conditional UPDATEs (via the
services) and carry the workflow generation so that a stale callback changes nothing."""

from __future__ import annotations

import logging

from celery import shared_task

from clusters import services
from clusters.models import ClusterState, ClusterStep, Connectivity, VirtualCluster
from network import selectors as net_selectors
from network.errbacks import describe, handed_on

logger = logging.getLogger(__name__)


def _cluster(cluster_id: int) -> VirtualCluster | None:
    return VirtualCluster.objects.filter(pk=cluster_id).first()


@shared_task(name="clusters.provision_begin")
def provision_begin(cluster_id: int, generation: int) -> None:
    """Kept for workflows sent before ``start_provision`` marked PROVISIONING itself."""
    services.cluster_provisioning_started(cluster_id=cluster_id, generation=generation)


@shared_task(name="clusters.gateway_leg")
def gateway_leg(cluster_id: int, generation: int) -> None:
    """Closed clusters: the segment already includes the gateway trunks; the gateways learn the cluster's
    VLAN from the map they pull. Public clusters: the provider router serves the public subnet."""
    cluster = _cluster(cluster_id)
    if cluster is None or cluster.workflow_generation != generation:
        return
    services.steps_finish_running(cluster, "network", generation=generation)
    if cluster.connectivity == Connectivity.CLOSED:
        detail = f"access gateway trunks carry VLAN {cluster.vlan_id}"
    else:
        detail = f"public subnet {cluster.public_subnet}, router {cluster.public_gateway}"
    if (step := services.step_start_once(cluster, "gateway", detail=detail)) is not None:
        services.step_finish(step)


@shared_task(name="clusters.provision_done")
def provision_done(cluster_id: int, generation: int) -> None:
    services.cluster_mark_ready(cluster_id=cluster_id, generation=generation, step="ready")


@shared_task(name="clusters.provision_finish")
def provision_finish(cluster_id: int, generation: int) -> None:
    """The last stage of provisioning, after every device reported success: the gateway leg, then READY
    (one task: each stage of a canvas costs a broker round trip)."""
    gateway_leg(cluster_id, generation)
    provision_done(cluster_id, generation)


@shared_task(name="clusters.provision_failed")
def provision_failed(request, exc, traceback, cluster_id: int, generation: int) -> None:
    """Errback: the first failure claims the compensation (generation bump); later ones do nothing."""
    if handed_on(provision_failed, request, exc, cluster_id, generation):
        return
    services.cluster_provisioning_failed(cluster_id=cluster_id, generation=generation, reason=describe(exc))


@shared_task(name="clusters.failed")
def failed(cluster_id: int, generation: int, reason: str) -> None:
    """The rollback went through every device: FAILED with the reason. A device that could not be converged
    back keeps the VLAN allocated (the network's periodic rollback retries it): the compensate step fails
    with that, and the reason says so."""
    cluster = _cluster(cluster_id)
    if cluster is None:
        return
    if net_selectors.segment_compensating(cluster.segment_id):
        # a duplicate of the rollback's message (redelivered after the rollback was sent, or an errback Celery
        # called twice) found it running elsewhere and handed on at once: that rollback's own chain ends the
        # cluster once every device is tried, with what it kept (ended here, "ok" and no VLAN kept said)
        logger.info("cluster %s: its network's rollback is still running; its own chain ends the cluster", cluster_id)
        return
    kept = net_selectors.rollback_kept(cluster.segment_id)
    if kept:
        kept = f"rollback incomplete, {kept} (retried until every device is clean)"
    services.steps_finish_running(cluster, "compensate", generation=generation, error=kept)
    services.cluster_fail(cluster_id=cluster_id, generation=generation, reason=f"{reason}; {kept}" if kept else reason)


@shared_task(name="clusters.compensation_failed")
def compensation_failed(request, exc, traceback, cluster_id: int, generation: int, reason: str) -> None:
    if handed_on(compensation_failed, request, exc, cluster_id, generation, reason):
        return
    cluster = _cluster(cluster_id)
    if cluster is None:
        return
    detail = describe(exc)
    services.steps_finish_running(cluster, "compensate", generation=generation, error=detail)
    services.cluster_fail(
        cluster_id=cluster_id,
        generation=generation,
        reason=f"{reason}; compensation incomplete ({detail}); the reconciler will repair the devices",
    )


@shared_task(name="clusters.teardown_begin")
def teardown_begin(cluster_id: int, generation: int) -> None:
    cluster = _cluster(cluster_id)
    if cluster is not None and cluster.workflow_generation == generation:
        services.step_start_once(cluster, "teardown")


@shared_task(name="clusters.teardown_done")
def teardown_done(cluster_id: int, generation: int) -> None:
    cluster = _cluster(cluster_id)
    if cluster is None:
        return
    services.steps_finish_running(cluster, "teardown", generation=generation)
    services.cluster_finish_teardown(cluster_id=cluster_id, generation=generation)


@shared_task(name="clusters.teardown_failed")
def teardown_failed(request, exc, traceback, cluster_id: int, generation: int) -> None:
    """The cluster stays TEARING_DOWN with the reason; ``retry_stuck_teardowns`` tries again later."""
    if handed_on(teardown_failed, request, exc, cluster_id, generation):
        return
    cluster = _cluster(cluster_id)
    if cluster is None:
        return
    detail = describe(exc)
    if cluster.workflow_generation == generation:
        # a chain that failed before ``teardown_begin`` recorded the step fails it all the same, or the sweep
        # would take the teardown for one still running and wait for it to be lost (tens of minutes)
        services.step_start_once(cluster, "teardown")
    services.steps_finish_running(cluster, "teardown", generation=generation, error=detail)
    VirtualCluster.objects.filter(
        pk=cluster_id, workflow_generation=generation, state=ClusterState.TEARING_DOWN
    ).update(state_reason=f"teardown incomplete: {detail}"[:2000])


@shared_task(name="clusters.update_done")
def update_done(cluster_id: int, generation: int, step_id: int) -> None:
    """A node change converged (``services.cluster_update_done``)."""
    services.cluster_update_done(cluster_id=cluster_id, generation=generation, step_id=step_id)


@shared_task(name="clusters.update_failed")
def update_failed(request, exc, traceback, cluster_id: int, generation: int, step_id: int) -> None:
    """A node change could not be applied: the step records why; the cluster returns to READY and the
    reconciler keeps the devices at the desired state."""
    if handed_on(update_failed, request, exc, cluster_id, generation, step_id):
        return
    services.cluster_update_failed(
        cluster_id=cluster_id,
        generation=generation,
        steps=ClusterStep.objects.filter(pk=step_id),
        reason=describe(exc),
    )


@shared_task(name="clusters.expire")
def expire() -> list[int]:
    """Periodic: tear down clusters past their lifetime, say which ones come near theirs; retry teardowns that
    got stuck, provisionings that never started, and provisionings and node changes that never reached the
    broker; end provisionings (rolled back) and updates past their deadline; send the rollback of a failed
    cluster's network that was never rolled back; record the lease of a public subnet a process of the release
    before gave out; close a public cluster whose image is no longer approved. Each sweep on its own: one that
    fails (logged, and the task fails after the others ran) does not hold back the rest."""
    ids: list[int] = []
    failed: list[str] = []
    for sweep in (
        services.clusters_expire,
        services.clusters_warn_expiring,
        services.clusters_retry_stuck_teardowns,
        services.clusters_resume_requested,
        services.clusters_resend_unsent,
        services.clusters_resend_unsent_updates,
        services.clusters_resend_lost,
        services.clusters_end_stalled_workflows,
        services.clusters_roll_back_abandoned_networks,
        services.clusters_lease_public_subnets,
        services.clusters_close_unapproved_public,
    ):
        try:
            found = sweep()
        except Exception:  # noqa: BLE001 - logged; the next sweeps still run, the task fails at the end
            logger.exception("clusters.expire: %s failed", sweep.__name__)
            failed.append(sweep.__name__)
            continue
        if sweep is services.clusters_expire:
            ids = found
    if failed:
        raise RuntimeError(f"clusters.expire: {', '.join(failed)} failed (see the log); the other sweeps ran")
    return ids


@shared_task(name="clusters.mail_expiring")
def mail_expiring() -> list[int]:
    """Periodic: an e-mail to the owner of each cluster whose expiry comes within ``CLUSTER_EXPIRY_WARNING``
    (once per expiry; nothing without ``EMAIL_URL``)."""
    return services.clusters_mail_expiring()


@shared_task(name="clusters.mail_failing_webhooks")
def mail_failing_webhooks() -> list[int]:
    """Periodic: an e-mail to the owner of each webhook failing for ``WEBHOOK_ALERT_AFTER`` seconds (once per
    run of failures; nothing without ``EMAIL_URL``)."""
    return services.webhooks_mail_failing()


@shared_task(name="clusters.prune_events")
def prune_events() -> int:
    """Periodic: forget cluster events older than ``CLUSTER_EVENT_RETENTION`` days (the feed's history) and
    the Idempotency-Keys of clusters that ended as long ago."""
    return services.cluster_events_prune()


@shared_task(name="clusters.deliver_webhooks", ignore_result=True)
def deliver_webhooks() -> None:
    """Periodic (every ``WEBHOOK_INTERVAL`` s): push the event feed to every webhook that is due."""
    from clusters import webhooks

    for delivery in webhooks.deliver_due():
        if delivery.error:
            logger.warning("webhook %s: %s (the batch will be sent again)", delivery.webhook, delivery.error)
