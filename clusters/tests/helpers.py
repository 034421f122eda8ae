"""Shared by the clusters tests: API clients, clusters made through the API, waiting for a workflow."""

from __future__ import annotations

import time

import pytest

from clusters.models import VirtualCluster


def wait_state(cluster_id: int, *states: str, timeout: float = 30.0) -> VirtualCluster:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster = VirtualCluster.objects.get(pk=cluster_id)
        if cluster.state in states:
            return cluster
        time.sleep(0.05)
    raise AssertionError(f"cluster {cluster_id} is {cluster.state}, not {states} after {timeout}s")


def life_cycle_attempts(client, cluster) -> list:
    """The browser's actions on ``cluster`` that change its life (the teardown page, the teardown, a day more),
    as ``client`` sends them: their responses, for tests of who may."""
    return [
        client.get(f"/clusters/{cluster.pk}/teardown/"),
        client.post(f"/clusters/{cluster.pk}/teardown/"),
        client.post(f"/clusters/{cluster.pk}/extend/", {"by": "1d"}),
    ]


def client_for(user):
    """An API client authenticated as ``user``."""
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


def create_cluster(user, name: str = "c1", mac: str = "52:54:00:00:00:01", *, host: str = "brno1", **extra) -> int:
    """A cluster of ``user`` with one node on ``host``, created through the API (on the fake fabric, eager
    Celery: READY when this returns); its id. ``extra``: more fields of the request (``group``, …)."""
    from clusters.models import Image

    Image.objects.get_or_create(name="my-own", defaults={"approved": False})
    body = {"name": name, "image": "my-own", "lifetime": 3600, "nodes": [{"name": "n1", "host": host, "mac": mac}]}
    r = client_for(user).post("/api/clusters/", {**body, **extra}, format="json")
    assert r.status_code == 201, r.content
    return r.data["id"]


@pytest.fixture
def fabric(transactional_db, tmp_path):
    """The fake fabric (device state files the worker shares) and an unapproved image, ``my-own``, for the
    real-worker tests (import it into the module)."""
    from clusters.models import Image
    from network.tests.fakefabric import build_fabric

    fab = build_fabric(tmp_path / "devices")
    Image.objects.create(name="my-own", approved=False)
    return fab


@pytest.fixture
def public(fabric, alice):
    """Public clusters of alice: an approved image, a provider prefix of /28 subnets; ``public(name, mac, **extra)``
    creates one through the API (one node on brno1) and returns the API's answer."""
    from rest_framework.test import APIClient

    from clusters.models import Image, PublicPrefix

    Image.objects.create(name="debian-12", approved=True)
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api = APIClient()
    api.force_authenticate(alice)

    def create(name, mac, **extra):
        body = {"name": name, "image": "debian-12", "nodes": [{"name": "n1", "host": "brno1", "mac": mac}], **extra}
        r = api.post("/api/clusters/", body, format="json")
        assert r.status_code == 201, r.content
        return r.data

    return create
