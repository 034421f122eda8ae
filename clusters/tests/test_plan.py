"""``POST /api/clusters/plan/``: a dry run of a create — the policy's decision, the pool and the public subnet a
create would get now, or the very error it would answer — that leaves nothing behind. On the fake fabric with eager
Celery (a workflow that was sent would run at once)."""
# ruff: noqa: F401, F811 (the pytest fixture public is imported from clusters.tests.helpers)

from __future__ import annotations

import pytest

from clusters.models import ClusterEvent, ClusterStep, Image, Node, PublicSubnetLease, Quota, VirtualCluster
from clusters.tests.helpers import client_for, public
from network.models import DeviceChange, Segment, VlanAllocation, VlanPool
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db(transaction=True)


def _footprint() -> dict:
    return {
        model.__name__: model.objects.count()
        for model in (
            VirtualCluster,
            Node,
            Segment,
            DeviceChange,
            ClusterEvent,
            ClusterStep,
            AuditEntry,
            PublicSubnetLease,
        )
    } | {"allocated": VlanAllocation.objects.filter(state="allocated").count()}


def _body(name="c1", hosts=("brno1", "prague1"), image="my-own", mac=0, **extra) -> dict:
    nodes = [{"name": f"n{i}", "host": h, "mac": f"52:54:00:00:{mac:02x}:{i:02x}"} for i, h in enumerate(hosts, 1)]
    return {"name": name, "image": image, "nodes": nodes, **extra}


def test_a_plan_says_what_a_create_would_do_and_leaves_nothing(fabric, alice):
    Image.objects.create(name="my-own", approved=False)
    api = client_for(alice)
    before = _footprint()
    r = api.post("/api/clusters/plan/", _body(), format="json")
    assert r.status_code == 200, r.content
    assert r.data["connectivity"] == "closed" and "user-provided" in r.data["connectivity_reason"]
    assert (r.data["pool"], r.data["core"], r.data["sites"]) == (
        VlanPool.objects.get().name,
        "cesnet",
        ["brno", "prague"],
    )
    assert [(n["name"], n["host"]) for n in r.data["nodes"]] == [("n1", "brno1"), ("n2", "prague1")]
    assert _footprint() == before  # no cluster, VLAN, device change, event, step or audit entry
    # and the create it planned goes through
    assert api.post("/api/clusters/", _body(), format="json").status_code == 201


def test_a_public_plan_names_the_subnet_the_create_then_gets(public, alice):
    api = client_for(alice)
    r = api.post("/api/clusters/plan/", _body(image="debian-12", hosts=("brno1",)), format="json")
    assert r.status_code == 200, r.content
    assert (r.data["connectivity"], r.data["public_subnet"], r.data["public_gateway"]) == (
        "public",
        "198.19.0.0/28",
        "198.19.0.1",
    )
    assert r.data["nodes"][0]["address"] == "198.19.0.2"
    assert not PublicSubnetLease.objects.exists()
    made = api.post("/api/clusters/", _body(image="debian-12", hosts=("brno1",)), format="json")
    assert made.data["public_subnet"] == "198.19.0.0/28"


def test_a_plan_answers_the_error_a_create_would(fabric, alice):
    Image.objects.create(name="my-own", approved=False)
    api = client_for(alice)
    assert api.post("/api/clusters/", _body(name="taken"), format="json").status_code == 201
    before = _footprint()
    r = api.post("/api/clusters/plan/", _body(name="taken", mac=1), format="json")
    assert r.status_code == 409 and "already has a live cluster named taken" in str(r.data)
    r = api.post("/api/clusters/plan/", _body(hosts=("nowhere1",), mac=1), format="json")
    assert r.status_code == 400 and "nodes" in r.data
    Quota.objects.create(user=alice, max_clusters=1, max_nodes=10)
    r = api.post("/api/clusters/plan/", _body(name="more", mac=1), format="json")
    assert r.status_code == 409 and "quota" in str(r.data)
    assert _footprint() == before
