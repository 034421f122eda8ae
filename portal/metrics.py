"""Prometheus metrics (text exposition format 0.0.4) computed from the database at scrape time, so every web
worker process answers the same and nothing is lost on a restart: what operators alert on — clusters by
state, how long the last hour's clusters took to become ready, VLAN pool usage, device work that is queued
or stuck, recent device failures, open drift, valid access credentials, webhooks falling behind, access
gateways that stopped pulling or whose certificates are about to end, periodic tasks that stopped succeeding,
devices the reconciler cannot reach, a broker this process cannot reach. Each family is one aggregate query
(webhooks: one per webhook; open device work, recent failures and recent READY steps use partial and time
indexes, so a scrape stays cheap however long the history grows)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Count, Func, Min, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT = timedelta(hours=1)


@dataclass
class Family:
    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    kind: str = "gauge"

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    lines = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{fam.name}{{{inner}}} {value:g}" if inner else f"{fam.name} {value:g}")
    return "\n".join(lines) + "\n"


def collect() -> list[Family]:
    from access.models import Credential, CredentialKind, Gateway, GatewaySession
    from access.selectors import bastion_shared_addresses, bastions_forward_by_address, gateway_state_age
    from clusters.models import ClusterEvent, ClusterState, ClusterStep, PublicPrefix, VirtualCluster, Webhook
    from clusters.selectors import public_prefix_usage
    from network.models import DeviceChange, DeviceKind, Drift, VlanPool
    from network.selectors import pool_usage

    now = timezone.now()
    families = []

    clusters = Family("virtcloud_clusters", "Virtual clusters by state.")
    by_state = Counter(dict(VirtualCluster.objects.values_list("state").annotate(n=Count("id")).order_by()))
    for state in ClusterState.values:
        clusters.add(by_state[state], state=state)
    families.append(clusters)

    ready = list(
        ClusterStep.objects.filter(name="ready", status="ok", finished_at__gte=now - RECENT)
        .values_list("finished_at", "cluster__created_at")
        .order_by()
    )
    took = sorted((done - created).total_seconds() for done, created in ready)
    made = Family("virtcloud_clusters_provisioned_recent", "Clusters that became ready in the last hour.")
    made.add(len(took))
    families.append(made)
    latency = Family(
        "virtcloud_cluster_provision_seconds_recent",
        "Request to READY of the clusters that became ready in the last hour, by quantile (0 when none).",
    )
    for q in (0.5, 0.95, 1.0):
        latency.add(took[max(0, math.ceil(q * len(took)) - 1)] if took else 0, quantile=f"{q:g}")  # nearest rank
    families.append(latency)

    vlans = Family(
        "virtcloud_vlan_ids",
        "VLAN ids of each pool: free, allocated, or in quarantine (held back: the hold-down time, or an access "
        "gateway's state that may still map them).",
    )
    pools = list(VlanPool.objects.order_by("name"))
    usage = pool_usage(pools)
    for pool in pools:
        for state in ("free", "allocated", "quarantined"):
            vlans.add(usage[pool.pk][state], pool=pool.name, state=state)
    families.append(vlans)

    subnets = Family(
        "virtcloud_public_subnets",
        "Subnets of each public prefix: free, allocated to live clusters, or resting (given back less than "
        "PUBLIC_SUBNET_HOLD_DOWN ago). None free: a public cluster is refused (409).",
    )
    prefixes = list(PublicPrefix.objects.order_by("name"))
    usage = public_prefix_usage(prefixes)
    for prefix in prefixes:
        for state in ("free", "allocated", "resting"):
            subnets.add(usage[prefix.pk][state], prefix=prefix.name, state=state)
    families.append(subnets)

    open_work = DeviceChange.objects.filter(status__in=DeviceChange.OPEN)
    queued = Family("virtcloud_device_changes_open", "Device changes not finished yet (queued or running).")
    counts = Counter(
        {(k, s): n for k, s, n in open_work.values_list("kind", "status").annotate(n=Count("id")).order_by()}
    )
    for kind in DeviceKind.values:
        for status in DeviceChange.OPEN:
            queued.add(counts[(kind, status)], kind=kind, status=status)
    families.append(queued)
    oldest = open_work.aggregate(oldest=Min("created_at"))["oldest"]
    age = Family(
        "virtcloud_device_changes_oldest_open_seconds",
        "Age of the oldest unfinished device change (0 when none): device work that is stuck.",
    )
    age.add((now - oldest).total_seconds() if oldest else 0)
    families.append(age)
    families.append(_oldest_by_queue(open_work, now))

    behind = Family("virtcloud_webhook_events_behind", "Cluster events a webhook has not received yet.")
    failing = Family("virtcloud_webhook_failures", "Failed deliveries in a row of a webhook (0: keeping up).")
    stopped = Family(
        "virtcloud_webhook_stopped",
        "An enabled webhook that gets nothing: the token it was registered with is revoked, expired or lost the "
        "feed's scope, or its owner may no longer have it (1); it is not counted as behind.",
    )
    # the webhooks that get the feed (one that stopped never moves: not "behind"), their backlog counted in the
    # same query
    later = ClusterEvent.objects.filter(id__gt=OuterRef("last_event_id")).order_by()
    later = later.values(n=Func("id", function="COUNT"))
    fed = set(Webhook.deliverable().values_list("pk", flat=True))
    rows = (
        Webhook.objects.filter(enabled=True)
        .select_related("owner", "token")
        .annotate(backlog=Coalesce(Subquery(later), 0))
        .order_by("owner__username", "name")
    )
    for hook in rows:
        who = {"webhook": hook.name, "owner": hook.owner.get_username() if hook.owner else ""}  # ("": the admin's)
        if hook.pk in fed and hook.token_allows():
            behind.add(hook.backlog, **who)
            failing.add(hook.failures, **who)
        else:
            stopped.add(1, **who)
    families += [behind, failing, stopped]

    # A gateway authorizes from the state it last pulled: one that stopped pulling still admits the holders of
    # credentials revoked since, until GATEWAY_STATE_MAX_AGE after its last pull, when it refuses everyone; and
    # the VLAN ids released since wait for it (or for that expiry) before they go to another cluster. Alert
    # well before GATEWAY_STATE_MAX_AGE.
    connected = Family(
        "virtcloud_gateway_sessions",
        "Sessions up through each enabled access gateway, by kind, as it last reported (VPN: one per peer; SSH: "
        "logins); no sample for a gateway that never reported.",
    )
    per_gateway = Counter(
        {
            (g, k): n
            for g, k, n in GatewaySession.objects.filter(gateway__enabled=True)
            .values_list("gateway__name", "kind")
            .annotate(n=Sum("count"))
            .order_by()
        }
    )
    for name in Gateway.objects.filter(enabled=True, sessions_reported_at__isnull=False).values_list("name", flat=True):
        for kind in GatewaySession.Kind.values:
            connected.add(per_gateway[(name, kind)], gateway=name, kind=kind)
    families.append(connected)

    pulls = Family(
        "virtcloud_gateway_pull_age_seconds",
        "Seconds since an enabled access gateway last pulled its state (since it was enrolled, if never).",
    )
    # A gateway that pulls but cannot install (a full disk) looks fine above and not here: released VLAN ids
    # wait for this age to pass their release, and at GATEWAY_STATE_MAX_AGE the gateway refuses everyone.
    installed = Family(
        "virtcloud_gateway_state_age_seconds",
        "Seconds since the newest change every access gateway's installed state is known to hold was made "
        "(since it was enrolled, if it never said); disabled gateways too: they hold released VLAN ids back.",
    )
    # VPN profiles pin a gateway's TLS certificate and SSH bundles trust its host certificate: when one ends, every
    # user is refused there. Renew by re-enrolling (``gateway config --re-enrol``) before.
    expiry = Family(
        "virtcloud_gateway_certificate_expiry_seconds",
        "Seconds until an enabled access gateway's certificate ends (tls: its OpenVPN server's, ssh: its "
        "bastion's host certificate; negative: ended). Re-enrol the gateway before.",
    )
    gateways = list(Gateway.objects.order_by("name"))
    for gateway in gateways:
        if gateway.enabled:
            pulls.add((now - (gateway.last_pull_at or gateway.created_at)).total_seconds(), gateway=gateway.name)
            for kind, ends in _certificates_end(gateway).items():
                expiry.add((ends - now).total_seconds(), gateway=gateway.name, certificate=kind)
        installed.add(gateway_state_age(gateway, now).total_seconds(), gateway=gateway.name)
    families += [pulls, installed, expiry]
    shared = Family(
        "virtcloud_bastion_shared_addresses",
        "Node addresses more than one cluster uses that the SSH bastion therefore relays to for none of them "
        "(it forwards by address): their closed clusters' users reach those nodes through the VPN only.",
    )
    shared.add(len(bastion_shared_addresses()) if bastions_forward_by_address(gateways) else 0)
    families.append(shared)

    families.append(
        _by_kind(
            "virtcloud_device_changes_failed_recent",
            "Device changes created in the last hour that failed.",
            DeviceChange.objects.filter(created_at__gte=now - RECENT, status=DeviceChange.Status.FAILED),
            DeviceKind.values,
        )
    )
    families += _periodic(now)
    families.append(_broker())
    families += _reconciled(now)
    families.append(
        _by_kind(
            "virtcloud_drift_open",
            "Drift found on devices and not repaired yet, by kind.",
            Drift.objects.filter(repaired_at__isnull=True),
            Drift.Kind.values,
        )
    )
    families.append(
        _by_kind(
            "virtcloud_access_credentials_valid",
            "Access credentials valid now (not expired, not revoked).",
            # by kind, so that the (kind, revoked_at, not_after) index serves it: credentials are never
            # pruned, and without a kind the count read them all at every scrape
            Credential.objects.filter(
                kind__in=CredentialKind.values, revoked_at__isnull=True, not_before__lte=now, not_after__gt=now
            ),
            CredentialKind.values,
        )
    )
    return families


def _periodic(now) -> list[Family]:
    """Per periodic task (beat's schedule): seconds since it last succeeded (absent: never yet) and its interval
    — alert when the age passes a few intervals (beat down, or the worker of its queue)."""
    from portal.models import PeriodicRun
    from portal.periodic import beat_intervals

    intervals = beat_intervals()
    age = Family(
        "virtcloud_periodic_task_success_age_seconds",
        "Seconds since each periodic task last succeeded: growing past a few intervals, beat or its worker is "
        "down (no sample: it never has).",
    )
    interval = Family("virtcloud_periodic_task_interval_seconds", "How often beat runs each periodic task.")
    last = dict(PeriodicRun.objects.filter(last_success_at__isnull=False).values_list("task", "last_success_at"))
    for task in sorted(intervals):
        interval.add(intervals[task], task=task)
        if task in last:
            age.add(max(0.0, (now - last[task]).total_seconds()), task=task)
    return [age, interval]


def _broker() -> Family:
    """Whether this process reaches the Celery broker now (one connection, a second at most): 0 means created
    clusters stay REQUESTED and nothing is provisioned or torn down until it is back (``clusters.expire`` then
    sends what waited)."""
    from portal.broker import reachable
    from portal.celery import app

    family = Family(
        "virtcloud_broker_reachable",
        "1 when the web server reaches the Celery broker now; 0: no workflow can be sent (clusters stay requested).",
    )
    family.add(1 if reachable(app) else 0)
    return family


def _reconciled(now) -> list[Family]:
    """Enabled devices whose last reconcile failed, and those the reconciler has not compared for three
    intervals (or ever): unreachable, or their worker queue has no worker. One query per device kind."""
    from django.conf import settings

    from network.models import Host, Switch

    since = now - timedelta(seconds=3 * settings.RECONCILE_INTERVAL)
    failing = Family(
        "virtcloud_devices_reconcile_failing",
        "Enabled devices whose last reconcile failed (admin: the device's reconcile error).",
    )
    overdue = Family(
        "virtcloud_devices_reconcile_overdue",
        "Enabled devices not compared with the desired state for 3 reconcile intervals, or never.",
    )
    for kind, model in (("switch", Switch), ("host", Host)):
        counts = model.objects.filter(enabled=True).aggregate(
            failing=Count("pk", filter=~Q(reconcile_error="")),
            overdue=Count("pk", filter=Q(last_reconciled_at__isnull=True) | Q(last_reconciled_at__lt=since)),
        )
        failing.add(counts["failing"], kind=kind)
        overdue.add(counts["overdue"], kind=kind)
    return [failing, overdue]


def _certificates_end(gateway) -> dict:
    """When the gateway's certificates that can be read end, by kind (tls, ssh)."""
    from access import pki, ssh

    ends = {}
    if gateway.server_certificate:
        try:
            ends["tls"] = pki.load_cert_pem(gateway.server_certificate.encode()).not_valid_after_utc
        except ValueError:
            pass
    if (host := ssh.certified_key(gateway.ssh_host_certificate)) is not None:
        ends["ssh"] = host[2]
    return ends


def _by_kind(name: str, help_text: str, rows, kinds: list[str]) -> Family:
    """A family with one sample per ``kind`` (zeros included): ``rows`` counted by their ``kind`` column."""
    counts = Counter(dict(rows.values_list("kind").annotate(n=Count("id")).order_by()))
    family = Family(name, help_text)
    for kind in kinds:
        family.add(counts[kind], kind=kind)
    return family


def _oldest_by_queue(open_work, now) -> Family:
    """Per worker queue the devices use (a site's worker, a host's agent, the central worker's), the age of
    its oldest unfinished device change: a queue whose worker is gone keeps growing while the others stay
    near 0. One aggregate query per device kind, plus the queues of the idle devices."""
    from django.conf import settings

    from network.selectors import device_queues

    default = settings.CELERY_TASK_DEFAULT_QUEUE
    family = Family(
        "virtcloud_device_changes_oldest_open_by_queue_seconds",
        "Age of the oldest unfinished device change per worker queue (0 when none): a worker that is down.",
    )
    oldest: dict[str, float] = dict.fromkeys(device_queues(), 0)
    per_kind = (
        ("switch", ("switch__worker_queue", "switch__site__worker_queue")),
        ("host", ("host__agent_queue", "host__site__worker_queue")),
    )
    for kind, columns in per_kind:
        rows = open_work.filter(kind=kind).values_list(*columns).annotate(first=Min("created_at")).order_by()
        for own, site, first in rows:
            queue = own or site or default  # ``queue_name`` in SQL; a device gone from the inventory: central
            oldest[queue] = max(oldest.get(queue, 0), (now - first).total_seconds())
    for queue in sorted(oldest):
        family.add(oldest[queue], queue=queue)
    return family
