"""The Celery application: the distributed engine for every device operation and workflow."""

import os

from celery import Celery, signals
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# The embedded broker ("filesystem://") in every process (web, worker, beat): kombu's own writer lets a worker
# read a message file before it is written (portal/broker.py). By scheme, so a Redis or AMQP URL is untouched.
TRANSPORT_ALIASES["filesystem"] = "portal.broker:Transport"

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _close_old_connections(**kwargs) -> None:
    """Around every task, what Django does around every request: close this thread's database connections
    that are older than CONN_MAX_AGE or broken (a failed transaction, a server that went away), keep the
    others (Celery's own fix-up would close them all: see CELERY_DB_REUSE_MAX)."""
    from django.db import close_old_connections

    request = getattr(kwargs.get("task"), "request", None)
    if not getattr(request, "is_eager", False):
        close_old_connections()


@signals.task_success.connect
def _periodic_succeeded(sender=None, **kwargs) -> None:
    from portal.periodic import run_record

    run_record(getattr(sender, "name", ""), error=None)


@signals.task_failure.connect
def _periodic_failed(sender=None, exception=None, **kwargs) -> None:
    from portal.periodic import run_record

    run_record(getattr(sender, "name", ""), error=f"{type(exception).__name__}: {exception}")


@signals.worker_ready.connect
@signals.worker_process_init.connect
def _warm_and_freeze(**kwargs) -> None:
    """Once a worker (or a prefork child) has started: import the device drivers now (NAPALM's import takes
    ~1 s, which the first cluster would otherwise wait for, every session thread queued behind the import
    lock), then move everything alive at that point out of the cyclic garbage collector's reach
    (``gc.freeze``): a full collection otherwise walks the whole of Django, Celery and NAPALM, ~100 ms on
    whichever task's path it falls."""
    import gc

    from network.drivers import preload

    preload()
    gc.freeze()


@signals.worker_ready.connect
def _reconcile_agent_hosts(sender=None, **kwargs) -> None:
    """A worker that consumes hosts' ``agent_queue`` (the agent on a hypervisor) reconciles those hosts as it
    starts: a hypervisor that rebooted lost its Linux bridges (netlink's are not persistent), and its VMs cannot
    start until they are back — not ``RECONCILE_INTERVAL`` later. Asked of its own queues through the broker
    (up by now), the task finds the hosts, retrying while the database is not reachable yet."""
    import logging

    try:
        queues = sorted(q.name for q in sender.task_consumer.queues)
    except AttributeError:  # (not a worker's consumer: nothing to go by)
        return
    if not queues:
        return
    from network.tasks import reconcile_agent_hosts_at_start

    try:
        reconcile_agent_hosts_at_start.apply_async((queues,), queue=queues[0], expires=1200)
    except Exception as exc:  # the broker went away again: the periodic reconcile comes
        logging.getLogger("network.agent").warning("could not ask for this agent's hosts' reconcile: %s", exc)


@signals.worker_ready.connect
def _agent_role_check(**kwargs) -> None:
    """A host agent (``PORTAL_ROLE=agent``) says when its database role reaches more than an agent's
    (``network.agentdb``): a VM escaping onto the hypervisor would find that role."""
    from django.conf import settings

    if not settings.AGENT:
        return
    import logging

    from django.db import DatabaseError, connection

    from network import agentdb

    try:
        reason = agentdb.unrestricted()
    except DatabaseError as exc:
        reason = f"its privileges could not be read ({exc})"
    finally:
        connection.close()
    if reason:
        user = connection.settings_dict.get("USER") or "?"
        logging.getLogger("network.agent").warning(
            "PORTAL_ROLE=agent on database role %s, which is not restricted to an agent's privileges: %s. Give the "
            "agent a role of its own: manage.py network agent-grants ROLE --host NAME --apply",
            user,
            reason,
        )


def queue_consumers(timeout: float = 1.0) -> dict[str, list[str]]:
    """Which workers consume which queue, as the workers answer a broadcast within ``timeout`` s: queue →
    worker names (a queue nobody consumes is absent)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    consumers: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for queue in queues:
            consumers.setdefault(queue["name"], []).append(worker)
    return {queue: sorted(workers) for queue, workers in consumers.items()}
