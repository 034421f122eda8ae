"""``GET /api/clusters/{id}/network/`` and the cluster's page: which switches and hosts carry its VLAN, each with its
last change for the cluster and its open drift — the devices' own messages only for whom may read the device
history. On the fake fabric with eager Celery."""

from __future__ import annotations

import pytest

from clusters.models import VirtualCluster
from clusters.tests.helpers import client_for, create_cluster
from network import tasks
from network.models import DeviceChange
from network.tests import fakes
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def _network(client, cid) -> dict:
    r = client.get(f"/api/clusters/{cid}/network/")
    assert r.status_code == 200, r.content
    return r.data


def test_the_devices_of_a_clusters_network_with_their_changes_and_drift(
    fabric, alice, bob, root, django_assert_max_num_queries
):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01", host="brno1")
    client_for(alice).post(
        f"/api/clusters/{cid}/nodes/",
        {"nodes": [{"name": "n2", "host": "pilsen1", "mac": "52:54:00:00:00:02"}]},
        format="json",
    )
    cluster = VirtualCluster.objects.get(pk=cid)
    with django_assert_max_num_queries(16):
        body = _network(client_for(alice), cid)
    assert body["vlan_id"] == cluster.vlan_id and body["segment_state"] == "active"
    devices = {(d["kind"], d["name"]): d for d in body["devices"]}
    assert set(devices) >= {("switch", "sw-brno"), ("switch", "sw-pilsen"), ("host", "brno1"), ("host", "pilsen1")}
    assert [d["kind"] for d in body["devices"]] == sorted(d["kind"] for d in body["devices"])[::-1]  # switches first
    brno1 = devices[("host", "brno1")]
    # (its last change is the node's on pilsen1: nothing to change on brno1)
    assert (brno1["site"], brno1["wanted"], brno1["enabled"], brno1["status"], brno1["drift"]) == (
        "brno",
        True,
        True,
        "noop",
        [],
    )
    assert devices[("host", "pilsen1")]["status"] == "ok"

    # Someone removes the VLAN on pilsen1 by hand; the reconciler finds it (repair off: it stays open).
    state = fakes.load(fabric.args, "host", "pilsen1")
    fakes.save(fabric.args, "host", "pilsen1", {**state, "vlans": []})
    tasks.reconcile_device.apply(("host", fabric.hosts["pilsen1"].pk, False)).get()
    pilsen1 = {d["name"]: d for d in _network(client_for(alice), cid)["devices"]}["pilsen1"]
    assert [(d["port"], d["kind"]) for d in pilsen1["drift"]] == [("", "missing")]

    # A failed change: its message for an admin and middleware, not for the user (it quotes device configuration).
    DeviceChange.objects.filter(segment=cluster.segment, device="brno1").update(
        status="failed", error="commit refused: vlan 4095 reserved"
    )
    mine = {d["name"]: d for d in _network(client_for(alice), cid)["devices"]}["brno1"]
    assert mine["status"] == "failed" and "4095" not in mine["error"] and "ask an operator" in mine["error"]
    theirs = {d["name"]: d for d in _network(client_for(root), cid)["devices"]}["brno1"]
    assert theirs["error"] == "commit refused: vlan 4095 reserved"
    from rest_framework.test import APIClient

    _, secret = token_create(user=root, name="pbs", scopes=[TokenScope.CLUSTERS_MANAGE])
    pbs = APIClient()
    pbs.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert {d["name"]: d for d in _network(pbs, cid)["devices"]}["brno1"]["error"].startswith("commit refused")
    assert client_for(bob).get(f"/api/clusters/{cid}/network/").status_code == 404  # not his

    # Drift a device reports with ids the portal never hands out (VLAN 1) is shown, not a 500.
    from network.models import Drift

    switch = fabric.switches["brno"]
    Drift.objects.create(
        device_kind="switch", switch=switch, device=switch.name, port="h1", kind="foreign", vlans=f"1,{cluster.vlan_id}"
    )
    sw = {d["name"]: d for d in _network(client_for(alice), cid)["devices"]}["sw-brno"]
    assert [(d["port"], d["kind"]) for d in sw["drift"]] == [("", "foreign")]  # (the port name is the operators')
    sw = {d["name"]: d for d in _network(client_for(root), cid)["devices"]}["sw-brno"]
    assert [(d["port"], d["kind"]) for d in sw["drift"]] == [("h1", "foreign")]

    # Torn down: the devices were cleaned, none wants the VLAN any more.
    assert client_for(alice).post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    after = _network(client_for(alice), cid)
    assert after["segment_state"] == "closed" and not any(d["wanted"] for d in after["devices"])
    assert not any(d["drift"] for d in after["devices"])  # (its VLAN id may be another cluster's now)


def test_the_clusters_page(fabric, alice, bob, client, django_assert_max_num_queries):
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01", host="brno1", job_id="42.pbs")
    client.force_login(alice)
    home = client.get("/").content.decode()
    assert f'<a href="/clusters/{cid}/">c1</a>' in home
    with django_assert_max_num_queries(30):
        page = client.get(f"/clusters/{cid}/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "<h1>c1 " in text and "<code>42.pbs</code>" in text and "52:54:00:00:00:01" in text
    network = text.split('id="network"')[1].split("</table>")[0]
    assert 'data-device="sw-brno"' in network and 'data-device="brno1"' in network
    steps = text.split('id="steps"')[1].split("</table>")[0]
    assert ">ready<" in steps and " s</td>" in steps  # each finished step with its duration
    assert "created, or its state changed: ready" in text
    assert "Tear down…" in text
    client.force_login(bob)
    assert client.get(f"/clusters/{cid}/").status_code == 404  # not his
    assert client.post(f"/clusters/{cid}/").status_code == 405
