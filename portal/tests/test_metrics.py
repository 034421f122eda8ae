"""``GET /metrics``: who may scrape it, and that it says what the database holds, in a format Prometheus's own
parser reads."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from access.models import Credential, CredentialKind, Gateway
from clusters.models import ClusterState, ClusterStep, Image, VirtualCluster
from network.models import DeviceChange, Drift, Host, Site, VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def scraper(user, scopes) -> APIClient:
    _, secret = token_create(user=user, name="prometheus", scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def samples(text: str) -> dict[tuple, float]:
    """{(metric name, sorted labels): value}, parsed by the reference parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_who_may_scrape(alice, root):
    assert APIClient().get("/metrics").status_code in (401, 403)
    assert scraper(alice, [TokenScope.CLUSTERS_READ, TokenScope.NETWORK_READ]).get("/metrics").status_code == 403
    session = APIClient()
    session.force_login(alice)
    assert session.get("/metrics").status_code == 403  # a user's browser
    r = scraper(alice, [TokenScope.METRICS]).get("/metrics")
    assert r.status_code == 200
    assert r["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert r["Cache-Control"] == "no-store"
    session.force_login(root)
    assert session.get("/metrics").status_code == 200
    denied = APIClient().get("/metrics")
    assert denied["Content-Type"].startswith("text/plain")  # errors in the same format, not a JSON body


def test_the_figures_are_what_the_database_holds(fabric, alice):
    Image.objects.create(name="my-own", approved=False)
    api = APIClient()
    api.force_authenticate(alice)
    ids = []
    for k, host in enumerate(("brno1", "pilsen1", "prague1")):
        r = api.post(
            "/api/clusters/",
            {
                "name": f"c{k}",
                "image": "my-own",
                "lifetime": 3600,
                "nodes": [{"name": "n", "host": host, "mac": f"52:54:00:00:00:0{k}"}],
            },
            format="json",
        )
        assert r.status_code == 201, r.content
        ids.append(r.data["id"])
    assert api.post(f"/api/clusters/{ids[0]}/teardown/", {}, format="json").status_code == 202
    assert VirtualCluster.objects.get(pk=ids[0]).state == ClusterState.TORN_DOWN
    now = timezone.now()
    # request → READY took 1, 2 and 3 s (the torn-down cluster counts: it was ready within the hour)
    for seconds, cid in enumerate(ids, 1):
        ClusterStep.objects.filter(cluster_id=cid, name="ready").update(finished_at=now)
        VirtualCluster.objects.filter(pk=cid).update(created_at=now - timedelta(seconds=seconds))
    stuck = DeviceChange.objects.create(kind="switch", device="sw-brno", cause="test", status="pending")
    DeviceChange.objects.filter(pk=stuck.pk).update(created_at=now - timedelta(minutes=5))
    DeviceChange.objects.create(kind="host", device="brno1", cause="test", status="running")
    DeviceChange.objects.create(kind="host", device="brno1", cause="test", status="failed", error="no")
    old = DeviceChange.objects.create(kind="host", device="brno1", cause="test", status="failed", error="no")
    DeviceChange.objects.filter(pk=old.pk).update(created_at=now - timedelta(hours=2))
    # a host behind an agent that is down: its change waits on the agent's queue; prague's site worker is idle
    Host.objects.filter(name="pilsen1").update(agent_queue="host.pilsen1")
    Site.objects.filter(name="prague").update(worker_queue="site.prague")
    waiting = DeviceChange.objects.create(
        kind="host", device="pilsen1", host=Host.objects.get(name="pilsen1"), cause="test", status="pending"
    )
    DeviceChange.objects.filter(pk=waiting.pk).update(created_at=now - timedelta(seconds=100))
    Drift.objects.create(device_kind="switch", device="sw-brno", port="h1", kind="missing", vlans="150")
    Drift.objects.create(device_kind="switch", device="sw-brno", port="h1", kind="stale", vlans="151", repaired_at=now)
    for serial, (kind, revoked, not_after) in enumerate(
        [
            ("vpn", None, now + timedelta(days=1)),
            ("vpn", now, now + timedelta(days=1)),  # revoked
            ("ssh", None, now - timedelta(minutes=1)),  # expired
            ("ssh", None, now + timedelta(hours=1)),
        ],
        1,
    ):
        Credential.objects.create(
            kind=kind,
            serial=serial,
            user=alice,
            key_id=f"k{serial}",
            fingerprint=f"f{serial}",
            not_before=now - timedelta(days=2),
            not_after=not_after,
            revoked_at=revoked,
        )

    gateways = [Gateway.objects.create(name=n, address=f"198.18.100.{i}") for i, n in enumerate(("gw1", "gw2", "off"))]
    Gateway.objects.filter(name="gw1").update(last_pull_at=now - timedelta(seconds=90))
    Gateway.objects.filter(name="gw2").update(created_at=now - timedelta(hours=1))  # enrolled, never pulled
    Gateway.objects.filter(pk=gateways[2].pk).update(enabled=False)
    Gateway.objects.filter(name="gw1").update(state_as_of=now - timedelta(seconds=700))  # pulls, cannot install
    from access import services as access_services

    access_services.gateway_enrol(gateway=gateways[0])  # gw1's certificates: a year; gw2 has none yet

    prometheus = scraper(alice, [TokenScope.METRICS])
    with CaptureQueriesContext(connection) as ctx:
        r = prometheus.get("/metrics")
    assert r.status_code == 200
    found = samples(r.content.decode())

    def value(name, **labels):
        return found[(name, tuple(sorted(labels.items())))]

    assert value("virtcloud_clusters", state="ready") == 2
    assert value("virtcloud_clusters", state="torn_down") == 1
    assert value("virtcloud_clusters", state="failed") == 0  # every state is there, zeros included
    assert value("virtcloud_clusters_provisioned_recent") == 3
    assert value("virtcloud_cluster_provision_seconds_recent", quantile="0.5") == 2
    assert value("virtcloud_cluster_provision_seconds_recent", quantile="0.95") == 3
    assert value("virtcloud_cluster_provision_seconds_recent", quantile="1") == 3
    pool = fabric.pool
    assert value("virtcloud_vlan_ids", pool=pool.name, state="allocated") == 2
    assert value("virtcloud_vlan_ids", pool=pool.name, state="quarantined") == 1
    assert value("virtcloud_vlan_ids", pool=pool.name, state="free") == len(pool.vlan_ids) - 3
    assert VlanAllocation.objects.filter(pool=pool, state="allocated").count() == 2
    # the clusters' own provisioning and teardown changes are finished: only the two made above are open
    assert value("virtcloud_device_changes_open", kind="switch", status="pending") == 1
    assert value("virtcloud_device_changes_open", kind="host", status="running") == 1
    assert value("virtcloud_device_changes_open", kind="host", status="pending") == 1
    assert 300 <= value("virtcloud_device_changes_oldest_open_seconds") < 400
    by_queue = "virtcloud_device_changes_oldest_open_by_queue_seconds"
    assert 300 <= value(by_queue, queue="celery") < 400  # sw-brno's (no worker queue: the central worker)
    assert 100 <= value(by_queue, queue="host.pilsen1") < 200
    assert value(by_queue, queue="site.prague") == 0
    assert value("virtcloud_device_changes_failed_recent", kind="host") == 1  # not the one from 2 h ago
    assert value("virtcloud_drift_open", kind="missing") == 1
    assert value("virtcloud_drift_open", kind="stale") == 0
    assert value("virtcloud_access_credentials_valid", kind=CredentialKind.VPN) == 1
    assert value("virtcloud_access_credentials_valid", kind=CredentialKind.SSH) == 1
    assert 90 <= value("virtcloud_gateway_pull_age_seconds", gateway="gw1") < 150
    assert 3600 <= value("virtcloud_gateway_pull_age_seconds", gateway="gw2") < 3700
    assert ("virtcloud_gateway_pull_age_seconds", (("gateway", "off"),)) not in found  # disabled: not expected to
    assert 700 <= value("virtcloud_gateway_state_age_seconds", gateway="gw1") < 760
    assert 3600 <= value("virtcloud_gateway_state_age_seconds", gateway="gw2") < 3700
    assert value("virtcloud_gateway_state_age_seconds", gateway="off") < 60  # (made now) still holds VLAN ids
    year = timedelta(days=365).total_seconds()
    for kind in ("tls", "ssh"):
        assert year - 3600 < value("virtcloud_gateway_certificate_expiry_seconds", gateway="gw1", certificate=kind)
        assert value("virtcloud_gateway_certificate_expiry_seconds", gateway="gw1", certificate=kind) < year + 600
    assert not any(
        name == "virtcloud_gateway_certificate_expiry_seconds" and ("gateway", "gw2") in labels
        for name, labels in found
    )  # one aggregate query per family (plus the token's own lookup and last-use update, the newest event and
    # the webhooks — one more per webhook: none here; the gateways; the queues: two for the devices, one per device kind
    # for their changes), whatever the size
    # (+3: periodic, reconciled; +3: public prefixes; +2: gateway sessions)
    assert len(ctx.captured_queries) <= 28, [q["sql"] for q in ctx.captured_queries]


def test_nothing_yet_is_all_zeros(alice):
    found = samples(scraper(alice, [TokenScope.METRICS]).get("/metrics").content.decode())
    assert found[("virtcloud_device_changes_oldest_open_seconds", ())] == 0
    assert all(v == 0 for (name, _), v in found.items() if name == "virtcloud_clusters")
    assert found[("virtcloud_cluster_provision_seconds_recent", (("quantile", "0.5"),))] == 0


def test_addresses_the_bastion_withholds_are_counted(root):
    """Two closed clusters give a node the same address: the bastion relays to neither (see access), and the
    operator sees how many such addresses there are."""
    from access.tests.fixtures import make_cluster
    from clusters.models import Node

    def shared() -> float:
        text = scraper(root, [TokenScope.METRICS]).get("/metrics").content.decode()
        return samples(text)[("virtcloud_bastion_shared_addresses", ())]

    Gateway.objects.create(name="gw", kind="both", address="198.18.100.1")  # one bastion for every cluster
    first, second = make_cluster(root, name="one"), make_cluster(root, name="two")
    Node.objects.filter(cluster=first).update(address="10.0.0.5")
    Node.objects.filter(cluster=second).update(address="10.0.0.6")
    assert shared() == 0
    Node.objects.filter(cluster=second).update(address="10.0.0.5")
    assert shared() == 1
    Gateway.objects.update(ssh_port_base=30000)  # a bastion per cluster tells them apart: nothing withheld
    assert shared() == 0


def test_periodic_tasks_say_when_they_last_succeeded(alice, settings, monkeypatch):
    """Each periodic task records how it ended (the worker's signals); /metrics gives the age of its last success
    and its interval, so that beat or its worker being down shows as a growing age (clusters stop expiring, the
    provisioning deadline, the webhooks and the sweeps stop) — it was quiet, and the drift figures read 0."""
    from clusters import services, tasks
    from portal.models import PeriodicRun

    settings.CELERY_BEAT_SCHEDULE = {
        **settings.CELERY_BEAT_SCHEDULE,
        "clusters-expire": {"task": "clusters.expire", "schedule": 60.0, "options": {"expires": 60.0}},
    }
    client = scraper(alice, [TokenScope.METRICS])
    found = samples(client.get("/metrics").content.decode())
    assert found[("virtcloud_periodic_task_interval_seconds", (("task", "clusters.expire"),))] == 60
    assert ("virtcloud_periodic_task_success_age_seconds", (("task", "clusters.expire"),)) not in found  # never ran

    tasks.expire.apply().get()
    run = PeriodicRun.objects.get(task="clusters.expire")
    assert run.last_success_at is not None and run.last_failure_at is None
    PeriodicRun.objects.filter(pk=run.pk).update(last_success_at=timezone.now() - timedelta(minutes=10))
    found = samples(client.get("/metrics").content.decode())
    age = found[("virtcloud_periodic_task_success_age_seconds", (("task", "clusters.expire"),))]
    assert 600 <= age < 660

    def broken():
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "clusters_expire", broken)
    assert tasks.expire.apply(throw=False).failed()  # (as a worker runs it: the failure is not raised here)
    run.refresh_from_db()
    assert run.last_failure_at is not None and "clusters.expire: broken failed" in run.last_error
    assert (
        samples(client.get("/metrics").content.decode())[
            ("virtcloud_periodic_task_success_age_seconds", (("task", "clusters.expire"),))
        ]
        >= 600
    )  # a failure is not a success
    assert set(PeriodicRun.objects.values_list("task", flat=True)) == {"clusters.expire"}


def test_a_broker_that_cannot_be_reached_shows(alice, monkeypatch):
    """With the broker down, a create still answers 201 but its cluster stays REQUESTED: the scrape says so."""
    from portal.celery import app

    client = scraper(alice, [TokenScope.METRICS])
    assert samples(client.get("/metrics").content.decode())[("virtcloud_broker_reachable", ())] == 1
    monkeypatch.setattr(app.conf, "broker_url", "redis://127.0.0.1:1/0")  # nothing listens there
    assert samples(client.get("/metrics").content.decode())[("virtcloud_broker_reachable", ())] == 0


def test_the_broker_probe_never_holds_a_scrape_and_checks_the_embedded_folder(monkeypatch, tmp_path):
    """A broker that takes the connection and never answers held the scrape (and a web thread) for as long as
    the socket waited — forever; the probe gives up within its timeouts. The embedded broker's connection
    touches nothing: its folder must take a file."""
    import socket
    import time

    from portal.broker import reachable as _broker_reachable
    from portal.celery import app

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes connections; nobody ever reads or answers
    try:
        monkeypatch.setattr(app.conf, "broker_url", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        assert _broker_reachable(app) is False
        assert time.monotonic() - started < 5
    finally:
        silent.close()
    monkeypatch.setattr(app.conf, "broker_url", "filesystem://localhost/")
    monkeypatch.setitem(app.conf, "broker_transport_options", {"data_folder_out": str(tmp_path)})
    assert _broker_reachable(app) is True and list(tmp_path.iterdir()) == []  # (the probe file is gone)
    monkeypatch.setitem(app.conf, "broker_transport_options", {"data_folder_out": str(tmp_path / "gone")})
    assert _broker_reachable(app) is False
