"""The cluster API as middleware and users use it, on the fake fabric with eager Celery (the real-worker and
lab tests are in test_workflow_worker.py and test_e2e_lab.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from clusters import selectors, services, workflows
from clusters.errors import Conflict
from clusters.models import (
    ClusterState,
    ClusterStep,
    IdempotencyKey,
    Image,
    Node,
    NodeState,
    PublicPrefix,
    VirtualCluster,
)
from network.models import DeviceChange, Segment, VlanAllocation
from network.services import rollback_stalled_after
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def images(db):
    return {
        "approved": Image.objects.create(name="debian-12", approved=True),
        "custom": Image.objects.create(name="my-own", approved=False),
    }


@pytest.fixture
def api():
    return APIClient()


@pytest.fixture
def scheduler(db, root):
    """Middleware (a batch scheduler) with a token that may act for any user."""
    from django.contrib.auth.models import User

    user = User.objects.create_user("pbs")
    _, secret = token_create(user=user, name="PBS", scopes=[TokenScope.CLUSTERS_MANAGE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def as_scheduler_for(api, user) -> None:
    """``api`` acts for ``user`` as the scheduler does: with a token of ``user``'s that has ``clusters:manage``
    (it may give a ``bastion_address``)."""
    token, _ = token_create(user=user, name="scheduler", scopes=[TokenScope.CLUSTERS_MANAGE])
    api.force_authenticate(user, token=token)


def body(name="c1", nodes=(("n1", "brno1", "52:54:00:00:00:01"), ("n2", "pilsen1", "52:54:00:00:00:02")), **extra):
    data = {
        "name": name,
        "image": "my-own",
        "nodes": [{"name": n, "host": h, "mac": m} for n, h, m in nodes],
        "lifetime": 3600,
    }
    data.update(extra)
    return data


def allocated_vids() -> set[int]:
    return set(VlanAllocation.objects.filter(state="allocated").values_list("vid", flat=True))


def test_create_runs_the_workflow_to_ready(fabric, images, api, alice):
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(), format="json")
    assert r.status_code == 201, r.content
    data = api.get(f"/api/clusters/{r.data['id']}/").data
    assert data["state"] == "ready"
    assert data["connectivity"] == "closed"
    assert "user-provided" in data["connectivity_reason"]
    vid = data["vlan_id"]
    assert vid in range(100, 200)
    assert data["progress"]["percent"] == 100
    assert [s["name"] for s in data["steps"]][:2] == ["allocate", "network"]
    assert all(s["status"] == "ok" for s in data["steps"])
    # the devices carry the VLAN: both hosts, their trunks, the core uplinks at brno and pilsen, and the
    # gateway trunk (closed cluster)
    assert vid in fabric.host_vlans("brno1") and vid in fabric.host_vlans("pilsen1")
    assert vid not in fabric.host_vlans("prague1")
    assert vid in fabric.switch_ports("sw-brno")["h1"] and vid in fabric.switch_ports("sw-brno")["gw"]
    assert vid in fabric.switch_ports("sw-pilsen")["uplink"]
    # READY and closed: its VLAN is in the access gateways' maps now, and waits for them once released
    assert VlanAllocation.objects.get(state="allocated", vid=vid).gateway_mapped is True


def test_policy_public_for_approved_image_without_admin_rights(fabric, images, api, alice):
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(image="debian-12"), format="json")
    assert r.status_code == 201
    assert r.data["connectivity"] == "public"
    assert r.data["public_subnet"] == "198.19.0.0/28"
    assert r.data["public_gateway"] == "198.19.0.1"
    assert VlanAllocation.objects.get(state="allocated", vid=r.data["vlan_id"]).gateway_mapped is False  # no map
    r2 = api.post(
        "/api/clusters/",
        body(name="c2", image="debian-12", nodes=[("m1", "brno2", "52:54:00:00:01:01")]),
        format="json",
    )
    assert r2.data["public_subnet"] == "198.19.0.16/28"  # no overlap
    r3 = api.post(
        "/api/clusters/",
        body(name="c3", image="debian-12", admin_rights=True, nodes=[("m1", "brno2", "52:54:00:00:02:01")]),
        format="json",
    )
    assert r3.data["connectivity"] == "closed"
    assert "administrator" in r3.data["connectivity_reason"]


def test_a_node_made_or_added_is_audited_as_its_removal_is(fabric, images, api, alice):
    """Nodes are made in bulk (no save signal): each still gets its "create" entry, so the audit log shows a
    node joining a cluster as well as leaving it."""
    from portal.models import AuditEntry

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    more = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}
    assert api.post(f"/api/clusters/{cid}/nodes/", more, format="json").status_code == 202
    created = AuditEntry.objects.filter(content_type__model="node", action="create").order_by("id")
    assert [(e.object_repr, e.actor) for e in created] == [("c1/n1", "alice"), ("c1/n2", "alice"), ("c1/n3", "alice")]
    assert created[2].changes["mac"] == [None, "52:54:00:00:00:03"]


def test_a_closed_cluster_asked_for_on_an_approved_image_is_closed_all_the_way_down(fabric, images, api, alice):
    """Legacy insecure software on an approved image (paper §2.1): the owner asks for closed and gets a cluster
    reachable only through the access gateway — its VLAN on the gateway trunk and in the gateways' maps, no
    public subnet, its nodes keep the addresses the request gave (or none) — and the reason says so."""
    from portal.models import AuditEntry

    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    nodes = _addressed(
        (("n1", "brno1", "52:54:00:00:00:01"), ("n2", "pilsen1", "52:54:00:00:00:02")), ["10.0.0.1", None]
    )
    r = api.post("/api/clusters/", {**nodes, "connectivity": "closed"}, format="json")
    assert r.status_code == 201, r.content
    data = api.get(f"/api/clusters/{r.data['id']}/").data
    assert data["state"] == "ready" and data["connectivity"] == "closed"
    assert data["connectivity_reason"] == (
        "closed on request (the policy allows public: approved image debian-12 without administrator rights)"
    )
    assert (data["public_subnet"], data["public_gateway"]) == ("", "")
    assert [n["address"] for n in data["nodes"]] == ["10.0.0.1", None]
    cluster = VirtualCluster.objects.get(pk=data["id"])
    assert cluster.public_prefix is None and cluster.segment.gateway is True
    vid = data["vlan_id"]
    assert vid in fabric.switch_ports("sw-brno")["gw"]  # on the access gateway trunk
    assert VlanAllocation.objects.get(state="allocated", vid=vid).gateway_mapped is True
    message = AuditEntry.objects.get(object_id=str(cluster.pk), action="action").message
    assert message.startswith("created; connectivity closed: closed on request")
    # its owner sees it among the clusters to enter through the VPN and the bastion
    from access.selectors import clusters_user_may_enter

    assert list(clusters_user_may_enter(alice)) == [cluster]
    # no subnet was taken: the next public cluster gets the prefix's first
    nodes = [("m1", "brno2", "52:54:00:00:01:01")]
    again = api.post("/api/clusters/", body(name="c2", image="debian-12", nodes=nodes), format="json")
    assert (again.data["connectivity"], again.data["public_subnet"]) == ("public", "198.19.0.0/28"), again.data


def test_public_asked_for_where_the_policy_says_public_is_as_if_left_out(fabric, images, api, alice):
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(image="debian-12", connectivity="public"), format="json")
    assert r.status_code == 201, r.content
    assert (r.data["connectivity"], r.data["public_subnet"]) == ("public", "198.19.0.0/28")
    assert r.data["connectivity_reason"] == "approved image debian-12 without administrator rights"


@pytest.mark.parametrize(
    "change, prefix, status, says",
    [
        ({}, True, 400, "the policy makes this cluster closed: image my-own is user-provided"),
        ({"image": "debian-12", "admin_rights": True}, True, 400, "administrator rights in the VMs"),
        ({"image": "debian-12"}, False, 422, "no public prefix is configured"),
    ],
)
def test_public_asked_for_where_the_policy_says_closed_is_refused_and_leaves_nothing(
    fabric, images, api, alice, change, prefix, status, says
):
    """Never silently closed instead: the request is refused with a message on the field, and nothing is
    allocated — no cluster, no VLAN, no segment, no public subnet."""
    if prefix:
        PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(connectivity="public", **change), format="json")
    assert r.status_code == status, r.content
    assert says in r.data["connectivity"][0] and "ask for closed or leave connectivity out" in r.data["connectivity"][0]
    assert r.data["code"] == ("invalid" if status == 400 else "invalid_topology")
    assert VirtualCluster.objects.count() == 0 and not allocated_vids() and Segment.objects.count() == 0
    assert Node.objects.count() == 0


def test_a_retry_asking_for_another_connectivity_is_the_idempotency_conflict(fabric, images, scheduler, alice):
    """The connectivity is part of the request a key stands for: a retry that asks for closed where the first
    request left it to the policy (public) is told so, and the cluster stays as the first request made it."""
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    payload = body(owner="alice", image="debian-12", job_id="4711.pbs")
    first = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    assert first.status_code == 201 and first.data["connectivity"] == "public", first.content
    for connectivity in ("closed", "public"):
        other = scheduler.post(
            "/api/clusters/", {**payload, "connectivity": connectivity}, format="json", HTTP_IDEMPOTENCY_KEY="job-4711"
        )
        assert other.status_code == 409, other.content
        assert other.data == {
            "Idempotency-Key": ["this Idempotency-Key was already used for a different request"],
            "code": "conflict",
        }
    replay = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    assert (replay.status_code, replay.data["id"]) == (200, first.data["id"])
    cluster = VirtualCluster.objects.get()
    assert (cluster.connectivity, cluster.public_subnet) == ("public", "198.19.0.0/28")
    assert len(allocated_vids()) == 1 and cluster.segment.gateway is False
    # and the other way round: a cluster asked closed is not replayed for a retry that leaves it out
    closed = {**payload, "name": "c2", "job_id": "4712.pbs", "connectivity": "closed"}
    closed["nodes"] = [{"name": "m1", "host": "brno2", "mac": "52:54:00:00:01:01"}]
    made = scheduler.post("/api/clusters/", closed, format="json", HTTP_IDEMPOTENCY_KEY="job-4712")
    assert made.status_code == 201 and made.data["connectivity"] == "closed", made.content
    left_out = {k: v for k, v in closed.items() if k != "connectivity"}
    assert scheduler.post("/api/clusters/", left_out, format="json", HTTP_IDEMPOTENCY_KEY="job-4712").status_code == 409
    assert VirtualCluster.objects.count() == 2 and len(allocated_vids()) == 2


def _addressed(nodes, addresses):
    out = body(image="debian-12", nodes=nodes)
    for node, address in zip(out["nodes"], addresses, strict=True):
        if address:
            node["address"] = address
    return out


def test_a_public_clusters_nodes_get_addresses_of_its_subnet(fabric, images, api, alice):
    """The provider routes a public cluster's subnet only: each node gets a host address of it (the lowest
    free one unless the scheduler gives one), never the router's; a node added later gets the next free one,
    and a removed node's address is free again."""
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=29)
    api.force_authenticate(alice)
    three = (("n1", "brno1", "52:54:00:00:00:01"), ("n2", "pilsen1", "52:54:00:00:00:02"))
    three += (("n3", "brno2", "52:54:00:00:00:03"),)
    r = api.post("/api/clusters/", _addressed(three, [None, "198.19.0.2", None]), format="json")
    assert r.status_code == 201, r.content
    assert (r.data["public_subnet"], r.data["public_gateway"]) == ("198.19.0.0/29", "198.19.0.1")
    assert {n["name"]: n["address"] for n in r.data["nodes"]} == {
        "n1": "198.19.0.3",
        "n2": "198.19.0.2",
        "n3": "198.19.0.4",
    }
    base = f"/api/clusters/{r.data['id']}"
    n4 = {"name": "n4", "host": "prague1", "mac": "52:54:00:00:00:04"}
    added = api.post(f"{base}/nodes/", {"nodes": [n4]}, format="json")
    assert added.status_code == 202, added.content
    node = {n["name"]: n for n in api.get(base + "/").data["nodes"]}
    assert node["n4"]["address"] == "198.19.0.5"
    assert api.delete(f"{base}/nodes/{node['n2']['id']}/").status_code == 202
    more = [{"name": f"m{i}", "host": "prague2", "mac": f"52:54:00:00:01:0{i}"} for i in (1, 2)]
    assert api.post(f"{base}/nodes/", {"nodes": more}, format="json").status_code == 202
    live = {n["name"]: n["address"] for n in api.get(base + "/").data["nodes"] if n["state"] != "removed"}
    assert (live["m1"], live["m2"]) == ("198.19.0.2", "198.19.0.6")  # n2's address, then the last host one
    m3 = {"name": "m3", "host": "prague2", "mac": "52:54:00:00:01:03"}
    full = api.post(f"{base}/nodes/", {"nodes": [m3]}, format="json")
    assert full.status_code == 400 and "no free address left for node m3" in full.data["nodes"][0], full.data


def test_a_public_node_never_gets_the_bastions_address(fabric, images, api, alice, root):
    """A public cluster has no bastion (asked for one, it is a 400: ``test_api_contract``); a closed cluster
    that has one and is made public by an admin keeps it, and its nodes are renumbered around it."""
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=29)
    as_scheduler_for(api, alice)
    two = (("n1", "brno1", "52:54:00:00:00:01"), ("n2", "pilsen1", "52:54:00:00:00:02"))
    closed = {**_addressed(two, [None, None]), "connectivity": "closed", "bastion_address": "198.19.0.2/29"}
    r = api.post("/api/clusters/", closed, format="json")
    assert r.status_code == 201, r.content
    api.force_authenticate(root)
    r = api.post(
        f"/api/clusters/{r.data['id']}/connectivity/", {"connectivity": "public", "reason": "x"}, format="json"
    )
    assert r.status_code == 202 and r.data["public_subnet"] == "198.19.0.0/29", r.content
    assert [n["address"] for n in r.data["nodes"]] == ["198.19.0.3", "198.19.0.4"]


def test_a_closed_cluster_made_public_takes_nodes_of_its_public_subnet_whatever_its_bastion(
    fabric, images, api, alice, root
):
    """The bastion's network binds the nodes of a closed cluster only: made public by an admin (it keeps its
    bastion for when it is closed again), a node added with an address of its public subnet is accepted, not
    refused as outside the bastion's network."""
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=29)
    as_scheduler_for(api, alice)
    one = (("n1", "brno1", "52:54:00:00:00:01"),)
    closed = {**_addressed(one, ["10.0.0.1"]), "connectivity": "closed", "bastion_address": "10.0.0.254/24"}
    cid = api.post("/api/clusters/", closed, format="json").data["id"]
    api.force_authenticate(root)
    r = api.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "public", "reason": "x"}, format="json")
    assert r.status_code == 202 and r.data["public_subnet"] == "198.19.0.0/29", r.content
    as_scheduler_for(api, alice)
    new = {"nodes": [{"name": "n2", "host": "pilsen1", "mac": "52:54:00:00:00:02", "address": "198.19.0.5"}]}
    r = api.post(f"/api/clusters/{cid}/nodes/", new, format="json")
    assert r.status_code == 202, r.content
    assert {n["name"]: n["address"] for n in r.data["nodes"]} == {"n1": "198.19.0.2", "n2": "198.19.0.5"}


def test_a_middleware_token_of_a_user_who_is_not_staff_may_not_override_whatever_the_body(fabric, images, api, alice):
    """One answer for one caller: a clusters:manage token of a user who is not an administrator is a 403
    before its body is looked at (not a 400 for a bad body and a 403 for a good one)."""
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    as_scheduler_for(api, alice)
    for data in ({"connectivity": "sideways"}, {"connectivity": "public", "reason": "vetted"}):
        r = api.post(f"/api/clusters/{cid}/connectivity/", data, format="json")
        assert (r.status_code, r.data["code"]) == (403, "permission_denied"), r.data
    assert VirtualCluster.objects.get(pk=cid).connectivity == "closed"


@pytest.mark.parametrize(
    "address, message",
    [
        ("198.19.0.1", "other than the router's (198.19.0.1)"),
        ("198.19.0.0", "not a host address"),
        ("198.19.0.7", "not a host address"),
        ("10.0.0.5", "not a host address of the cluster's public subnet 198.19.0.0/29"),
        ("2001:db8::5", "not a host address"),
    ],
)
def test_a_public_node_address_outside_its_subnet_is_a_400_and_nothing_is_kept(
    fabric, images, api, alice, address, message
):
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=29)
    api.force_authenticate(alice)
    before = allocated_vids()
    r = api.post("/api/clusters/", _addressed((("n1", "brno1", "52:54:00:00:00:01"),), [address]), format="json")
    assert r.status_code == 400 and message in r.data["nodes"][0], r.data
    assert not VirtualCluster.objects.exists() and allocated_vids() == before
    r = api.post("/api/clusters/", _addressed((("n1", "brno1", "52:54:00:00:00:01"),), [None]), format="json")
    assert r.data["public_subnet"] == "198.19.0.0/29"  # the refused request held no subnet either


def test_the_scheduler_gives_the_bastions_address_in_a_closed_cluster(fabric, images, api, alice):
    """The SSH bastion needs an address of its own in a closed cluster's network (its leg on the cluster's
    VLAN): the scheduler gives it with the prefix length, and no node may have it. A user may not: its network
    is where the gateway's one bastion forwards to (a wide one would reach the provider's hosts)."""
    api.force_authenticate(alice)
    before = allocated_vids()
    r = api.post("/api/clusters/", body(bastion_address="10.255.255.254/8"), format="json")
    assert r.status_code == 403 and "scheduler" in r.data["detail"], r.data
    assert allocated_vids() == before and not VirtualCluster.objects.exists()
    as_scheduler_for(api, alice)
    r = api.post("/api/clusters/", body(bastion_address="10.0.0.254/24"), format="json")
    assert r.status_code == 201, r.content
    assert r.data["bastion_address"] == "10.0.0.254/24"
    assert (
        api.post("/api/clusters/", body(name="c2", nodes=[("m1", "brno2", "52:54:00:00:09:01")]), format="json").data[
            "bastion_address"
        ]
        == ""
    )
    bad_ones = ("10.0.0.254", "10.0.0.254/32", "10.0.0.0/24", "10.0.0.255/24", "fd00::1/128", "banana/24")
    # addresses the legs hook could not hold (link-local, loopback: not global), nor route (multicast), and
    # prefixes that would draw half the address space into the cluster's leg
    bad_ones += ("fe80::1/64", "fe80::1%eth0/64", "127.0.0.5/8", "224.0.0.5/24", "0.0.0.1/8", "10.0.0.254/1")
    bad_ones += ("fd00::1/16",)
    for bad in bad_ones:
        r = api.post("/api/clusters/", body(name="c3", bastion_address=bad), format="json")
        assert r.status_code == 400 and "bastion_address" in r.data, (bad, r.data)
    before = allocated_vids()
    clash = body(name="c4", nodes=[("m1", "brno2", "52:54:00:00:09:02")], bastion_address="10.0.0.254/24")
    clash["nodes"][0]["address"] = "10.0.0.254"
    r = api.post("/api/clusters/", clash, format="json")
    assert r.status_code == 400 and "the SSH bastion's address" in r.data["nodes"][0], r.data
    assert allocated_vids() == before
    cid = VirtualCluster.objects.get(name="c1").pk
    node = {"name": "n3", "host": "prague1", "mac": "52:54:00:00:09:03", "address": "10.0.0.254"}
    r = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json")
    assert r.status_code == 400 and "the SSH bastion's address" in r.data["nodes"][0], r.data


OUTSIDE = "{address} is outside 10.0.0.0/24"
UNUSABLE = "{address} is the network or broadcast address of 10.0.0.0/24"


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        *((address, OUTSIDE) for address in ("10.0.1.5", "127.0.0.1", "198.18.100.1", "fd00::5")),
        *((address, UNUSABLE) for address in ("10.0.0.0", "10.0.0.255")),
    ],
)
def test_a_node_the_bastion_cannot_forward_to_is_refused(fabric, images, api, alice, address, refusal):
    """The bastion reaches a closed cluster's nodes through its leg, the network of its address: a node
    address outside it (the gateway's own loopback or address, the provider's network, another cluster's)
    would be reached through the gateway's other routes; and the gateways refuse a state whose bastion forwards
    to the leg's network or broadcast address — the whole document, every cluster's, until the state expires and
    they refuse everyone. Refused on create and on node add, nothing allocated; such a node made before the rule
    is withheld from the bastion."""
    from access.selectors import bastion_unreachable

    as_scheduler_for(api, alice)
    refusal = refusal.format(address=address)
    before = allocated_vids()
    outside = body(name="c5", nodes=[("m1", "brno2", "52:54:00:00:09:05")], bastion_address="10.0.0.254/24")
    outside["nodes"][0]["address"] = address
    r = api.post("/api/clusters/", outside, format="json")
    assert r.status_code == 400 and refusal in r.data["nodes"][0], r.data
    assert allocated_vids() == before and not VirtualCluster.objects.filter(name="c5").exists()
    inside = body(name="c6", nodes=[("m1", "brno2", "52:54:00:00:09:06")], bastion_address="10.0.0.254/24")
    inside["nodes"][0]["address"] = "10.0.0.7"
    r = api.post("/api/clusters/", inside, format="json")
    assert r.status_code == 201, r.content
    node = {"name": "m2", "host": "prague1", "mac": "52:54:00:00:09:07", "address": address}
    r = api.post(f"/api/clusters/{r.data['id']}/nodes/", {"nodes": [node]}, format="json")
    assert r.status_code == 400 and refusal in r.data["nodes"][0], r.data
    cluster = VirtualCluster.objects.get(name="c6")
    assert cluster.nodes.count() == 1
    assert bastion_unreachable(cluster, address) is not None and bastion_unreachable(cluster, "10.0.0.7") is None


def test_nodes_say_where_the_vm_manager_plugs_them(fabric, images, api, alice):
    from xml.etree import ElementTree as ET

    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(), format="json")
    vid = VirtualCluster.objects.get(pk=r.data["id"]).vlan_id
    cluster = api.get(f"/api/clusters/{r.data['id']}/").data
    for node in cluster["nodes"]:
        plug = node["attachment"]
        assert plug["bridge"] == f"br-v{vid}" and plug["vlan"] is None  # the fake hosts: a bridge per VLAN
        xml = ET.fromstring(plug["libvirt"])
        assert xml.find("source").get("bridge") == f"br-v{vid}" and xml.find("mac").get("address") == node["mac"]
        assert node["target_attachment"] is None


def test_idempotency_key_returns_the_same_cluster(fabric, images, scheduler, alice):
    payload = body(owner="alice", job_id="4711.pbs")
    r1 = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    r2 = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4711")
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.data["id"] == r2.data["id"]
    assert VirtualCluster.objects.count() == 1 and len(allocated_vids()) == 1
    assert r1.data["owner"] == "alice"
    other = scheduler.post(
        "/api/clusters/", body(name="zzz", owner="alice"), format="json", HTTP_IDEMPOTENCY_KEY="job-4711"
    )
    assert other.status_code == 409
    assert "Idempotency-Key" in other.data


def test_a_create_retried_after_its_owner_was_deactivated_gets_the_cluster_not_a_refusal(
    fabric, images, scheduler, alice
):
    """The first create succeeded but its answer was lost; meanwhile the owner was deactivated (the directory
    sync). The retry — the same body, the same key — is answered with the cluster (200): validating it again
    refused the owner (400), and the scheduler, told "refused, nothing left allocated", left the cluster holding
    its VLAN until it expired. Another body with the key is still validated (and refused)."""
    payload = body(owner="alice", job_id="4712.pbs")
    first = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4712")
    assert first.status_code == 201
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    retry = scheduler.post("/api/clusters/", payload, format="json", HTTP_IDEMPOTENCY_KEY="job-4712")
    assert (retry.status_code, retry.data["id"]) == (200, first.data["id"]), retry.content
    other = scheduler.post(
        "/api/clusters/", {**payload, "lifetime": 7200}, format="json", HTTP_IDEMPOTENCY_KEY="job-4712"
    )
    assert other.status_code == 400 and "owner" in other.data, other.content
    assert VirtualCluster.objects.count() == 1 and len(allocated_vids()) == 1


@pytest.mark.parametrize("path", ["/api/clusters/", "/api/clusters/plan/"])
def test_an_owner_the_database_cannot_compare_is_refused_at_its_field(fabric, images, scheduler, path):
    """The image field looks its owner up by the ``owner`` given: one holding a NUL is ``owner``'s 400, not a
    database error (a 500) from the image's lookup."""
    r = scheduler.post(path, body(owner="alice\x00"), format="json")
    assert r.status_code == 400 and "owner" in r.data, r.content
    assert VirtualCluster.objects.count() == 0 and not allocated_vids()


def test_an_idempotency_key_the_database_cannot_hold_is_refused(fabric, images, api, alice):
    """A NUL character in the key (PostgreSQL text cannot hold one) is a 400 naming the header, not a 500;
    nothing is created or changed."""
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", body(), format="json", HTTP_IDEMPOTENCY_KEY="job\x004711")
    assert r.status_code == 400 and "Idempotency-Key" in r.data, r.content
    assert VirtualCluster.objects.count() == 0 and not allocated_vids()
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    r = api.post(f"/api/clusters/{cid}/teardown/", {}, format="json", HTTP_IDEMPOTENCY_KEY="down\x00")
    assert r.status_code == 400 and "Idempotency-Key" in r.data, r.content
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    assert IdempotencyKey.objects.count() == 0


def test_retried_actions_with_an_idempotency_key_act_once(fabric, images, scheduler, alice):
    """A scheduler retries after a lost answer: with the same key every action answers like the first time
    and changes nothing again — even where a plain retry would be refused (a removed node is 404, a node
    added twice is a conflict)."""
    cid = scheduler.post("/api/clusters/", body(owner="alice"), format="json").data["id"]
    base = f"/api/clusters/{cid}"
    add = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}

    def twice(method, path, data=None, key="k"):
        send = getattr(scheduler, method)
        return [send(path, data, format="json", HTTP_IDEMPOTENCY_KEY=key) for _ in range(2)]

    first, again = twice("post", f"{base}/nodes/", add, key="add-n3")
    assert (first.status_code, again.status_code) == (202, 202), again.data
    assert Node.objects.filter(cluster_id=cid, name="n3").count() == 1
    assert scheduler.post(f"{base}/nodes/", add, format="json").status_code in (400, 409)  # no key: refused

    n1 = Node.objects.get(cluster_id=cid, name="n1")
    first, again = twice("delete", f"{base}/nodes/{n1.pk}/", key="rm-n1")
    assert (first.status_code, again.status_code) == (202, 202), again.data
    assert scheduler.delete(f"{base}/nodes/{n1.pk}/").status_code == 404  # no key: it is gone

    n2 = Node.objects.get(cluster_id=cid, name="n2")
    first, again = twice("post", f"{base}/nodes/{n2.pk}/migrate/", {"target_host": "prague2"}, key="mv-n2")
    assert (first.status_code, again.status_code) == (202, 202), again.data
    first, again = twice("post", f"{base}/nodes/{n2.pk}/migrated/", {}, key="mv-n2-done")
    assert (first.status_code, again.status_code) == (202, 202), again.data
    assert Node.objects.get(pk=n2.pk).host.name == "prague2"

    expiry = (timezone.now() + timedelta(hours=5)).isoformat()
    first, again = twice("patch", f"{base}/", {"expires_at": expiry}, key="extend")
    assert (first.status_code, again.status_code) == (200, 200)

    # the same key for another request (another path, or another body) is a conflict, and changes nothing
    other = scheduler.post(f"{base}/teardown/", {}, format="json", HTTP_IDEMPOTENCY_KEY="add-n3")
    assert other.status_code == 409 and "Idempotency-Key" in other.data
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    changed = {"nodes": [{"name": "n4", "host": "prague1", "mac": "52:54:00:00:00:04"}]}
    assert scheduler.post(f"{base}/nodes/", changed, format="json", HTTP_IDEMPOTENCY_KEY="add-n3").status_code == 409
    assert not Node.objects.filter(cluster_id=cid, name="n4").exists()

    first, again = twice("post", f"{base}/teardown/", {}, key="down")
    assert (first.status_code, again.status_code) == (202, 202)
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.TORN_DOWN
    assert again.data["state"] == "torn_down"  # the cluster as it is now


def test_requests_racing_with_one_key_act_once(fabric, images, root, alice):
    """The scheduler's retry overtakes its first request (PostgreSQL: they are serialized on the key): each
    answers like the first one would, and the work is done once — a cluster create, then a node add."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("concurrent requests need PostgreSQL")
    from django.contrib.auth.models import User

    _, secret = token_create(user=User.objects.create_user("pbs"), name="PBS", scopes=[TokenScope.CLUSTERS_MANAGE])

    def send(method: str, path: str, data: dict, key: str):
        def call(_):
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
            try:
                return getattr(client, method)(path, data, format="json", HTTP_IDEMPOTENCY_KEY=key)
            finally:
                connection.close()

        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(call, range(4)))

    made = send("post", "/api/clusters/", body(owner="alice"), "create-once")
    assert sorted(r.status_code for r in made) == [200, 200, 200, 201], [r.data for r in made]
    assert len({r.data["id"] for r in made}) == 1
    assert VirtualCluster.objects.count() == 1 and len(allocated_vids()) == 1
    cid = made[0].data["id"]
    add = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}
    added = send("post", f"/api/clusters/{cid}/nodes/", add, "add-once")
    assert [r.status_code for r in added] == [202] * 4, [r.data for r in added]
    assert Node.objects.filter(cluster_id=cid, name="n3").count() == 1
    assert VirtualCluster.objects.get(pk=cid).steps.filter(name="nodes.add").count() == 1


def test_a_teardown_that_loses_the_race_to_another_is_harmless(fabric, images, api, alice):
    """Two teardowns read the cluster READY; the second's conditional update finds it TEARING_DOWN (the
    first committed meanwhile): it answers like asking twice does, not 409."""
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    stale = VirtualCluster.objects.get(pk=cid)
    assert stale.state == ClusterState.READY
    VirtualCluster.objects.filter(pk=cid).update(state=ClusterState.TEARING_DOWN)  # the other request's
    cluster = services.cluster_teardown(cluster=stale, reason="again")
    assert cluster.state == ClusterState.TEARING_DOWN
    stale = VirtualCluster.objects.get(pk=cid)
    stale.state = ClusterState.READY  # read before another request failed it
    VirtualCluster.objects.filter(pk=cid).update(state=ClusterState.FAILED)
    with pytest.raises(services.Conflict):
        services.cluster_teardown(cluster=stale, reason="not from failed")


def test_a_refused_action_records_no_key(fabric, images, scheduler, alice):
    """A request that fails changes nothing, its key included: the corrected retry with the same key runs."""
    cid = scheduler.post("/api/clusters/", body(owner="alice"), format="json").data["id"]
    bad = {"nodes": [{"name": "n3", "host": "nowhere", "mac": "52:54:00:00:00:03"}]}
    r = scheduler.post(f"/api/clusters/{cid}/nodes/", bad, format="json", HTTP_IDEMPOTENCY_KEY="add")
    assert r.status_code == 400
    assert not IdempotencyKey.objects.filter(key="add").exists()
    r = scheduler.post(
        f"/api/clusters/{cid}/nodes/",
        {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]},
        format="json",
        HTTP_IDEMPOTENCY_KEY="add",
    )
    assert r.status_code == 202


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"nodes": [{"name": "n1", "host": "nowhere", "mac": "52:54:00:00:00:01"}]}, 400, "nodes"),
        ({"nodes": [{"name": "n1", "host": "brno1", "mac": "not-a-mac"}]}, 400, "nodes"),
        ({"nodes": [{"name": "n1", "host": "brno1", "mac": "01:00:5e:00:00:01"}]}, 400, "nodes"),
        ({"nodes": [{"name": "n1", "host": "brno1", "mac": "00-00-00-00-00-00"}]}, 400, "nodes"),
        ({"nodes": []}, 400, "nodes"),
        ({"lifetime": 5}, 400, "lifetime"),
        ({"lifetime": 10**9}, 400, "lifetime"),
        ({"image": "nope"}, 400, "image"),
        ({"name": "Bad Name"}, 400, "name"),
        ({"connectivity": "open"}, 400, "connectivity"),
        ({"connectivity": "public"}, 400, "connectivity"),  # a user-provided image: the policy says closed
        (
            {
                "nodes": [
                    {"name": "n1", "host": "brno1", "mac": "52:54:00:00:00:01"},
                    {"name": "n2", "host": "brno2", "mac": "52:54:00:00:00:01"},
                ]
            },
            400,
            "nodes",
        ),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(fabric, images, api, alice, change, status, field):
    api.force_authenticate(alice)
    r = api.post("/api/clusters/", {**body(), **change}, format="json")
    assert r.status_code == status, r.content
    assert field in r.data
    assert VirtualCluster.objects.count() == 0 and not allocated_vids() and Segment.objects.count() == 0


def test_mac_in_use_by_another_cluster(fabric, images, api, alice, bob):
    api.force_authenticate(alice)
    assert api.post("/api/clusters/", body(), format="json").status_code == 201
    api.force_authenticate(bob)
    r = api.post("/api/clusters/", body(name="other"), format="json")
    assert r.status_code == 400
    assert "already used" in str(r.data["nodes"])
    assert len(allocated_vids()) == 1
    # held by a cluster being torn down (its nodes go when its teardown ends, which a device may hold up): a 409
    # "busy" with Retry-After — a scheduler reusing its MACs retries, where a 400 told it to give up
    VirtualCluster.objects.update(state=ClusterState.TEARING_DOWN)
    r = api.post("/api/clusters/", body(name="other"), format="json")
    assert (r.status_code, r.data["code"]) == (409, "busy") and "being torn down" in r.data["detail"]
    assert r.has_header("Retry-After") and len(allocated_vids()) == 1
    # … unless another MAC of the request is a running cluster's: retrying would not help (whichever sorts first)
    api.force_authenticate(alice)
    running = body(name="running", nodes=[("r1", "brno1", "52:54:00:00:00:09")])
    assert api.post("/api/clusters/", running, format="json").status_code == 201
    api.force_authenticate(bob)
    both = body(name="other", nodes=[("m1", "brno1", "52:54:00:00:00:01"), ("m2", "pilsen1", "52:54:00:00:00:09")])
    r = api.post("/api/clusters/", both, format="json")
    assert r.status_code == 400 and "52:54:00:00:00:09 is already used" in str(r.data["nodes"]), r.data


def test_a_name_held_by_a_cluster_being_torn_down_is_busy_not_a_conflict(fabric, images, api, alice):
    """The name is free once the teardown ends: a job requeued under its cluster's name gets a 409 "busy" with
    Retry-After (which schedulers retry), not the "conflict" that tells them to give up; a running cluster's name
    is still a conflict."""
    api.force_authenticate(alice)
    assert api.post("/api/clusters/", body(), format="json").status_code == 201
    again = body(nodes=[("n1", "brno1", "52:54:00:00:00:11")])
    r = api.post("/api/clusters/", again, format="json")
    assert (r.status_code, r.data["code"]) == (409, "conflict") and "already has a live cluster named c1" in str(r.data)
    VirtualCluster.objects.update(state=ClusterState.TEARING_DOWN)
    r = api.post("/api/clusters/", again, format="json")
    assert (r.status_code, r.data["code"]) == (409, "busy") and "being torn down" in r.data["detail"], r.data
    assert r.has_header("Retry-After") and VirtualCluster.objects.count() == 1


def test_host_no_core_reaches_is_422(fabric, images, api, alice):
    from network.choices import PortRole
    from network.tests.factories import HostFactory, SiteFactory, SwitchFactory, SwitchPortFactory

    island = SiteFactory(name="island")
    switch = SwitchFactory(name="sw-island", site=island, platform="fake", driver_args={"state_dir": fabric.state_dir})
    port = SwitchPortFactory(switch=switch, name="h1", role=PortRole.HOST_TRUNK)
    HostFactory(
        name="island1", site=island, switch_port=port, driver="fake", driver_args={"state_dir": fabric.state_dir}
    )
    api.force_authenticate(alice)
    r = api.post(
        "/api/clusters/",
        body(nodes=[("n1", "brno1", "52:54:00:00:00:01"), ("n2", "island1", "52:54:00:00:00:02")]),
        format="json",
    )
    assert r.status_code == 422, r.content
    assert "island" in str(r.data)
    assert VirtualCluster.objects.count() == 0 and not allocated_vids()


def test_pool_exhausted_is_409_and_nothing_leaks(fabric, images, api, alice):
    fabric.pool.ranges = "100-101"
    fabric.pool.save()
    api.force_authenticate(alice)
    for i in range(2):
        r = api.post(
            "/api/clusters/", body(name=f"c{i}", nodes=[(f"n{i}", "brno1", f"52:54:00:00:00:0{i}")]), format="json"
        )
        assert r.status_code == 201
    r = api.post("/api/clusters/", body(name="c9", nodes=[("n9", "brno1", "52:54:00:00:00:09")]), format="json")
    assert r.status_code == 409
    assert r.data["code"] == "pool_exhausted"
    assert VirtualCluster.objects.count() == 2 and len(allocated_vids()) == 2
    assert not Node.objects.filter(name="n9").exists()


def test_visibility_and_permissions(fabric, images, api, alice, bob, charlie, root, team):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(group=team.name), format="json").data["id"]
    api.force_authenticate(bob)  # group member: sees, cannot act
    assert api.get(f"/api/clusters/{cid}/").status_code == 200
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 403
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    api.force_authenticate(charlie)  # outsider: does not even see it
    assert api.get(f"/api/clusters/{cid}/").status_code == 404
    assert api.get("/api/clusters/").data["count"] == 0
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 404
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    api.force_authenticate(root)
    assert api.get("/api/clusters/").data["count"] == 1
    api.force_authenticate(alice)
    r = api.post(
        "/api/clusters/", body(name="x", owner="bob", nodes=[("n", "brno1", "52:54:00:00:09:01")]), format="json"
    )
    assert r.status_code == 403
    assert not VirtualCluster.objects.filter(name="x").exists()


def test_token_scopes(fabric, images, alice):
    _, read_only = token_create(user=alice, name="ro", scopes=[TokenScope.CLUSTERS_READ])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {read_only}")
    assert client.get("/api/clusters/").status_code == 200
    assert client.post("/api/clusters/", body(), format="json").status_code == 403
    client.credentials(HTTP_AUTHORIZATION="Bearer vc_deadbeef_nope")
    assert client.get("/api/clusters/").status_code == 401


def test_an_admins_token_is_only_as_strong_as_its_scopes(fabric, images, api, alice, root):
    """``clusters:write`` is "create and change own clusters", also on an admin's token: alice's cluster is
    not even visible to it; with ``clusters:manage`` (or in the browser, a session) the admin acts on it."""
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    _, write = token_create(user=root, name="mine", scopes=[TokenScope.CLUSTERS_WRITE])
    _, manage = token_create(user=root, name="all", scopes=[TokenScope.CLUSTERS_MANAGE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {write}")
    assert client.get("/api/clusters/").data["count"] == 0
    assert client.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 404
    assert client.post("/api/clusters/", {**body(name="for-alice"), "owner": "alice"}, format="json").status_code == 403
    r = client.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "public", "reason": "x"}, format="json")
    assert r.status_code == 404
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {manage}")
    assert client.get("/api/clusters/").data["count"] == 1
    api.force_authenticate(root)
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202


def test_teardown_cleans_every_device_and_quarantines_the_vlan(fabric, images, api, alice):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    r = api.post(f"/api/clusters/{cid}/teardown/", {"reason": "job finished"}, format="json")
    assert r.status_code == 202
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.TORN_DOWN
    for host in fabric.hosts:
        assert vid not in fabric.host_vlans(host)
    for site in fabric.switches:
        assert all(vid not in v for v in fabric.switch_ports(f"sw-{site}").values())
    alloc = VlanAllocation.objects.get(pool=fabric.pool, vid=vid)
    assert alloc.state == "quarantined"
    # a torn-down cluster can be neither torn down again nor extended
    again = api.post(f"/api/clusters/{cid}/teardown/", {}, format="json")
    assert again.status_code == 409 and "has ended (torn down): nothing to tear down" in again.data["detail"]
    later = (timezone.now() + timedelta(hours=2)).isoformat()
    assert api.patch(f"/api/clusters/{cid}/", {"expires_at": later}, format="json").status_code == 409


def test_a_teardown_ends_the_step_of_the_workflow_it_interrupts(fabric, images, api, alice, monkeypatch):
    """A scheduler tears a cluster down while it provisions, or while a node change converges: the interrupted
    workflow never reports, so its step was left "running" for good (the progress of a torn-down cluster
    named it as the current step). It ends failed, saying the teardown called it off."""
    from celery.canvas import _chain

    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # the workflow is sent, and still runs
        provisioning = api.post("/api/clusters/", body(), format="json").data["id"]
    updating = api.post("/api/clusters/", body(name="c2", nodes=[("m1", "brno2", "52:54:00:00:01:01")]), format="json")
    updating = updating.data["id"]
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)
        node = {"name": "m2", "host": "prague1", "mac": "52:54:00:00:01:02"}
        assert api.post(f"/api/clusters/{updating}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    for cid, state, interrupted in (
        (provisioning, ClusterState.PROVISIONING, "network"),
        (updating, ClusterState.UPDATING, "nodes.add"),
    ):
        assert VirtualCluster.objects.get(pk=cid).state == state
        r = api.post(f"/api/clusters/{cid}/teardown/", {"reason": "job cancelled"}, format="json")
        assert r.status_code == 202, r.content
        data = api.get(f"/api/clusters/{cid}/").data
        assert data["state"] == "torn_down"
        assert data["progress"]["current"] is None
        assert not [s for s in data["steps"] if s["status"] == "running"], data["steps"]
        step = next(s for s in data["steps"] if s["name"] == interrupted)
        assert step["status"] == "failed" and step["finished_at"] is not None
        assert step["error"] == "called off by the teardown: job cancelled (by alice)", step
        assert next(s for s in data["steps"] if s["name"] == "teardown")["status"] == "ok"
    assert not allocated_vids()


def test_node_changes_on_an_ended_cluster_are_a_conflict_naming_its_state(fabric, images, api, alice):
    """Adding a node to a torn-down (or failed) cluster was a 409 saying so, but removing, migrating or ending
    the migration of one of its nodes was a 404 "No Node matches", as if the scheduler had the node's id
    wrong: the teardown had removed the nodes. Every node change is now the same 409."""
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    n1 = Node.objects.get(cluster_id=cid, name="n1")
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    failed = api.post("/api/clusters/", body(name="c2", nodes=[("m1", "brno2", "52:54:00:00:01:01")]), format="json")
    m1 = Node.objects.get(cluster_id=failed.data["id"], name="m1")
    services.cluster_fail(cluster_id=m1.cluster_id, generation=m1.cluster.workflow_generation, reason="broken")
    for node, state in ((n1, "torn down"), (m1, "failed")):
        base = f"/api/clusters/{node.cluster_id}/nodes"
        for r in (
            api.delete(f"{base}/{node.pk}/"),
            api.post(f"{base}/{node.pk}/migrate/", {"target_host": "prague1"}, format="json"),
            api.post(f"{base}/{node.pk}/migrated/", {}, format="json"),
            api.post(f"{base}/{node.pk}/migrate/cancel/", {}, format="json"),
            api.post(
                f"{base}/", {"nodes": [{"name": "n9", "host": "prague1", "mac": "52:54:00:00:09:09"}]}, format="json"
            ),
        ):
            assert r.status_code == 409, (r.request["PATH_INFO"], r.content)
            assert f"is {state}; this needs it to be ready" in r.data["detail"]
        assert api.delete(f"{base}/999999/").status_code == 404  # a node it never had
    other = api.post("/api/clusters/", body(name="c3", nodes=[("k1", "brno2", "52:54:00:00:02:01")]), format="json")
    k1 = Node.objects.get(cluster_id=other.data["id"], name="k1")
    assert api.delete(f"/api/clusters/{cid}/nodes/{k1.pk}/").status_code == 404  # another cluster's node


@pytest.fixture
def errbacks_run():
    """Eager Celery as on a worker: a failing task calls its error callbacks instead of raising on the spot."""
    from portal.celery import app

    before = app.conf.task_eager_propagates
    app.conf.task_eager_propagates = False
    yield
    app.conf.task_eager_propagates = before


def test_a_failing_receiver_of_cluster_ended_does_not_fail_the_teardown(fabric, images, api, alice, errbacks_run):
    """The cluster has ended whatever a receiver of ``cluster_ended`` does (access's sweep revokes what a failed
    receiver left): the teardown is done, not "incomplete"."""
    from clusters.signals import cluster_ended

    def broken(**kwargs):
        raise RuntimeError("deadlock detected")

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    cluster_ended.connect(broken, weak=False)
    try:
        assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    finally:
        cluster_ended.disconnect(broken)
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.TORN_DOWN and "incomplete" not in cluster.state_reason, cluster.state_reason
    assert cluster.steps.get(name="teardown").status == "ok"


def test_a_devices_own_message_is_the_middlewares_and_operators_not_the_clusters_people(
    fabric, images, api, alice, scheduler, root, errbacks_run
):
    """A failure names its device and quotes the device's own message (the middleware, the failure's caller,
    reads it: ``clusters:manage``); the cluster's owner and group see the device named and the message withheld —
    as the network view does — in the API's reason and steps and on the pages (the message quotes the device's
    configuration)."""
    from django.test import Client

    from network.models import DeviceChange

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    fabric.set_switch_args("sw-pilsen", fail_commit="permanent")
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    message = DeviceChange.objects.filter(device="sw-pilsen").exclude(error="").latest("pk").error
    quoted, withheld = f"sw-pilsen: {message}", "sw-pilsen: (the device's message: ask an operator)"
    assert quoted in VirtualCluster.objects.get(pk=cid).state_reason  # (as recorded)

    mine = api.get(f"/api/clusters/{cid}/").data
    assert withheld in mine["state_reason"] and message not in mine["state_reason"], mine["state_reason"]
    assert all(message not in (step["error"] + step["detail"]) for step in mine["steps"])
    listed = {c["id"]: c for c in api.get("/api/clusters/").data["results"]}[cid]
    assert withheld in listed["state_reason"] and message not in str(listed)
    full = scheduler.get(f"/api/clusters/{cid}/").data
    assert quoted in full["state_reason"]

    browser = Client()
    browser.force_login(alice)
    for page in (browser.get("/").content.decode(), browser.get(f"/clusters/{cid}/").content.decode()):
        assert message not in page.replace("&#x27;", "'") and "the device&#x27;s message: ask an operator" in page
    operator = Client()
    operator.force_login(root)
    assert message in operator.get(f"/clusters/{cid}/").content.decode().replace("&#x27;", "'")
    admin_page = f"/admin/clusters/virtualcluster/{cid}/change/"
    assert message in operator.get(admin_page).content.decode().replace("&#x27;", "'")
    # staff who may view clusters, not device changes: the admin's page withholds it too
    from portal.tests.test_staff_permissions import staff

    viewer = Client()
    viewer.force_login(staff("vera", "clusters.view_virtualcluster"))
    page = viewer.get(admin_page).content.decode().replace("&#x27;", "'")
    assert message not in page and withheld in page
    assert quoted in VirtualCluster.objects.get(pk=cid).state_reason  # (the pages changed nothing stored)


def test_a_devices_message_is_withheld_also_cut_short_or_as_python_wrote_it():
    """A reason joins several failures and is cut at 2000 characters (the last message may end half-way); a
    chord's error, when the failed task's result was lost, quotes the message as Python writes it."""
    long = "commit refused: interface Gi0/1 switchport trunk allowed vlan add 4095 % Invalid input " * 30
    messages = sorted([("sw1", long), ("sw2", "boom")], key=lambda pair: -len(pair[1]))
    withheld = "(the device's message: ask an operator)"
    cut = f"provisioning failed: sw2: boom; compensation incomplete (sw1: {long})"[:400]
    said = selectors.without_device_messages(cut, messages)
    assert said == f"provisioning failed: sw2: {withheld}; compensation incomplete (sw1: {withheld}"
    chord = f"Dependency 1a2b raised DeviceChangeFailed('sw1', {long!r}, 12)"
    assert long[:40] not in selectors.without_device_messages(chord, messages)
    assert selectors.without_device_messages("sw3: boom", messages) == "sw3: boom"  # (another device's words)


def test_teardown_stuck_on_a_failing_switch_is_retried_by_the_periodic_task(fabric, images, api, alice, errbacks_run):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    fabric.set_switch_args("sw-pilsen", fail_commit="permanent")
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.TEARING_DOWN
    assert "teardown incomplete" in cluster.state_reason and "sw-pilsen" in cluster.state_reason
    assert VlanAllocation.objects.get(pool=fabric.pool, vid=vid).state == "allocated"

    fabric.set_switch_args("sw-pilsen")  # repaired
    assert services.clusters_retry_stuck_teardowns(older_than=timedelta(0)) == [cid]
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.TORN_DOWN
    assert all(vid not in v for v in fabric.switch_ports("sw-pilsen").values())
    assert VlanAllocation.objects.get(pool=fabric.pool, vid=vid).state == "quarantined"
    assert services.clusters_retry_stuck_teardowns(older_than=timedelta(0)) == []


def test_create_while_the_broker_is_down_is_provisioned_later(fabric, images, api, alice, monkeypatch):
    from celery.canvas import _chain
    from kombu.exceptions import OperationalError

    def broker_down(self, *args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", broker_down)  # the seam where the workflow goes to the broker
        r = api.post("/api/clusters/", body(), format="json")
    assert r.status_code == 201, r.content
    cluster = VirtualCluster.objects.get(pk=r.data["id"])
    assert cluster.state == ClusterState.REQUESTED  # not PROVISIONING with nothing running
    assert [s.name for s in cluster.steps.all()] == ["allocate"]

    assert services.clusters_resume_requested(older_than=timedelta(0)) == [cluster.pk]
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY, cluster.state_reason
    assert cluster.vlan_id in fabric.host_vlans("brno1") and cluster.vlan_id in fabric.host_vlans("pilsen1")
    assert services.clusters_resume_requested(older_than=timedelta(0)) == []
    # the request's own hook, late (its process stalled past the sweep): the sweep's generation has the cluster,
    # so it records and sends nothing
    changes = DeviceChange.objects.count()
    workflows.start_provision(cluster.pk, 0)
    assert DeviceChange.objects.count() == changes
    cluster.refresh_from_db()
    assert (cluster.state, cluster.workflow_generation) == (ClusterState.READY, 1)


def test_a_provisioning_that_never_finishes_fails_at_its_deadline_and_is_rolled_back(
    fabric, images, api, alice, monkeypatch, settings
):
    """The workflow went to the broker but no worker ever runs it (here: a host agent that never comes):
    at ``CLUSTER_PROVISION_TIMEOUT`` the periodic task fails the cluster, naming the devices still waiting
    and the queue each waits on, and rolls it back."""
    from celery.canvas import _chain

    from network.models import Host

    Host.objects.filter(name="pilsen1").update(agent_queue="host.pilsen1")
    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # sent, and never consumed
        r = api.post("/api/clusters/", body(), format="json")
    assert r.status_code == 201, r.content
    cluster = VirtualCluster.objects.get(pk=r.data["id"])
    assert cluster.state == ClusterState.PROVISIONING
    assert services.clusters_end_stalled_workflows() == []  # not late yet
    VirtualCluster.objects.filter(pk=cluster.pk).update(updated_at=timezone.now() - timedelta(seconds=601))
    assert services.clusters_end_stalled_workflows() == [cluster.pk]
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.FAILED
    assert cluster.state_reason.startswith("provisioning did not finish within 600 s; still waiting: "), cluster
    assert "pilsen1 (queue host.pilsen1)" in cluster.state_reason
    assert "sw-brno (the central worker)" in cluster.state_reason
    assert [(s.name, s.status) for s in cluster.steps.order_by("pk")][-2:] == [
        ("network", "failed"),
        ("compensate", "ok"),
    ]
    assert VlanAllocation.objects.get(pool=fabric.pool, vid=cluster.vlan_id).state == "quarantined"
    assert all(not vids for vids in fabric.switch_ports("sw-pilsen").values())
    assert services.clusters_end_stalled_workflows() == []

    # an update (a node added) whose workflow never runs: its step fails at the deadline, the cluster is
    # READY again and takes the next change
    cid = api.post("/api/clusters/", body(name="c2"), format="json").data["id"]
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)
        node = {"name": "n3", "host": "pilsen1", "mac": "52:54:00:00:00:33"}
        assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.UPDATING
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(seconds=601))
    assert services.clusters_end_stalled_workflows() == [cid]
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    step = cluster.steps.order_by("pk").last()
    assert step.status == "failed" and step.error.startswith("the update did not finish within 600 s"), step.error
    assert "pilsen1 (queue host.pilsen1)" in step.error
    from clusters.tasks import update_done

    update_done(cid, step.generation, step.pk)  # the workflow's late last task: the deadline's record stays
    step.refresh_from_db()
    assert step.status == "failed" and VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    assert api.delete(f"/api/clusters/{cid}/nodes/{cluster.nodes.get(name='n3').pk}/").status_code == 202


def test_a_rollback_that_never_finishes_ends_the_cluster_failed_at_the_next_deadline(
    fabric, images, api, alice, monkeypatch
):
    """No worker runs the provisioning, nor its rollback: the deadline claims the rollback once (a second run
    soon after does nothing: it was claiming it again at every run, starting rollback after rollback), and
    when the rollback is still not done as long again, the cluster ends FAILED saying so — a scheduler
    waiting for READY or FAILED is not left waiting."""
    from celery.canvas import _chain

    api.force_authenticate(alice)
    monkeypatch.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # sent, and never consumed
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    late = timezone.now() - timedelta(seconds=601)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=late)
    assert services.clusters_end_stalled_workflows() == [cid]  # the rollback is started (and not consumed)
    assert services.clusters_end_stalled_workflows() == []
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.PROVISIONING and cluster.steps.filter(name="compensate").count() == 1
    VirtualCluster.objects.filter(pk=cid).update(updated_at=late)
    assert services.clusters_end_stalled_workflows() == [cid]
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.FAILED
    assert cluster.state_reason.startswith("provisioning did not finish within 600 s; still waiting: ")
    assert "; the rollback did not finish within 600 s; still waiting: brno1 (the central worker)" in (
        cluster.state_reason
    ), cluster.state_reason
    assert list(cluster.steps.filter(name="compensate").values_list("status", flat=True)) == ["failed"]
    assert services.clusters_end_stalled_workflows() == []


def test_a_rollback_that_could_not_be_sent_is_sent_again_once_the_cluster_has_failed(
    fabric, images, api, alice, monkeypatch
):
    """The provisioning stalls and, at its deadline, the rollback cannot be sent (the broker is down); at the
    next deadline the cluster ends FAILED. Its network was never rolled back — the segment still in the
    devices' desired state, its VLAN allocated — so the periodic task sends that rollback, until it goes:
    nothing is left on the devices and the VLAN goes to quarantine."""
    from celery.canvas import _chain

    from clusters.tasks import expire
    from network.tasks import reconcile

    api.force_authenticate(alice)
    monkeypatch.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # sent, and never consumed
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    # the workflow's work recorded an interval ago (never done): the reconciler waits no longer, and the switches
    # and hosts carry the VLAN, which is in their desired state
    DeviceChange.objects.update(created_at=timezone.now() - timedelta(hours=1))
    reconcile(repair=True)
    assert vid in fabric.host_vlans("brno1")

    def broker_down(self, *a, **k):
        raise ConnectionError("broker down")

    monkeypatch.setattr(_chain, "apply_async", broker_down)
    late = timezone.now() - timedelta(seconds=601)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=late)
    assert services.clusters_end_stalled_workflows() == [cid]  # the rollback is claimed, and not sent
    VirtualCluster.objects.filter(pk=cid).update(updated_at=late)
    assert services.clusters_end_stalled_workflows() == [cid]
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.FAILED and cluster.segment.state == Segment.State.PENDING

    def refuse(signature, *a, **k):
        raise ConnectionError("broker down")

    with monkeypatch.context() as m:  # still down: nothing sent, the next run tries again
        m.setattr("celery.canvas.Signature.apply_async", refuse)
        assert services.clusters_roll_back_abandoned_networks() == []
    monkeypatch.undo()  # the broker is back (eager Celery: the rollback runs now)
    expire()
    cluster.refresh_from_db()
    assert cluster.segment.state == Segment.State.FAILED
    assert VlanAllocation.objects.get(pool=fabric.pool, vid=vid).state == VlanAllocation.State.QUARANTINED
    assert vid not in fabric.host_vlans("brno1")
    assert all(vid not in vids for site in fabric.switches for vids in fabric.switch_ports(f"sw-{site}").values())
    assert services.clusters_roll_back_abandoned_networks() == []  # done: not sent again


def test_expiry_leaves_a_cluster_whose_lifetime_was_extended_meanwhile(fabric, images, api, alice, monkeypatch):
    """The expiry reads the expired clusters, then tears each down: an extension committed in between (the
    scheduler got its 200) wins."""
    api.force_authenticate(alice)
    a = api.post("/api/clusters/", body(name="a", nodes=[("n1", "brno1", "52:54:00:00:00:01")]), format="json")
    b = api.post("/api/clusters/", body(name="b", nodes=[("n1", "brno2", "52:54:00:00:00:02")]), format="json")
    ids = {a.data["id"], b.data["id"]}
    VirtualCluster.objects.filter(pk__in=ids).update(expires_at=timezone.now() - timedelta(seconds=1))
    later = timezone.now() + timedelta(days=2)
    teardown = services.cluster_teardown
    extended = []

    def extend_the_other_first(*, cluster, **kwargs):
        if not extended:  # while the expiry works on one, the scheduler extends the other
            (other,) = ids - {cluster.pk}
            r = api.patch(f"/api/clusters/{other}/", {"expires_at": later.isoformat()}, format="json")
            assert r.status_code == 200, r.content
            extended.append(other)
        return teardown(cluster=cluster, **kwargs)

    monkeypatch.setattr(services, "cluster_teardown", extend_the_other_first)
    assert services.clusters_expire() == list(ids - set(extended))
    kept = VirtualCluster.objects.get(pk=extended[0])
    assert kept.state == ClusterState.READY and kept.expires_at > timezone.now() + timedelta(days=1)
    assert VirtualCluster.objects.get(pk__in=ids - set(extended)).state == ClusterState.TORN_DOWN


def _teardown_started_again(api, alice, monkeypatch) -> tuple[int, int, int]:
    """A teardown whose worker dies (sent, never consumed; its step started), started again by the periodic
    task with its step started too: (cluster id, the first generation, the retry's)."""
    from celery.canvas import _chain

    from clusters import tasks

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    monkeypatch.setattr(_chain, "apply_async", lambda self, *a, **k: None)
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    first = VirtualCluster.objects.get(pk=cid).workflow_generation
    tasks.teardown_begin(cid, first)
    lost = timezone.now() - rollback_stalled_after() - timedelta(minutes=1)  # no progress for as long as it may take
    VirtualCluster.objects.filter(pk=cid).update(updated_at=lost)
    assert services.clusters_retry_stuck_teardowns() == [cid]
    retry = VirtualCluster.objects.get(pk=cid).workflow_generation
    tasks.teardown_begin(cid, retry)
    return cid, first, retry


def _teardown_sent(api, user, monkeypatch) -> tuple[int, int, list]:
    """A cluster of ``user`` whose teardown was asked for: (its id, the teardown's generation, the chains sent
    to the broker — recorded, not sent — by that request and any later one)."""
    from celery.canvas import _chain

    api.force_authenticate(user)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    sent = []
    monkeypatch.setattr(_chain, "apply_async", lambda self, *a, **k: sent.append(self))
    assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    return cid, VirtualCluster.objects.get(pk=cid).workflow_generation, sent


def test_a_teardown_in_a_slow_queue_is_left_alone_one_never_sent_or_lost_is_sent_again(
    fabric, images, api, alice, monkeypatch, settings
):
    """The periodic task restarts a teardown that failed, was never sent or was lost; one that was sent and
    waits in a slow queue (or runs) is left alone — restarting it failed its step and queued another copy at
    every run, so under a lag of more than the period no teardown ever ended."""

    from clusters import tasks

    settings.CELERY_TASK_TIME_LIMIT, settings.DEVICE_RETRY_MAX = 180, 3  # lost after 24 min without progress
    cid, generation, sent = _teardown_sent(api, alice, monkeypatch)
    tasks.teardown_begin(cid, generation)
    late = timezone.now() - timedelta(minutes=6)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=late)
    assert services.clusters_retry_stuck_teardowns() == []  # sent, running: its step stays
    assert len(sent) == 1
    assert ClusterStep.objects.get(cluster_id=cid, name="teardown", generation=generation).status == "running"

    # never sent (the broker refused it, or the process died before it sent it): sent again
    VirtualCluster.objects.filter(pk=cid).update(provision_sent=None, updated_at=late)
    assert services.clusters_retry_stuck_teardowns() == [cid]
    assert len(sent) == 2
    generation = VirtualCluster.objects.get(pk=cid).workflow_generation
    tasks.teardown_begin(cid, generation)

    # sent, then lost: sent again once it has made no progress for as long as a rollback may take
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - rollback_stalled_after() / 2)
    assert services.clusters_retry_stuck_teardowns() == []
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - rollback_stalled_after())
    assert services.clusters_retry_stuck_teardowns() == [cid]
    assert len(sent) == 3


def test_a_teardown_that_failed_before_its_first_step_is_sent_again_at_the_next_sweep(
    fabric, images, api, alice, monkeypatch
):
    """A teardown chain that fails before ``teardown_begin`` records its step (its first task failed: the
    database went away under it) fails a step all the same: the sweep restarts it after ``older_than``, not
    after the tens of minutes it waits for a lost one."""
    from types import SimpleNamespace

    from clusters import tasks

    cid, generation, sent = _teardown_sent(api, alice, monkeypatch)
    tasks.teardown_failed(SimpleNamespace(id="t"), RuntimeError("connection to server lost"), None, cid, generation)
    step = ClusterStep.objects.get(cluster_id=cid, name="teardown", generation=generation)
    assert (step.status, step.error) == ("failed", "RuntimeError: connection to server lost")
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(minutes=6))
    assert services.clusters_retry_stuck_teardowns() == [cid]
    assert len(sent) == 2
    # a late report of that failed chain records no step in the new workflow
    tasks.teardown_failed(SimpleNamespace(id="t"), RuntimeError("late"), None, cid, generation)
    assert not ClusterStep.objects.filter(cluster_id=cid, name="teardown", generation=generation + 1).exists()


def test_a_late_callback_of_an_older_teardown_leaves_the_running_retrys_step_alone(
    fabric, images, api, alice, monkeypatch
):
    from clusters import tasks
    from clusters.models import StepStatus

    cid, first, retry = _teardown_started_again(api, alice, monkeypatch)
    tasks.teardown_done(cid, first)  # the first teardown's last callback, late
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.TEARING_DOWN
    assert cluster.steps.get(name="teardown", generation=retry).status == StepStatus.RUNNING


def test_a_stalled_teardown_started_again_leaves_no_step_running(fabric, images, api, alice, monkeypatch):
    """The first teardown's worker dies; the periodic task starts it again (a new generation), which
    completes: the stalled one's step ends too (it stayed the progress's current step for good)."""
    from clusters import tasks
    from clusters.models import StepStatus

    cid, first, retry = _teardown_started_again(api, alice, monkeypatch)
    tasks.teardown_done(cid, retry)
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.TORN_DOWN
    assert not cluster.steps.filter(status=StepStatus.RUNNING).exists()
    assert cluster.steps.get(name="teardown", generation=first).error == "stalled: started again"


def test_a_redelivered_task_records_its_step_once(fabric, images, api, alice, monkeypatch):
    """acks_late: a task whose worker died after it ran is delivered again and runs again. The gateway leg and
    the teardown's start record their step once per workflow (the progress lists each step once)."""
    from clusters import tasks

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]  # eager: ready now
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    tasks.gateway_leg(cid, cluster.workflow_generation)  # delivered again
    assert cluster.steps.filter(name="gateway", generation=cluster.workflow_generation).count() == 1

    monkeypatch.setattr(services.workflows, "start_teardown", lambda cluster_id, generation: None)
    services.cluster_teardown(cluster=cluster, reason="test")
    cluster.refresh_from_db()
    for _ in range(2):
        tasks.teardown_begin(cid, cluster.workflow_generation)
    assert cluster.steps.filter(name="teardown", generation=cluster.workflow_generation).count() == 1


def test_changing_the_lifetime_does_not_postpone_a_deadline(fabric, images, api, alice, monkeypatch):
    from celery.canvas import _chain

    api.force_authenticate(alice)
    monkeypatch.setattr(_chain, "apply_async", lambda self, *a, **k: None)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(seconds=601))
    later = (timezone.now() + timedelta(days=2)).isoformat()
    assert api.patch(f"/api/clusters/{cid}/", {"expires_at": later}, format="json").status_code == 200
    assert services.clusters_end_stalled_workflows() == [cid]


def test_extend_lifetime(fabric, images, api, alice):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    later = timezone.now() + timedelta(days=3)
    r = api.patch(f"/api/clusters/{cid}/", {"expires_at": later.isoformat()}, format="json")
    assert r.status_code == 200
    assert abs(VirtualCluster.objects.get(pk=cid).expires_at - later) < timedelta(seconds=1)
    too_late = timezone.now() + timedelta(days=1000)
    assert api.patch(f"/api/clusters/{cid}/", {"expires_at": too_late.isoformat()}, format="json").status_code == 400


def test_expiry_tears_down(fabric, images, api, alice):
    from clusters.tasks import expire

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    VirtualCluster.objects.filter(pk=cid).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expire() == [cid]
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.TORN_DOWN


def test_nodes_add_refuses_a_name_the_cluster_already_has(fabric, images, api, alice):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    r = api.post(
        f"/api/clusters/{cid}/nodes/",
        {"nodes": [{"name": "n1", "host": "prague1", "mac": "52:54:00:00:00:0a"}]},  # a new MAC, a taken name
        format="json",
    )
    assert r.status_code == 400, r.content
    assert r.data["nodes"] == ["node n1 already exists in this cluster"]
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    assert sorted(cluster.nodes.values_list("name", flat=True)) == ["n1", "n2"]
    assert cluster.vlan_id not in fabric.host_vlans("prague1")


def test_a_node_removed_by_a_concurrent_request_is_not_removed_twice(fabric, images, api, alice):
    """Two DELETEs of one node at once: both read the node before either locks the cluster; when the first
    has finished (its update too) by the time the second gets the lock, the second is refused — not a
    second removal with a second update of the network."""
    from clusters.models import ClusterStep

    api.force_authenticate(alice)
    cid = api.post(
        "/api/clusters/",
        body(
            nodes=[
                ("n1", "brno1", "52:54:00:00:07:01"),
                ("n2", "pilsen1", "52:54:00:00:07:02"),
                ("n3", "prague1", "52:54:00:00:07:03"),
            ]
        ),
        format="json",
    ).data["id"]
    cluster = VirtualCluster.objects.get(pk=cid)
    read_by_both = Node.objects.get(cluster=cluster, name="n3")
    services.cluster_node_remove(cluster=cluster, node=Node.objects.get(pk=read_by_both.pk))  # the first
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY  # eager Celery: its update ended
    with pytest.raises(Conflict, match="n3 has been removed already"):
        services.cluster_node_remove(cluster=cluster, node=read_by_both)
    assert ClusterStep.objects.filter(cluster=cluster, name="nodes.remove").count() == 1


def test_nodes_add_remove_and_migration_converge_the_network(fabric, images, api, alice):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    r = api.post(
        f"/api/clusters/{cid}/nodes/",
        {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]},
        format="json",
    )
    assert r.status_code == 202, r.content
    assert vid in fabric.host_vlans("prague1")
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.READY
    n3 = Node.objects.get(cluster_id=cid, name="n3")
    assert n3.state == "ready"

    # migrate n2 from pilsen1 to prague2: prepared → both hosts carry the VLAN
    n2 = Node.objects.get(cluster_id=cid, name="n2")
    r = api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague2"}, format="json")
    assert r.status_code == 202, r.content
    assert vid in fabric.host_vlans("prague2") and vid in fabric.host_vlans("pilsen1")
    r = api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrated/", {}, format="json")
    assert r.status_code == 202
    assert vid not in fabric.host_vlans("pilsen1")  # no node left there
    assert all(vid not in v for v in fabric.switch_ports("sw-pilsen").values())  # nor on its site
    n2.refresh_from_db()
    assert n2.host.name == "prague2" and n2.state == "ready"

    r = api.delete(f"/api/clusters/{cid}/nodes/{n3.pk}/")
    assert r.status_code == 202
    assert vid in fabric.host_vlans("prague2") and vid not in fabric.host_vlans("prague1")
    # a second migrate/complete on a non-migrating node is a conflict
    assert api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrated/", {}, format="json").status_code == 409


def test_a_prepared_migration_can_be_called_off(fabric, images, api, alice, charlie):
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    n2 = Node.objects.get(cluster_id=cid, name="n2")
    cancel = f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/cancel/"
    r = api.post(cancel, {}, format="json")
    assert r.status_code == 409 and "not migrating" in r.data["detail"]  # nothing to call off yet

    # prepared toward prague2: the target site's switch and host carry the VLAN
    assert (
        api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague2"}, format="json").status_code
        == 202
    )
    assert vid in fabric.host_vlans("prague2")
    assert any(vid in v for v in fabric.switch_ports("sw-prague").values())
    api.force_authenticate(charlie)
    assert api.post(cancel, {}, format="json").status_code == 404  # someone else's cluster
    api.force_authenticate(alice)

    r = api.post(cancel, {}, format="json")
    assert r.status_code == 202, r.content
    node = next(n for n in r.data["nodes"] if n["id"] == n2.pk)
    assert (node["state"], node["host"], node["target_host"], node["target_attachment"]) == (
        "ready",
        "pilsen1",
        None,
        None,
    )
    # the target and its site are clean again; the node's own host and site keep the VLAN
    assert vid not in fabric.host_vlans("prague2")
    assert all(vid not in v for v in fabric.switch_ports("sw-prague").values())
    assert vid in fabric.host_vlans("pilsen1")
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY
    step = cluster.steps.get(name="migrate.cancel")
    assert step.status == "ok" and step.detail == "n2: stays on pilsen1, prague2 is left"
    assert api.post(cancel, {}, format="json").status_code == 409  # called off already
    assert api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrated/", {}, format="json").status_code == 409
    # and it may migrate again
    assert (
        api.post(f"/api/clusters/{cid}/nodes/{n2.pk}/migrate/", {"target_host": "prague2"}, format="json").status_code
        == 202
    )


def test_list_filters_and_query_count(fabric, images, api, alice, django_assert_max_num_queries):
    api.force_authenticate(alice)
    for i in range(5):
        api.post(
            "/api/clusters/",
            body(
                name=f"c{i}",
                job_id=f"j{i}",
                nodes=[(f"n{i}", "brno1", f"52:54:00:00:10:0{i}"), (f"m{i}", "prague1", f"52:54:00:00:20:0{i}")],
            ),
            format="json",
        )
    with django_assert_max_num_queries(8):
        r = api.get("/api/clusters/")
    assert r.data["count"] == 5
    assert api.get("/api/clusters/?job_id=j3").data["results"][0]["name"] == "c3"
    assert api.get("/api/clusters/?state=ready").data["count"] == 5
    assert api.get("/api/clusters/?state=bogus").status_code == 400
    assert api.get("/api/clusters/?connectivity=closed").data["count"] == 5
    r = api.get("/api/clusters/?connectivity=Closed")  # a typo was an empty list, as if there were none
    assert r.status_code == 400 and "connectivity" in r.data
    # an empty state or connectivity (a template's empty variable) filters nothing: it was an empty list, as if
    # there were none; an empty job id, name or owner matches as given: never every cluster
    for query in ("state=", "connectivity=", "state=&connectivity="):
        assert api.get(f"/api/clusters/?{query}").data["count"] == 5, query
    for query in ("job_id=", "name=", "owner=", "state=&job_id="):
        assert api.get(f"/api/clusters/?{query}").data["count"] == 0, query
    assert api.get("/api/clusters/?state=&name=c2").data["results"][0]["name"] == "c2"
    assert api.get("/api/clusters/?owner=alice&state=ready").data["count"] == 5
    assert api.get("/api/clusters/?owner=bob").data["count"] == 0
    assert IdempotencyKey.objects.count() == 0


def test_schema_and_docs(api, alice):
    api.force_authenticate(alice)
    r = api.get("/api/schema/")
    assert r.status_code == 200
    assert b"/api/clusters/{id}/nodes/{node_id}/migrate/" in r.content
    docs = api.get("/api/docs/")
    assert docs.status_code == 200


def test_the_docs_page_needs_no_cdn(api, alice):
    """Swagger UI comes from the portal's static files (a CDN is unreachable from many sites' networks, and
    its "latest" would run unpinned code on a logged-in page): every script and style the page loads is one
    of ours."""
    import re

    from django.conf import settings
    from django.contrib.staticfiles import finders

    api.force_authenticate(alice)
    page = api.get("/api/docs/").content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', page)
    assert len(assets) >= 3, assets
    assert "cdn" not in page and "//" not in "".join(assets), assets
    prefix = "/" + settings.STATIC_URL.lstrip("/")
    for asset in assets:
        assert asset.startswith(prefix) and finders.find(asset[len(prefix) :]), asset


def test_connectivity_override_is_admin_only_audited_and_moves_the_gateway_leg(fabric, images, api, alice, root):
    from portal.models import AuditEntry

    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    vid = VirtualCluster.objects.get(pk=cid).vlan_id
    created_closed = VirtualCluster.objects.get(pk=cid)
    assert created_closed.closed_since is not None and created_closed.closed_since <= created_closed.ready_at
    assert vid in fabric.switch_ports("sw-brno")["gw"]
    r = api.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "public", "reason": "vetted"}, format="json")
    assert r.status_code == 403
    api.force_authenticate(root)
    r = api.post(
        f"/api/clusters/{cid}/connectivity/",
        {"connectivity": "public", "reason": "image vetted by CERT"},
        format="json",
    )
    assert r.status_code == 202, r.content
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.connectivity == "public" and cluster.public_subnet == "198.19.0.0/28"
    assert "overridden by root: image vetted by CERT" in cluster.connectivity_reason
    assert cluster.state == ClusterState.READY
    assert vid not in fabric.switch_ports("sw-brno")["gw"]  # no longer on the access gateway trunk
    entry = AuditEntry.objects.filter(object_id=str(cid), action="update", changes__has_key="connectivity").get()
    assert entry.actor == "root" and entry.changes["connectivity"] == ["closed", "public"]
    assert AuditEntry.objects.filter(object_id=str(cid), action="action", message__contains="image vetted").exists()
    # On the provider's routed network the nodes take addresses of the subnet; back to closed, they keep them.
    assert [n["address"] for n in api.get(f"/api/clusters/{cid}/").data["nodes"]] == ["198.19.0.2", "198.19.0.3"]
    r = api.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "closed", "reason": "back"}, format="json")
    assert r.status_code == 202, r.content
    assert [n["address"] for n in api.get(f"/api/clusters/{cid}/").data["nodes"]] == ["198.19.0.2", "198.19.0.3"]
    reclosed = VirtualCluster.objects.get(pk=cid)
    assert reclosed.closed_since > reclosed.ready_at  # the gateways have it once their state is newer than this
    # Nodes that do not fit in a public subnet: a 400, and the cluster stays as it was (closed, its subnet free).
    PublicPrefix.objects.update(subnet_length=30)  # room for the router and one node
    r = api.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "public", "reason": "x"}, format="json")
    assert r.status_code == 400 and "2 nodes do not fit in a public subnet" in r.data["connectivity"][0], r.data
    cluster = VirtualCluster.objects.get(pk=cid)
    assert (cluster.connectivity, cluster.public_subnet, cluster.state) == ("closed", "", ClusterState.READY)
    assert vid in fabric.switch_ports("sw-brno")["gw"]


def test_connectivity_override_works_on_the_cluster_as_it_is_now(fabric, images, api, alice, root, monkeypatch):
    """The override reads the cluster under its row lock and writes only its own fields: a lifetime changed
    since the caller read the cluster stays, a node change in flight (UPDATING) is a 409, not overtaken;
    a reason as long as the field allows is cut to fit the record (it was a 500)."""
    from celery.canvas import _chain

    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    api.force_authenticate(root)
    r = api.post(f"/api/clusters/{cid}/connectivity/", {"connectivity": "public", "reason": "x" * 200}, format="json")
    assert r.status_code == 202, r.content
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.connectivity_reason.startswith("overridden by root: xxx") and len(cluster.connectivity_reason) == 200
    assert cluster.state == ClusterState.READY and cluster.connectivity == "public"

    as_read = VirtualCluster.objects.get(pk=cid)
    later = timezone.now() + timedelta(days=5)
    services.cluster_extend(cluster=as_read, expires_at=later)
    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", lambda self, *a, **k: None)  # the node change stays in flight
        node = {"name": "n3", "host": "pilsen1", "mac": "52:54:00:00:00:33"}
        assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": [node]}, format="json").status_code == 202
    with pytest.raises(Conflict, match="is updating network; this needs it to be ready"):
        services.connectivity_override(cluster=as_read, connectivity="closed", admin=root, reason="back")
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.UPDATING and cluster.connectivity == "public"
    assert abs(cluster.expires_at - later) < timedelta(seconds=1)


def test_create_costs_the_same_queries_for_one_node_or_six(fabric, images, api, alice, monkeypatch):
    """No query per node: the nodes' hosts are looked up together (a 16-site cluster's request must not cost
    16 more round trips than a 1-site one)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    monkeypatch.setattr(workflows, "start_provision", lambda *args: None)  # the request alone
    api.force_authenticate(alice)
    counts = []
    six = ["brno1", "brno2", "pilsen1", "pilsen2", "prague1", "prague2"]
    for i, hosts in enumerate([["brno1"], ["brno1"], six]):  # the first warms the caches (content types)
        nodes = [(f"n{k}", h, f"52:54:00:00:{i:02x}:{k:02x}") for k, h in enumerate(hosts)]
        with CaptureQueriesContext(connection) as queries:
            r = api.post("/api/clusters/", body(name=f"c{i}", nodes=nodes), format="json")
        assert r.status_code == 201, r.content
        assert len(r.data["nodes"]) == len(hosts)
        counts.append(len(queries))
    assert counts[1] == counts[2], counts
    r = api.post(
        "/api/clusters/",
        body(name="bad", nodes=[("n1", "brno1", "52:54:00:00:09:01"), ("n2", "nosuch", "52:54:00:00:09:02")]),
        format="json",
    )
    assert r.status_code == 400 and "nosuch" in str(r.data["nodes"][1]["host"])


def test_a_body_nested_too_deep_is_a_400(api, alice):
    api.force_authenticate(alice)
    r = api.generic("POST", "/api/clusters/", b"[" * 100_000, content_type="application/json")
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]


def test_a_body_a_few_hundred_levels_deep_with_an_idempotency_key_is_a_400(api, alice):
    """Deep enough for the decoder, too deep for the key's fingerprint (which walks the body): a 500 was the
    answer; the parser refuses any body deeper than the API's own."""
    api.force_authenticate(alice)
    deep = b'{"name": ' + b"[" * 600 + b"]" * 600 + b"}"
    r = api.generic("POST", "/api/clusters/", deep, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k1")
    assert r.status_code == 400 and "nested too deeply (more than 32 levels)" in r.json()["detail"]
    assert not VirtualCluster.objects.exists()


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/api/clusters/", rb'{"name": "c1", "connectivity": "\ud800"}'),  # a choice DRF quotes back
        ("/api/clusters/plan/", rb'{"\udfff": 1}'),  # an unknown key, quoted back as the error's key
    ],
)
def test_a_lone_surrogate_in_a_json_body_is_a_400(api, alice, path, raw):
    """JSON may escape a lone UTF-16 surrogate, which no UTF-8 text holds: the 400 that quoted it back could
    not be encoded (a 500). Now the parser refuses it; a surrogate pair (a real character) is fine."""
    api.force_authenticate(alice)
    r = api.generic("POST", path, raw, content_type="application/json")
    assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["detail"], r.content
    r = api.generic("POST", "/api/clusters/plan/", rb'{"\ud83d\ude00": 1}', content_type="application/json")
    assert r.status_code == 400 and r.json()["\U0001f600"] == ["unknown field"]  # a real character, quoted back


def test_a_change_without_the_trailing_slash_is_redirected_with_its_method(api, alice):
    """308: repeated with the same method and body; Django's 301 made clients repeat a POST as a GET (a list)."""
    api.force_authenticate(alice)
    r = api.post("/api/clusters?x=1", {"name": "c1"}, format="json")
    assert r.status_code == 308 and r["Location"] == "/api/clusters/?x=1"
    r = api.post("/api/clusters/7/teardown", {}, format="json")
    assert r.status_code == 308 and r["Location"] == "/api/clusters/7/teardown/"
    assert api.post("/api/no-such-thing", {}, format="json").status_code == 404
    assert api.get("/api/clusters").status_code == 301  # (a GET may follow Django's redirect as it is)


class ProcessDied(BaseException):
    """The web process killed (OOM, a deploy) between the commit and the send: nothing catches it."""


def test_a_provisioning_a_crash_kept_from_the_broker_is_sent_again(fabric, images, api, alice, monkeypatch):
    """The process that committed PROVISIONING died before it sent the workflow: nothing would ever run, and
    the deadline failed the cluster minutes later as if a device had not answered. The sweeper sends it again
    (a new generation) — but never one that was sent and waits in a slow queue."""
    from celery.canvas import _chain

    def dies(self, *args, **kwargs):
        raise ProcessDied

    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", dies)
        with pytest.raises(ProcessDied):
            api.post("/api/clusters/", body(), format="json")
    cluster = VirtualCluster.objects.get(owner=alice)
    assert cluster.state == ClusterState.PROVISIONING and cluster.provision_sent is None
    assert services.clusters_resend_unsent(older_than=timedelta(minutes=1)) == []  # not yet: it may be on its way
    assert services.clusters_resend_unsent(older_than=timedelta(0)) == [cluster.pk]
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY, cluster.state_reason
    assert cluster.provision_sent == cluster.workflow_generation
    assert cluster.vlan_id in fabric.host_vlans("brno1") and cluster.vlan_id in fabric.host_vlans("pilsen1")
    network = [(s.status, s.error) for s in cluster.steps.filter(name="network").order_by("pk")]
    assert network == [("failed", "never sent to the workers: sent again"), ("ok", "")]

    with monkeypatch.context() as m:  # sent, and no worker has taken it yet
        m.setattr(_chain, "apply_async", lambda self, *args, **kwargs: None)
        r = api.post("/api/clusters/", body(name="slow", nodes=(("n1", "brno1", "52:54:00:00:00:09"),)), format="json")
    assert r.status_code == 201, r.content
    slow = r.data["id"]
    assert VirtualCluster.objects.get(pk=slow).state == ClusterState.PROVISIONING
    assert services.clusters_resend_unsent(older_than=timedelta(0)) == []


def test_a_node_change_the_broker_never_got_is_sent_again(fabric, images, api, alice, monkeypatch):
    """The broker refused a node change (or the process died before sending it): the cluster was UPDATING,
    answering busy until the deadline failed it with the new node pending for good. The sweeper sends it again
    (a new generation, its step again) — but never one that was sent and waits in a slow queue."""
    from celery.canvas import _chain

    def refused(self, *args, **kwargs):
        raise ConnectionError("broker down")

    api.force_authenticate(alice)
    cid = api.post("/api/clusters/", body(), format="json").data["id"]
    base = f"/api/clusters/{cid}"
    n3 = {"nodes": [{"name": "n3", "host": "prague1", "mac": "52:54:00:00:00:03"}]}
    with monkeypatch.context() as m:
        m.setattr(_chain, "apply_async", refused)
        assert api.post(f"{base}/nodes/", n3, format="json").status_code == 202  # (committed: sent after commit)
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.UPDATING and cluster.provision_sent != cluster.workflow_generation
    assert services.clusters_resend_unsent_updates(older_than=timedelta(minutes=1)) == []  # it may be on its way
    assert services.clusters_resend_unsent(older_than=timedelta(0)) == []  # (not a provisioning)
    assert services.clusters_resend_unsent_updates(older_than=timedelta(0)) == [cid]
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY, cluster.state_reason
    assert cluster.provision_sent == cluster.workflow_generation
    assert cluster.nodes.get(name="n3").state == NodeState.READY
    assert cluster.vlan_id in fabric.host_vlans("prague1")
    steps = [(s.status, s.error) for s in cluster.steps.filter(name="nodes.add").order_by("pk")]
    assert steps == [("failed", "never sent to the workers: sent again"), ("ok", "")]

    n4 = {"nodes": [{"name": "n4", "host": "prague2", "mac": "52:54:00:00:00:04"}]}
    with monkeypatch.context() as m:  # sent, and no worker has taken it yet
        m.setattr(_chain, "apply_async", lambda self, *args, **kwargs: None)
        assert api.post(f"{base}/nodes/", n4, format="json").status_code == 202
    assert VirtualCluster.objects.get(pk=cid).state == ClusterState.UPDATING
    assert services.clusters_resend_unsent_updates(older_than=timedelta(0)) == []

    # one that cannot be sent for as long as a change may take is left to the deadline, which fails it: no
    # resending for good, busy all along
    cluster = VirtualCluster.objects.get(pk=cid)
    VirtualCluster.objects.filter(pk=cid).update(provision_sent=None)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(seconds=601))
    assert services.clusters_resend_unsent_updates(older_than=timedelta(0)) == []
    assert services.clusters_end_stalled_workflows() == [cid]
    cluster.refresh_from_db()
    assert (
        cluster.state == ClusterState.READY
        and cluster.steps.get(name="nodes.add", generation=cluster.workflow_generation).status == "failed"
    )


def test_a_rollback_still_running_is_never_taken_for_an_unsent_provisioning(fabric, images, api, alice, monkeypatch):
    """A failed provisioning's rollback runs in a generation of its own, the cluster still PROVISIONING, and no
    provisioning is marked sent for that generation: the periodic task must leave it to its rollback (sending the
    provisioning again made a cluster that never ended FAILED — sent, failed and sent again for good)."""
    from celery.canvas import _chain

    from clusters import tasks, workflows

    api.force_authenticate(alice)
    with monkeypatch.context() as m:  # sent, and no worker has taken it yet
        m.setattr(_chain, "apply_async", lambda self, *args, **kwargs: None)
        cid = api.post("/api/clusters/", body(), format="json").data["id"]
    cluster = VirtualCluster.objects.get(pk=cid)
    with monkeypatch.context() as m:  # the rollback is sent, and waits in the queue of a worker that is down
        m.setattr(workflows, "start_compensation", lambda *args: None)
        assert services.cluster_provisioning_failed(
            cluster_id=cid, generation=cluster.workflow_generation, reason="switch sw-brno: timeout"
        )
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(minutes=2))
    before = VirtualCluster.objects.get(pk=cid)
    assert before.state == ClusterState.PROVISIONING and before.provision_sent != before.workflow_generation
    tasks.expire.apply().get()
    after = VirtualCluster.objects.get(pk=cid)
    assert (after.state, after.workflow_generation) == (ClusterState.PROVISIONING, before.workflow_generation)
    assert after.steps.filter(name="compensate", status="running").exists()


def test_a_provisioning_lost_after_every_device_converged_is_sent_again_once(fabric, images, api, alice, monkeypatch):
    """The workflow's last step never came (a chord's counter used up early by a task run twice, a message a
    killed worker held on the embedded broker): every device had converged, yet the deadline failed the cluster
    and rolled a working network back. The sweeper sends it again once nothing has happened for a while — never
    while a device change is open or just settled, and only once."""
    from clusters import tasks

    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(tasks.provision_finish, "run", lambda *args, **kwargs: None)  # (lost on its way)
        cid = api.post("/api/clusters/", body(), format="json").data["id"]
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.PROVISIONING and cluster.provision_sent == cluster.workflow_generation
    assert services.clusters_resend_lost() == []  # just converged: the last step may be on its way
    past = timezone.now() - timedelta(minutes=6)  # (quiet for more than half CLUSTER_PROVISION_TIMEOUT)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=past)
    DeviceChange.objects.filter(segment_id=cluster.segment_id).update(status="running")
    assert services.clusters_resend_lost() == []  # a device still at work: not lost
    DeviceChange.objects.filter(segment_id=cluster.segment_id).update(status="ok", finished_at=timezone.now())
    assert services.clusters_resend_lost() == []  # a device that just settled: the last step may be on its way
    DeviceChange.objects.filter(segment_id=cluster.segment_id).update(status="ok", finished_at=past)
    with monkeypatch.context() as m:
        m.setattr(tasks.provision_finish, "run", lambda *args, **kwargs: None)  # lost again
        assert services.clusters_resend_lost() == [cid]
    cluster.refresh_from_db()
    network = [(s.status, s.error) for s in cluster.steps.filter(name="network").order_by("pk")]
    assert network[0] == ("failed", services.LOST_AFTER_CONVERGED)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=past)
    DeviceChange.objects.filter(segment_id=cluster.segment_id).update(finished_at=past)
    cluster.refresh_from_db()  # lost again just as the first time: only the once-rule holds it back
    assert cluster.state == ClusterState.PROVISIONING and cluster.provision_sent == cluster.workflow_generation
    assert cluster.steps.filter(name="network", generation=cluster.workflow_generation, status="running").exists()
    assert services.clusters_resend_lost() == []  # once: the deadline's now
    assert ClusterStep.objects.filter(cluster_id=cid, error=services.LOST_AFTER_CONVERGED).count() == 1
    VirtualCluster.objects.filter(pk=cid).update(updated_at=timezone.now() - timedelta(minutes=11))
    assert services.clusters_end_stalled_workflows() == [cid]


def test_a_lost_provisioning_sent_again_ends_ready(fabric, images, api, alice, monkeypatch):
    from clusters import tasks

    api.force_authenticate(alice)
    with monkeypatch.context() as m:
        m.setattr(tasks.provision_finish, "run", lambda *args, **kwargs: None)
        cid = api.post("/api/clusters/", body(), format="json").data["id"]
    past = timezone.now() - timedelta(minutes=6)  # (quiet for more than half CLUSTER_PROVISION_TIMEOUT)
    VirtualCluster.objects.filter(pk=cid).update(updated_at=past)
    DeviceChange.objects.filter(segment__cluster__pk=cid).update(finished_at=past)
    assert services.clusters_resend_lost() == [cid]
    cluster = VirtualCluster.objects.get(pk=cid)
    assert cluster.state == ClusterState.READY, cluster.state_reason
    assert cluster.vlan_id in fabric.host_vlans("brno1") and cluster.vlan_id in fabric.host_vlans("pilsen1")
